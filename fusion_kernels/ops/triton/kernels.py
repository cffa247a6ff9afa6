"""Triton kernels of the ``triton`` backend, launched from :mod:`.launcher` (loaded on first use):
the streaming passes and the helpers every kernel shares. Their codes and parameter fields are in
:mod:`.codes`, the small reductions in :mod:`.reductions`, the selection kernels (window cuts,
della ranks) in :mod:`.select`.

Every kernel sees the tensor as a row-major ``[R, C]`` matrix (C = last dimension) and recomputes
Δ, the order key and the hashes from ``base``/``tuned`` instead of storing them: re-reading two
16-bit inputs costs less memory traffic than writing and reading 64-bit keys.

Numerics follow SPEC.md bit for bit on any device: bf16 arrives as int16 bits and is widened and
rounded (to nearest even) with integer arithmetic, hashes are uint32, the della probabilities and
the sums are float64, and every launch passes ``enable_fp_fusion=False`` so no multiply and add are
contracted into an FMA the reference does not do.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .codes import (
    _DROP,
    _TIE,
    _TWO_POW_M32,
    F_LIMIT,
    F_PREFIX,
    F_SHIFT,
    KIND_BF16,
    KIND_F16,
    M_NONE,
    M_RANDOM,
    M_WINDOW,
    N_REPLACE,
    N_RESCALE,
    P_DELLA_LOW,
    P_DELLA_SPAN,
    P_DENSITY,
    P_ROW_GAPS,
    R_INVERSE,
    S_KEPT,
    S_NONFINITE,
    STATE_FIELDS,
)

# ----------------------------------------------------------------------------- shared helpers


@triton.jit
def _mix32(x):
    # SPEC's finaliser on uint32: products wrap mod 2^32, shifts are logical.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _entry_hash(idx, seed, stream: tl.constexpr):
    """``h_stream(i)`` (uint32) for int64 flat indices; ``seed`` is the tensor seed."""
    per_block = _mix32(tl.cast(seed, tl.uint32) ^ stream ^ _mix32((idx >> 32).to(tl.uint32)))
    return _mix32(idx.to(tl.uint32) ^ per_block)


@triton.jit
def _load_f32(ptr, offs, mask, KIND: tl.constexpr):
    if KIND == KIND_BF16:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
        value = (bits << 16).to(tl.float32, bitcast=True)
    else:
        value = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return value


@triton.jit
def _store_f32(ptr, offs, value, mask, KIND: tl.constexpr):
    if KIND == KIND_BF16:
        # Round to nearest even on the bits (overflow correctly carries into +-inf).
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(ptr + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif KIND == KIND_F16:
        tl.store(ptr + offs, value.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + offs, value, mask=mask)


@triton.jit
def _delta(base_ptr, tuned_ptr, offs, mask, BASE_KIND: tl.constexpr, TUNED_KIND: tl.constexpr):
    base = _load_f32(base_ptr, offs, mask, BASE_KIND)
    return base, _load_f32(tuned_ptr, offs, mask, TUNED_KIND) - base


@triton.jit
def _order_key(delta, idx, seed):
    """int64 key of the SPEC order: float32 bits of |Δ| (31 bits) above the TIE hash."""
    magnitude = tl.abs(delta).to(tl.int32, bitcast=True).to(tl.int64)
    return (magnitude << 32) | _entry_hash(idx, seed, _TIE).to(tl.int64)


@triton.jit
def _before_cut(key, idx, cut_ptr):
    """Whether entries lie before a resolved cut (their SPEC position is smaller)."""
    top = key >> tl.load(cut_ptr + F_SHIFT)
    prefix = tl.load(cut_ptr + F_PREFIX)
    return (top > prefix) | ((top == prefix) & (idx < tl.load(cut_ptr + F_LIMIT)))


@triton.jit
def _della_probability(rank, row_len, fparams_ptr):
    """p(r) in float64, evaluated as (K − ε) + ((2ε)·r)/(L − 1); K when L = 1."""
    spread = (tl.load(fparams_ptr + P_DELLA_SPAN) * rank.to(tl.float64)) / tl.load(
        fparams_ptr + P_ROW_GAPS
    )
    prob = tl.load(fparams_ptr + P_DELLA_LOW) + spread
    return tl.where(row_len == 1, tl.load(fparams_ptr + P_DENSITY), prob)


@triton.jit
def _della_keep(rank, idx, row_len, seed, fparams_ptr):
    prob = _della_probability(rank, row_len, fparams_ptr)
    uniform = _entry_hash(idx, seed, _DROP).to(tl.float64) * _TWO_POW_M32
    return uniform < prob, prob


@triton.jit
def _suppress(
    delta,
    idx,
    mask,
    row_len,
    seed,
    state_ptr,
    threshold,
    scale_ptr,
    rank_ptr,
    fparams_ptr,
    METHOD: tl.constexpr,
    RESCALE: tl.constexpr,
):
    """``(keep, Sub(Δ))`` of a tile: the mask S and the float32 kept-and-scaled delta."""
    if METHOD == M_NONE:
        keep = mask
        sub = delta
    elif METHOD == M_WINDOW:
        key = _order_key(delta, idx, seed)
        keep = _before_cut(key, idx, state_ptr + STATE_FIELDS) & ~_before_cut(key, idx, state_ptr)
        sub = tl.where(keep, delta, 0.0)
    elif METHOD == M_RANDOM:
        keep = _entry_hash(idx, seed, _DROP).to(tl.int64) < threshold
        sub = tl.where(keep, delta * tl.load(scale_ptr), 0.0)
    else:
        rank = tl.load(rank_ptr + idx, mask=mask, other=0)
        keep, prob = _della_keep(rank, idx, row_len, seed, fparams_ptr)
        scale = (1.0 / prob).to(tl.float32) if RESCALE == R_INVERSE else tl.load(scale_ptr)
        sub = tl.where(keep, delta * scale, 0.0)
    return keep & mask, sub


# ----------------------------------------------------------------------------- full passes


@triton.jit
def _sums_kernel(
    base_ptr,
    tuned_ptr,
    R,
    C,
    seed,
    neuron_part_ptr,  # [splits, N] float64: per-neuron partial sums of |Δ| (or |Sub|)
    total_part_ptr,  # [programs] float64: Σ|Δ|
    kept_part_ptr,  # [programs] float64: Σ|Δ| over random's kept entries
    hist_ptr,  # [NB0] int64: level-0 histogram of the order keys
    state_ptr,
    threshold,
    scale_ptr,
    rank_ptr,
    fparams_ptr,
    BASE_KIND: tl.constexpr,
    TUNED_KIND: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NEURON: tl.constexpr,  # 0: no neuron sums, 1: rows, 2: columns
    SUB: tl.constexpr,  # neuron sums of |Sub(Δ)| (C') instead of |Δ| (C)
    HIST: tl.constexpr,
    TOTALS: tl.constexpr,  # 0: none, 1: Σ|Δ|, 2: Σ|Δ| and random's kept Σ|Δ|
    METHOD: tl.constexpr,
    RESCALE: tl.constexpr,
    NB0: tl.constexpr,
    SHIFT0: tl.constexpr,
):
    """One read of base/tuned for the reductions the later passes need.

    Program (b, s) owns neuron block b (rows, or columns for NEURON=2) and walks every splits-th
    tile across it, so each partial sum is written by exactly one program: no float atomics, and
    the fixed-order reduction afterwards makes every run bit-identical.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    splits = tl.num_programs(1)
    # int64 lanes keep every row*C product below in int64 (the loop counter may be int32).
    lanes_r = tl.arange(0, BLOCK_R).to(tl.int64)
    lanes_c = tl.arange(0, BLOCK_C).to(tl.int64)
    if NEURON == 2:
        n_steps = tl.cdiv(R, BLOCK_R)
        neuron_acc = tl.zeros([BLOCK_C], tl.float64)
    else:
        n_steps = tl.cdiv(C, BLOCK_C)
        neuron_acc = tl.zeros([BLOCK_R], tl.float64)
    total = tl.zeros([BLOCK_R], tl.float64)
    kept = tl.zeros([BLOCK_R], tl.float64)
    hist = tl.zeros([NB0], tl.int32)
    for step in range(pid_s, n_steps, splits):
        if NEURON == 2:
            rows = step * BLOCK_R + lanes_r  # [BLOCK_R]
            cols = pid_n * BLOCK_C + lanes_c  # [BLOCK_C]
        else:
            rows = pid_n * BLOCK_R + lanes_r
            cols = step * BLOCK_C + lanes_c
        mask = (rows < R)[:, None] & (cols < C)[None, :]  # [BLOCK_R, BLOCK_C]
        idx = rows[:, None] * C + cols[None, :]
        _, delta = _delta(base_ptr, tuned_ptr, idx, mask, BASE_KIND, TUNED_KIND)
        magnitude = tl.abs(delta)
        if NEURON != 0:
            if SUB:
                _, sub = _suppress(
                    delta, idx, mask, C, seed, state_ptr, threshold, scale_ptr, rank_ptr,
                    fparams_ptr, METHOD, RESCALE,
                )  # fmt: skip
                summand = tl.abs(sub).to(tl.float64)
            else:
                summand = magnitude.to(tl.float64)
            if NEURON == 1:
                neuron_acc += tl.sum(summand, axis=1)
            else:
                neuron_acc += tl.sum(summand, axis=0)
        if TOTALS >= 1:
            total += tl.sum(magnitude.to(tl.float64), axis=1)
        if TOTALS == 2:
            keep, _ = _suppress(
                delta, idx, mask, C, seed, state_ptr, threshold, scale_ptr, rank_ptr,
                fparams_ptr, METHOD, RESCALE,
            )  # fmt: skip
            kept += tl.sum(tl.where(keep, magnitude, 0.0).to(tl.float64), axis=1)
        if HIST:
            digit = (_order_key(delta, idx, seed) >> SHIFT0).to(tl.int32)
            flat = tl.reshape(digit, [BLOCK_R * BLOCK_C])
            hist += tl.histogram(flat, NB0, mask=tl.reshape(mask, [BLOCK_R * BLOCK_C]))
    if NEURON == 1:
        neurons = pid_n * BLOCK_R + lanes_r
        tl.store(neuron_part_ptr + pid_s * R + neurons, neuron_acc, mask=neurons < R)
    elif NEURON == 2:
        neurons = pid_n * BLOCK_C + lanes_c
        tl.store(neuron_part_ptr + pid_s * C + neurons, neuron_acc, mask=neurons < C)
    program = pid_n * splits + pid_s
    if TOTALS >= 1:
        tl.store(total_part_ptr + program, tl.sum(total, axis=0))
    if TOTALS == 2:
        tl.store(kept_part_ptr + program, tl.sum(kept, axis=0))
    if HIST:
        tl.atomic_add(hist_ptr + tl.arange(0, NB0), hist.to(tl.int64), mask=hist > 0)


