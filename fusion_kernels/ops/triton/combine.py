"""The ``triton`` backend's merge of several tuned models (SPEC.md "Several tuned models"): each
model's passes up to the write run as in the one-model merge (:func:`.launcher.locate_job`, with
the model's own seed), then :func:`_combine_kernel` reads base and every tuned tensor and writes
``out = cast(f32(base) + λ·M)`` in one launch. The models reach it as tuples of pointers and
constexprs, unrolled at compile time (one compiled variant per number of models and methods).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from ...errors import NonFiniteDeltaError
from ...params import Combine, MergeParams
from ..contract import KernelStats, MultiKernelStats, plan_tensor
from ..reference_multi import merge_multi_reference
from . import codes
from .codes import N_SCALED
from .kernels import (
    _count_entries,
    _delta,
    _load_f32,
    _neuron_mode,
    _store_f32,
    _suppress,
    _tile,
)
from .launcher import Located, _cdiv, _prepare, locate_job

CONSENSUS = {"none": 0, "sum": 1, "count": 2}


@triton.jit
def _weighted(
    base_ptr, tuned_ptr, idx, mask, rows, cols, C, seed, state_ptr, threshold, scale_ptr,
    rank_ptr, fparams_ptr, mode_ptr, factor_ptr, weight, R,
    BASE_KIND: tl.constexpr, TUNED_KIND: tl.constexpr, METHOD: tl.constexpr,
    RESCALE: tl.constexpr, NEURON: tl.constexpr,
):  # fmt: skip
    """``(keep, W, ω, Δ)`` of one model's tile: W is the one-model write pass's Δ' with the
    model's weight as α; ω is 1 in a restored neuron, else the weight."""
    _, delta = _delta(base_ptr, tuned_ptr, idx, mask, BASE_KIND, TUNED_KIND)
    keep, sub = _suppress(
        delta, idx, mask, C, seed, state_ptr, threshold, scale_ptr, rank_ptr, fparams_ptr,
        METHOD, RESCALE,
    )  # fmt: skip
    weighted = sub * weight
    omega = tl.zeros_like(delta) + weight
    if NEURON != 0:
        mode, factor = _neuron_mode(mode_ptr, factor_ptr, rows, cols, R, C, NEURON)
        weighted = tl.where(mode == codes.N_RESCALE, sub * factor, weighted)
        weighted = tl.where(mode == codes.N_REPLACE, delta, weighted)
        omega = tl.where(mode != N_SCALED, 1.0, omega)
    return keep, weighted, omega, delta


