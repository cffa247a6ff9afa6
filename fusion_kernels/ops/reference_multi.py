"""The torch reference of a merge of several tuned models over one base (SPEC.md "Several tuned
models"), line by line: each model located alone (its own parameters, its own hash seed), its
located delta weighted per entry, TIES sign election on the weighted deltas, the kept ones summed
in model order in float32, normalized and scaled by λ.

Every fast backend's ``merge_multi`` is tested against this file. With one model, no consensus,
no normalize and λ = 1 it writes exactly what :func:`.reference.merge_reference` writes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import NonFiniteDeltaError
from ..params import Combine, MergeParams
from .contract import KernelStats, MultiKernelStats
from .reference import restore, restored_neurons, suppress


def located_delta(
    delta: torch.Tensor, name: str, axis: str, params: MergeParams, model: int
) -> tuple[torch.Tensor, torch.Tensor, KernelStats]:
    """Model ``model``'s ``(W_t, ω_t, stats)``: its weighted delta ``ω_t · L_t`` and its entry
    weights, both float32 of delta's shape.

    ``L_t`` is Sub_t(Δ_t) outside R_t and Restore's replace/rescale inside it, "with α left
    out": Restore with α = 1. ``ω_t`` is 1 in a restored neuron, else w_t (the model's weight).
    """
    sub, stats = suppress(delta, name, params, model=model)
    located = restore(delta, sub, axis, params.replace(weight=1.0), stats)
    w = torch.tensor(params.weight, dtype=torch.float32)
    omega = torch.full_like(delta, float(w))
    restored = restored_neurons(delta, axis, params)
    if restored is not None:
        in_r = restored[None, :] if axis == "col" else restored[:, None]
        omega = torch.where(in_r.expand_as(delta), torch.ones_like(delta), omega)
    return omega * located, omega, stats


def fold_sum(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``terms[0] + terms[1] + …`` left to right in the terms' dtype: SPEC's sums over
    t = 1 … N, started from the first term (so one term is itself, a −0 included)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def consensus_keep(weighted: Sequence[torch.Tensor], consensus: str) -> list[torch.Tensor]:
    """``keep_t`` per model (bool): all for none; else whether sign(W_t) equals the elected
    sign σ (+1 where the sum, or the sum of signs, is ≥ 0), a zero W_t agreeing with neither."""
    if consensus == "none":
        return [torch.ones_like(w, dtype=torch.bool) for w in weighted]
    if consensus == "sum":
        positive = fold_sum(weighted) >= 0
    else:
        positive = fold_sum([torch.sign(w).to(torch.int64) for w in weighted]) >= 0
    return [torch.where(positive, w > 0, w < 0) for w in weighted]


def combine_deltas(
    weighted: Sequence[torch.Tensor], omegas: Sequence[torch.Tensor], combine: Combine
) -> tuple[torch.Tensor, int]:
    """``(Δ', dropped)``: ``λ · M`` in float32, M the kept weighted deltas' sum (divided by the
    kept entry weights' sum where normalize and that sum is not 0); dropped counts the (model,
    entry) pairs with W ≠ 0 that consensus dropped."""
    keeps = consensus_keep(weighted, combine.consensus)
    dropped = sum(int(((w != 0) & ~k).sum()) for w, k in zip(weighted, keeps, strict=True))
    zero = torch.zeros_like(weighted[0])
    merged = fold_sum([torch.where(k, w, zero) for w, k in zip(weighted, keeps, strict=True)])
    if combine.normalize:
        divisor = fold_sum([torch.where(k, o, zero) for o, k in zip(omegas, keeps, strict=True)])
        nonzero = divisor != 0
        merged = torch.where(nonzero, merged / torch.where(nonzero, divisor, 1.0), merged)
    lam = torch.tensor(combine.lambda_, dtype=torch.float32)
    return lam * merged, dropped


def merge_multi_reference(
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    out: torch.Tensor,
    name: str,
    axis: str,
    params: Sequence[MergeParams],
    combine: Combine,
) -> MultiKernelStats:
    """Write ``cast(f32(base) + λ·M, base.dtype)`` into ``out``; return each model's stats and
    the consensus drops. ``params[t]`` is model t+1's; ``name`` seeds every model's hashes.
    Raises NonFiniteDeltaError when any model's Δ is not finite (``out`` then untouched)."""
    base_f = base.float()
    deltas = [t.float() - base_f for t in tuned]
    for delta in deltas:
        finite = torch.isfinite(delta)
        if not bool(finite.all()):
            raise NonFiniteDeltaError(name, int((~finite).sum()))
    weighted, omegas, stats = [], [], []
    for model, (delta, p) in enumerate(zip(deltas, params, strict=True), start=1):
        w, omega, s = located_delta(delta, name, axis, p, model)
        weighted.append(w)
        omegas.append(omega)
        stats.append(s)
    new_delta, dropped = combine_deltas(weighted, omegas, combine)
    out.copy_((base_f + new_delta).to(base.dtype))
    return MultiKernelStats(models=stats, dropped=dropped)
