"""The host side of the ``triton`` backend: it runs a tensor's job (:mod:`.job`: its plan, block
sizes and device buffers) through the passes of the merge, picking the grids and launching the
kernels of :mod:`.kernels` and, through :mod:`.select_launch`, of :mod:`.select`. The package
imports this module (and with it Triton) only when the backend is first used.
Full passes over base/tuned, each reading both inputs once:

- sums: per-neuron Σ|Δ| (when restoring), Σ|Δ| and random's kept Σ|Δ| (l1), and the histogram of
  the top key digit (magnitude/breadcrumbs). Skipped when nothing needs it.
- window selection (magnitude/breadcrumbs): one pass histograms the cut's next digit and copies
  the keys of its bin aside; the deeper digits read only that copy (and read base/tuned again
  only when the bin outgrows the copy buffer). The cuts live on the device; no host round trip.
- della ranks: the keys are written, each row sorted in global memory (a stable segmented
  sort) and the ranks scattered back, a chunk of rows at a time.
- C' (restore=rescale): one pass summing |Sub(Δ)| per neuron.
- write: Sub, restore and α, cast to the output dtype; counts kept and non-finite entries.

Task Arithmetic and DARE without l1/restore are one pass; TIES is three (sums, refine, write).
A single host sync at the end reads the counters. Locate's change scores are the sums pass alone
(:func:`scores_triton`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import NonFiniteDeltaError
from ...params import MergeParams
from ..contract import KernelStats, plan_tensor
from ..reference import change_scores_reference, merge_reference
from . import codes, kernels, reductions
from .job import LEVELS, _cdiv, _Job, _prepare
from .select_launch import _della_ranks, _select_window


@dataclass
class _Sums:
    neurons: torch.Tensor | None  # [N] float64 per-neuron sums, fixed-order reduced
    total: torch.Tensor  # [programs] float64 partial Σ|Δ|
    kept: torch.Tensor  # [programs] float64 partial kept Σ|Δ| (random)
    hist: torch.Tensor  # [2^11] int64 top-digit histogram of the order keys


def _sums(job: _Job, neuron_axis: int, *, sub=False, hist=False, totals=0) -> _Sums:
    """The reduction pass; ``sub`` sums |Sub(Δ)| (C') instead of |Δ| (C) per neuron."""
    block_r, block_c = job.tile()
    if neuron_axis == 2:
        blocks, steps, n_neurons = _cdiv(job.cols, block_c), _cdiv(job.rows, block_r), job.cols
    else:
        blocks, steps, n_neurons = _cdiv(job.rows, block_r), _cdiv(job.cols, block_c), job.rows
    splits = max(1, min(steps, job.tuning.programs // blocks))
    dev = job.state.device
    part = torch.empty(splits, n_neurons if neuron_axis else 1, dtype=torch.float64, device=dev)
    result = _Sums(
        neurons=None,
        total=torch.empty(blocks * splits, dtype=torch.float64, device=dev),
        kept=torch.empty(blocks * splits, dtype=torch.float64, device=dev),
        hist=torch.zeros(1 << LEVELS[0][1], dtype=torch.int64, device=dev),
    )
    job.launch(
        kernels._sums_kernel, (blocks, splits),
        job.base, job.tuned, job.rows, job.cols, job.seed,
        part, result.total, result.kept, result.hist, *job.method_args(),
        **job.kinds, BLOCK_R=block_r, BLOCK_C=block_c, NEURON=neuron_axis, SUB=sub, HIST=hist,
        TOTALS=totals, METHOD=job.method, RESCALE=job.rescale, NB0=1 << LEVELS[0][1],
        SHIFT0=LEVELS[0][0],
    )  # fmt: skip
    if neuron_axis:
        result.neurons = torch.empty(n_neurons, dtype=torch.float64, device=dev)
        block = 1024
        job.launch(
            reductions._reduce_partials_kernel, (_cdiv(n_neurons, block),),
            part, result.neurons, splits, n_neurons, BLOCK=block,
        )  # fmt: skip
    return result


def _select_neurons(job: _Job, change, kept_change, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron write mode (int8) and rescale factor (float32); counts the fallbacks."""
    n_neurons, block = change.numel(), job.tuning.neuron_block
    mode = torch.empty(n_neurons, dtype=torch.int8, device=change.device)
    factor = torch.ones(n_neurons, dtype=torch.float32, device=change.device)
    job.launch(
        reductions._neurons_kernel, (_cdiv(n_neurons, block),),
        change, kept_change, n_neurons, m, mode, factor, job.stats,
        RESCALE=job.params.restore == "rescale", BLOCK_J=block, BLOCK_K=block,
    )  # fmt: skip
    return mode, factor


def _run(job: _Job, name: str) -> KernelStats:
    m, l1 = _enqueue(job)
    # The one host sync: counters and the l1 scale together (all exact in float64).
    kept, nonfinite, fallbacks, scale = torch.cat([job.stats.double(), job.scale.double()]).tolist()
    if nonfinite:
        raise NonFiniteDeltaError(name, int(nonfinite))
    return KernelStats(
        kept=int(kept), restored=m, fallbacks=int(fallbacks), l1_scale=scale if l1 else 1.0
    )


@dataclass
class Located:
    """One job's passes up to its write: what the write pass (or the combining pass of several
    tuned models) reads besides the job's own buffers."""

    restored: int  # m, the neurons restored
    l1: bool  # whether the l1 rescale applies (job.scale then holds it)
    neuron_axis: int  # 0: no neurons, 1: rows, 2: columns
    mode: torch.Tensor  # [neurons] int8 write mode per neuron (codes.N_*)
    factor: torch.Tensor  # [neurons] float32 f32(C/C') of rescaled neurons


def _enqueue(job: _Job) -> tuple[int, bool]:
    """Launch every pass of the merge, without waiting; returns (restored neurons m, l1)."""
    located = locate_job(job)
    block_r, block_c = job.tile()
    job.launch(
        kernels._write_kernel, (_cdiv(job.rows, block_r) * _cdiv(job.cols, block_c),),
        job.base, job.tuned, job.out, job.rows, job.cols, job.seed, *job.method_args(),
        located.mode, located.factor, job.plan.weight, job.stats,
        **job.kinds, BLOCK_R=block_r, BLOCK_C=block_c, METHOD=job.method, RESCALE=job.rescale,
        NEURON=located.neuron_axis,
    )  # fmt: skip
    return located.restored, located.l1


def locate_job(job: _Job) -> Located:
    """Launch the passes before the write (sums, selection, della ranks, l1 scale, R), without
    waiting."""
    params, plan, dev = job.params, job.plan, job.state.device
    m = plan.restored_neurons
    neuron_axis = ({"row": 1, "col": 2}[plan.axis]) if m > 0 else 0
    active_cuts = plan.active_cuts
    l1 = job.rescale == codes.R_L1.value
    totals = (2 if params.suppress == "random" else 1) if l1 else 0
    sums = None
    if neuron_axis or active_cuts or totals:
        sums = _sums(job, neuron_axis, hist=active_cuts > 0, totals=totals)
    if active_cuts:
        _select_window(job, sums.hist)
    kept_parts = sums.kept if sums is not None else None
    if params.suppress == "della":
        kept_parts = _della_ranks(job, kept_sum=l1)
    if l1:
        job.launch(
            reductions._l1_scale_kernel, (1,),
            sums.total, sums.total.numel(), kept_parts, kept_parts.numel(), job.fparams,
            job.scale, BLOCK=1024,
        )  # fmt: skip
    mode = torch.zeros(1, dtype=torch.int8, device=dev)
    factor = torch.ones(1, dtype=torch.float32, device=dev)
    if neuron_axis:
        kept_change = sums.neurons
        if params.restore == "rescale":
            kept_change = _sums(job, neuron_axis, sub=True).neurons
        mode, factor = _select_neurons(job, sums.neurons, kept_change, m)
    return Located(m, l1, neuron_axis, mode, factor)


def merge_triton(
    base: torch.Tensor,
    tuned: torch.Tensor,
    out: torch.Tensor,
    name: str,
    axis: str,
    params: MergeParams,
) -> KernelStats:
    """The registered kernel function: SPEC's per-tensor merge written into ``out``."""
    if base.numel() == 0:
        return merge_reference(base, tuned, out, name, axis, params)
    target = (
        out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    )
    plan = plan_tensor(params, base.shape, axis, name)
    stats = _run(_prepare(base, tuned, target, plan, params), name)
    if target is not out:
        out.copy_(target)
    return stats


def scores_triton(
    base: torch.Tensor, tuned: torch.Tensor, axis: str
) -> tuple[float, torch.Tensor | None]:
    """Locate's first pass: merge's sums pass with C(j) and Σ|Δ| only.

    Returns ``(Σ|Δ|, C(j) as float64 on the tensors' device, or None for axis none)``; dtypes
    may differ and any layout is taken. A non-finite Δ gives a non-finite total, which
    :func:`~fusion_kernels.ops.change_scores` turns into NonFiniteDeltaError.
    """
    if base.numel() == 0:
        return change_scores_reference(base, tuned, axis)
    # The sums pass reads only base, tuned and the shape; the default parameters and an output
    # that is never written complete the job.
    params = MergeParams()
    job = _prepare(base, tuned, base, plan_tensor(params, base.shape, "none", ""), params)
    sums = _sums(job, {"none": 0, "row": 1, "col": 2}[axis], totals=1)
    return float(sums.total.sum()), sums.neurons
