"""The torch reference of the per-tensor merge: SPEC.md in code, simple over fast.

Every fast backend is tested against this file. It computes in float32 (sums and scale ratios in
float64, see README "Numerics"), sorts where the SPEC speaks of an order, and is also the fallback
backend on any device.
"""

from __future__ import annotations

import torch

from ..errors import NonFiniteDeltaError
from ..hashing import STREAM_DROP, STREAM_TIE, TWO_POW_M32, entry_hash, model_tensor_seed
from ..params import MergeParams
from .contract import (
    APPROX_BIN_SHIFT,
    APPROX_BINS,
    KernelStats,
    approx_cut,
    della_probability,
    inverse_scale_random,
    l1_scale,
    magnitude_window,
    neuron_count,
    plan_tensor,
)


def order_keys(abs_delta: torch.Tensor, tie_hash: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is the SPEC order up to the index tie-break.

    |Δ| ≥ 0 as float32 bits is monotonic in its value (31 bits); the TIE hash fills the low 32.
    Sorting these keys descending with a stable sort leaves equal keys in ascending index order.
    """
    magnitude_bits = abs_delta.contiguous().view(torch.int32).to(torch.int64)
    return (magnitude_bits << 32) | tie_hash


def spec_order(keys: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices of ``keys`` along ``dim`` in SPEC order (key descending, then index ascending)."""
    return torch.sort(keys, dim=dim, descending=True, stable=True).indices


def suppress(
    delta: torch.Tensor, name: str, params: MergeParams, model: int = 1
) -> tuple[torch.Tensor, KernelStats]:
    """``Sub(Δ)`` (float32, same shape) and the suppress part of the stats; ``model`` (1-based,
    in a merge of several tuned models) picks the hash seed."""
    flat = delta.reshape(-1)
    n = flat.numel()
    method = params.suppress
    if method == "none" or n == 0:
        return delta.clone(), KernelStats(kept=n)
    seed_of_tensor = model_tensor_seed(params.seed, name, model)
    index = torch.arange(n, dtype=torch.int64, device=delta.device)
    abs_flat = flat.abs()
    scale = torch.ones_like(flat)

    if method in ("magnitude", "breadcrumbs"):
        start, k = magnitude_window(params, n)
        if params.select == "approx" and k > 0:
            start, k = approx_window(
                abs_flat, start, k, plan_tensor(params, delta.shape, "none", name)
            )
        order = spec_order(order_keys(abs_flat, entry_hash(index, seed_of_tensor, STREAM_TIE)))
        keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
        keep[order[start : start + k]] = True
        l1 = 1.0
    else:
        u = entry_hash(index, seed_of_tensor, STREAM_DROP).double() * TWO_POW_M32
        if method == "random":
            keep = u < params.density
            inverse = torch.full_like(u, inverse_scale_random(params.density))
        else:
            prob = _della_probabilities(abs_flat, index, seed_of_tensor, params, delta.shape)
            keep = u < prob
            inverse = 1.0 / prob
        mode = params.rescale_mode
        l1 = 1.0
        if mode == "inverse":
            scale = inverse.to(torch.float32)
        elif mode == "l1":
            total = abs_flat.double().sum().item()
            kept_abs = abs_flat.double()[keep].sum().item()
            l1 = float(torch.tensor(l1_scale(total, kept_abs), dtype=torch.float32))
            scale = torch.full_like(flat, l1)

    sub = torch.where(keep, flat * scale, torch.zeros_like(flat))
    return sub.view_as(delta), KernelStats(kept=int(keep.sum()), l1_scale=l1)


def approx_window(abs_flat: torch.Tensor, start: int, k: int, plan) -> tuple[int, int]:
    """select=approx: the window ``[start, start + k)`` with each cut moved per
    :func:`~fusion_kernels.ops.contract.approx_cut`, as ``(start, length)``."""
    n = abs_flat.numel()
    bins = (abs_flat.contiguous().view(torch.int32) >> APPROX_BIN_SHIFT).to(torch.int64)
    histogram = torch.bincount(bins, minlength=APPROX_BINS).cpu().numpy()
    first = approx_cut(start, n, plan.cut_slack, histogram)
    return first, approx_cut(start + k, n, plan.cut_slack, histogram) - first


def _della_probabilities(abs_flat, index, seed_of_tensor, params, shape) -> torch.Tensor:
    """p(i) in float64: rank within each row (last dimension) counted from the smallest."""
    row_len = shape[-1] if len(shape) >= 1 else 1
    keys = order_keys(abs_flat, entry_hash(index, seed_of_tensor, STREAM_TIE)).view(-1, row_len)
    position = torch.empty_like(keys)
    order = spec_order(keys, dim=1)
    ranks_desc = torch.arange(row_len, device=keys.device).expand_as(order)
    position.scatter_(1, order, ranks_desc)
    rank_from_smallest = (row_len - 1 - position).reshape(-1).double()
    return della_probability(params.density, params.epsilon, rank_from_smallest, row_len)


def top_neurons(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Bool mask of the m neurons with the largest scores (ties by lower index)."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    chosen[order[:m]] = True
    return chosen


def restored_neurons(delta: torch.Tensor, axis: str, params: MergeParams) -> torch.Tensor | None:
    """R as a bool mask over the neurons (rows, or columns for axis=col); None when nothing is
    restored (restore or axis none)."""
    if params.restore == "none" or axis == "none":
        return None
    change = (delta.t() if axis == "col" else delta).abs().double().sum(dim=1)
    return top_neurons(change, neuron_count(params.top_neurons, change.numel()))


def restore(
    delta: torch.Tensor, sub: torch.Tensor, axis: str, params: MergeParams, stats: KernelStats
) -> torch.Tensor:
    """``Δ'`` from Δ and Sub(Δ): α·Sub outside R, replace/rescale inside R (SPEC "Restore")."""
    alpha = torch.tensor(params.weight, dtype=torch.float32)
    scaled = sub * alpha
    restored = restored_neurons(delta, axis, params)
    if restored is None:
        return scaled
    # Work on rows: for axis=col the neurons are the columns, so transpose views.
    d2, s2, out2 = (t.t() if axis == "col" else t for t in (delta, sub, scaled))
    change = d2.abs().double().sum(dim=1)
    stats.restored = int(restored.sum())
    if params.restore == "replace":
        result = torch.where(restored[:, None], d2, out2)
    else:
        kept_change = s2.abs().double().sum(dim=1)
        fallback = restored & (kept_change == 0)
        factor = torch.where(fallback, 1.0, change / torch.where(fallback, 1.0, kept_change))
        rescaled = s2 * factor.to(torch.float32)[:, None]
        result = torch.where(restored[:, None], rescaled, out2)
        result = torch.where(fallback[:, None], d2, result)
        stats.fallbacks = int(fallback.sum())
    return result.t() if axis == "col" else result


def change_scores_reference(
    base: torch.Tensor, tuned: torch.Tensor, axis: str
) -> tuple[float, torch.Tensor | None]:
    """Locate's first pass: ``Σ|Δ|`` and, for axis row/col, C(j) per neuron (float64)."""
    abs_delta = (tuned.float() - base.float()).abs().double()
    if axis == "none":
        return float(abs_delta.sum()), None
    scores = abs_delta.sum(dim=1 if axis == "row" else 0)
    return float(scores.sum()), scores


def merge_reference(
    base: torch.Tensor,
    tuned: torch.Tensor,
    out: torch.Tensor,
    name: str,
    axis: str,
    params: MergeParams,
) -> KernelStats:
    """Write ``cast(f32(base) + Δ', base.dtype)`` into ``out``; return the stats."""
    delta = tuned.float() - base.float()
    finite = torch.isfinite(delta)
    if not bool(finite.all()):
        raise NonFiniteDeltaError(name, int((~finite).sum()))
    sub, stats = suppress(delta, name, params)
    new_delta = restore(delta, sub, axis, params, stats)
    out.copy_((base.float() + new_delta).to(base.dtype))
    return stats
