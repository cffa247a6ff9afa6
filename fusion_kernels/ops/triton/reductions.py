"""The small Triton reductions of the ``triton`` backend: per-neuron partial sums reduced, the
l1 scale of the kept entries, and each neuron's write mode (restored, with or without the rescale
fallback), launched from :mod:`.launcher`."""

from __future__ import annotations

import triton
import triton.language as tl

from .codes import (
    N_REPLACE,
    N_RESCALE,
    N_SCALED,
    P_L1_EPS,
    S_FALLBACKS,
)


@triton.jit
def _reduce_partials_kernel(part_ptr, out_ptr, splits, N, BLOCK: tl.constexpr):
    """``out[j] = Σ_s part[s, j]`` in a fixed order (deterministic float64 neuron sums)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float64)
    for s in range(splits):
        acc += tl.load(part_ptr + s * N + cols, mask=cols < N, other=0.0)
    tl.store(out_ptr + cols, acc, mask=cols < N)


@triton.jit
def _sum_all(ptr, count, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float64)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < count, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _l1_scale_kernel(
    total_ptr, n_total, kept_ptr, n_kept, fparams_ptr, scale_ptr, BLOCK: tl.constexpr
):
    """f32(Σ|Δ| / Σ_S|Δ|), left at 1 when either sum is below L1_EPS (contract.l1_scale)."""
    total = _sum_all(total_ptr, n_total, BLOCK)
    kept = _sum_all(kept_ptr, n_kept, BLOCK)
    eps = tl.load(fparams_ptr + P_L1_EPS)
    small = (total < eps) | (kept < eps)
    ratio = total / tl.where(small, 1.0, kept)
    tl.store(scale_ptr, tl.where(small, 1.0, ratio).to(tl.float32))


@triton.jit
def _neurons_kernel(
    change_ptr,  # [N] float64 C(j)
    kept_change_ptr,  # [N] float64 C'(j) (read when RESCALE)
    N,
    m,
    mode_ptr,
    factor_ptr,
    stats_ptr,
    RESCALE: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """R = the m neurons of largest C (ties by lower j), by counting each neuron's rank."""
    js = tl.program_id(0).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)  # [BLOCK_J]
    valid = js < N
    mine = tl.load(change_ptr + js, mask=valid, other=0.0)
    rank = tl.zeros([BLOCK_J], tl.int64)
    for start in range(0, N, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        theirs = tl.load(change_ptr + ks, mask=ks < N, other=0.0)
        ahead = (theirs[None, :] > mine[:, None]) | (
            (theirs[None, :] == mine[:, None]) & (ks[None, :] < js[:, None])
        )
        rank += tl.sum((ahead & (ks < N)[None, :]).to(tl.int64), axis=1)
    restored = valid & (rank < m)
    if RESCALE:
        kept_change = tl.load(kept_change_ptr + js, mask=valid, other=0.0)
        fallback = restored & (kept_change == 0.0)
        factor = (mine / tl.where(kept_change == 0.0, 1.0, kept_change)).to(tl.float32)
        mode = tl.where(restored, tl.where(fallback, N_REPLACE, N_RESCALE), N_SCALED)
        tl.store(factor_ptr + js, factor, mask=valid)
        n_fallback = tl.sum(fallback.to(tl.int64), axis=0)
        tl.atomic_add(stats_ptr + S_FALLBACKS, n_fallback, mask=n_fallback > 0)
    else:
        mode = tl.where(restored, N_REPLACE, N_SCALED)
    tl.store(mode_ptr + js, mode.to(tl.int8), mask=valid)