@triton.jit
def _tile(R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(rows, cols, mask, idx)`` of this program's tile of an R x C tensor."""
    # A flat grid: CUDA caps the second grid dimension at 65535 blocks.
    col_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = (pid % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask = (rows < R)[:, None] & (cols < C)[None, :]  # [BLOCK_R, BLOCK_C]
    idx = rows[:, None] * C + cols[None, :]
    return rows, cols, mask, idx


@triton.jit
def _neuron_mode(mode_ptr, factor_ptr, rows, cols, R, C, NEURON: tl.constexpr):
    """Each neuron's restore mode and rescale factor, broadcast over the tile (NEURON: 1 rows,
    else columns)."""
    if NEURON == 1:
        mode = tl.load(mode_ptr + rows, mask=rows < R, other=0)[:, None]
        factor = tl.load(factor_ptr + rows, mask=rows < R, other=1.0)[:, None]
    else:
        mode = tl.load(mode_ptr + cols, mask=cols < C, other=0)[None, :]
        factor = tl.load(factor_ptr + cols, mask=cols < C, other=1.0)[None, :]
    return mode, factor


@triton.jit
def _count_entries(stats_ptr, keep, delta, mask):
    """Add the tile's kept and non-finite entries to a model's stats."""
    exponent = delta.to(tl.int32, bitcast=True) & 0x7F800000
    nonfinite = tl.sum(tl.sum(((exponent == 0x7F800000) & mask).to(tl.int64), axis=1), axis=0)
    tl.atomic_add(stats_ptr + S_KEPT, tl.sum(tl.sum(keep.to(tl.int64), axis=1), axis=0))
    tl.atomic_add(stats_ptr + S_NONFINITE, nonfinite, mask=nonfinite > 0)


@triton.jit
def _write_kernel(
    base_ptr,
    tuned_ptr,
    out_ptr,
    R,
    C,
    seed,
    state_ptr,
    threshold,
    scale_ptr,
    rank_ptr,
    fparams_ptr,
    mode_ptr,  # [N] int8 per-neuron write mode
    factor_ptr,  # [N] float32 f32(C/C') of rescaled neurons
    alpha,
    stats_ptr,
    BASE_KIND: tl.constexpr,
    TUNED_KIND: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    METHOD: tl.constexpr,
    RESCALE: tl.constexpr,
    NEURON: tl.constexpr,
):
    """The last pass: ``out = cast(f32(base) + Δ')``, counting kept and non-finite entries."""
    rows, cols, mask, idx = _tile(R, C, BLOCK_R, BLOCK_C)
    base, delta = _delta(base_ptr, tuned_ptr, idx, mask, BASE_KIND, TUNED_KIND)
    keep, sub = _suppress(
        delta, idx, mask, C, seed, state_ptr, threshold, scale_ptr, rank_ptr, fparams_ptr,
        METHOD, RESCALE,
    )  # fmt: skip
    new_delta = sub * alpha
    if NEURON != 0:
        mode, factor = _neuron_mode(mode_ptr, factor_ptr, rows, cols, R, C, NEURON)
        new_delta = tl.where(mode == N_RESCALE, sub * factor, new_delta)
        new_delta = tl.where(mode == N_REPLACE, delta, new_delta)
    _store_f32(out_ptr, idx, base + new_delta, mask, BASE_KIND)
    _count_entries(stats_ptr, keep, delta, mask)


# ----------------------------------------------------------------------------- small reductions