@triton.jit
def _combine_kernel(
    base_ptr, tuned_ptrs, out_ptr, R, C, seeds, states, thresholds, scales, ranks, fparams,
    modes, factors, weights, stats, dropped_ptr, lam,
    BASE_KIND: tl.constexpr, TUNED_KINDS: tl.constexpr, METHODS: tl.constexpr,
    RESCALES: tl.constexpr, NEURONS: tl.constexpr, MODELS: tl.constexpr,
    CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``out = cast(f32(base) + λ·M)`` over one tile; each model's kept and non-finite counts
    into its stats, the consensus drops into dropped. Sums run over the models in order."""
    rows, cols, mask, idx = _tile(R, C, BLOCK_R, BLOCK_C)
    base = _load_f32(base_ptr, idx, mask, BASE_KIND)
    total = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    votes = tl.zeros([BLOCK_R, BLOCK_C], tl.int32)
    if CONSENSUS != 0:
        for t in tl.static_range(MODELS):
            _, w, _, _ = _weighted(
                base_ptr, tuned_ptrs[t], idx, mask, rows, cols, C, seeds[t], states[t],
                thresholds[t], scales[t], ranks[t], fparams[t], modes[t], factors[t],
                weights[t], R, BASE_KIND, TUNED_KINDS[t], METHODS[t], RESCALES[t], NEURONS[t],
            )  # fmt: skip
            if t == 0:  # noqa: SIM108 (a static branch of the unrolled loop, not a select)
                total = w
            else:
                total = total + w
            votes += (w > 0.0).to(tl.int32) - (w < 0.0).to(tl.int32)
    positive = total >= 0.0
    if CONSENSUS == 2:
        positive = votes >= 0
    merged = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    divisor = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    drops = tl.zeros([BLOCK_R, BLOCK_C], tl.int64)
    for t in tl.static_range(MODELS):
        keep, w, omega, delta = _weighted(
            base_ptr, tuned_ptrs[t], idx, mask, rows, cols, C, seeds[t], states[t],
            thresholds[t], scales[t], ranks[t], fparams[t], modes[t], factors[t], weights[t], R,
            BASE_KIND, TUNED_KINDS[t], METHODS[t], RESCALES[t], NEURONS[t],
        )  # fmt: skip
        agree = mask
        if CONSENSUS != 0:
            agree = tl.where(positive, w > 0.0, w < 0.0)
            drops += (~agree & (w != 0.0) & mask).to(tl.int64)
        term = tl.where(agree, w, 0.0)
        part = tl.where(agree, omega, 0.0)
        if t == 0:
            merged = term
            divisor = part
        else:
            merged = merged + term
            divisor = divisor + part
        _count_entries(stats[t], keep, delta, mask)
    if NORMALIZE:
        nonzero = divisor != 0.0
        merged = tl.where(nonzero, tl.math.div_rn(merged, tl.where(nonzero, divisor, 1.0)), merged)
    _store_f32(out_ptr, idx, base + lam * merged, mask, BASE_KIND)
    if CONSENSUS != 0:
        tl.atomic_add(dropped_ptr, tl.sum(tl.sum(drops, axis=1), axis=0))


def merge_multi_triton(
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    out: torch.Tensor,
    name: str,
    axis: str,
    params: Sequence[MergeParams],
    combine: Combine,
) -> MultiKernelStats:
    """The registered ``multi`` kernel: SPEC's merge of several tuned models into ``out``."""
    if base.numel() == 0:
        return merge_multi_reference(base, tuned, out, name, axis, params, combine)
    target = (
        out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    )
    jobs = [
        _prepare(base, t, target, plan_tensor(p, base.shape, axis, name, model), p)
        for model, (t, p) in enumerate(zip(tuned, params, strict=True), start=1)
    ]
    located, dropped = enqueue_multi(jobs, combine)
    # The one host sync: every model's counters and l1 scale, and the drops.
    counters = torch.cat([torch.cat([j.stats.double(), j.scale.double()]) for j in jobs])
    values = torch.cat([counters, dropped.double()]).tolist()
    stats = []
    for loc in located:
        kept, nonfinite, fallbacks, scale = values[:4]
        values = values[4:]
        if nonfinite:
            raise NonFiniteDeltaError(name, int(nonfinite))
        stats.append(KernelStats(int(kept), loc.restored, int(fallbacks), scale if loc.l1 else 1.0))
    if target is not out:
        out.copy_(target)
    return MultiKernelStats(models=stats, dropped=int(values[0]))


def enqueue_multi(jobs: list, combine: Combine) -> tuple[list[Located], torch.Tensor]:
    """Launch every model's passes up to its write, then the combining pass into the first
    job's ``out``, without waiting; returns each model's :class:`Located` and the drop counter."""
    located = [locate_job(job) for job in jobs]
    dropped = torch.zeros(1, dtype=torch.int64, device=jobs[0].state.device)
    first = jobs[0]
    block_r, block_c = first.tile()
    if len(jobs) > 2:
        # Each model's tile lives in registers at once (sm_90, 5 models: 255 registers and a
        # spill at the one-model tile); half the rows keeps them in registers.
        block_r = max(1, block_r // 2)
    first.launch(
        _combine_kernel, (_cdiv(first.rows, block_r) * _cdiv(first.cols, block_c),),
        first.base, tuple(j.tuned for j in jobs), first.out, first.rows, first.cols,
        tuple(j.seed for j in jobs), tuple(j.state for j in jobs),
        tuple(j.threshold for j in jobs), tuple(j.scale for j in jobs),
        tuple(j.rank for j in jobs), tuple(j.fparams for j in jobs),
        tuple(x.mode for x in located), tuple(x.factor for x in located),
        tuple(j.plan.weight for j in jobs), tuple(j.stats for j in jobs), dropped,
        float(np.float32(combine.lambda_)),
        BASE_KIND=first.kinds["BASE_KIND"], TUNED_KINDS=tuple(j.kinds["TUNED_KIND"] for j in jobs),
        METHODS=tuple(j.method for j in jobs), RESCALES=tuple(j.rescale for j in jobs),
        NEURONS=tuple(x.neuron_axis for x in located), MODELS=len(jobs),
        CONSENSUS=CONSENSUS[combine.consensus], NORMALIZE=combine.normalize,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )  # fmt: skip
    return located, dropped
