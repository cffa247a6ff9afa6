"""Triton kernels that select: the window's cuts by radix select over the SPEC order, and
della's per-row ranks. Launched from :mod:`.launcher`; the streaming passes and the helpers they
share (Δ, the order key, the cut state) are in :mod:`.kernels`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import (
    F_CANDIDATES,
    F_COMPACT,
    F_COUNT,
    F_DONE,
    F_LIMIT,
    F_PREFIX,
    F_RANK,
    F_SHIFT,
    STATE_FIELDS,
    _della_keep,
    _delta,
    _order_key,
)

# ----------------------------------------------------------------------------- window selection
#
# magnitude/breadcrumbs keep positions [t, t + k) of the SPEC order. Each nontrivial cut is found
# by radix selection on the 63-bit key: a histogram of the top digit (in _sums_kernel), then one
# _refine/_scan pair per further digit. _scan picks the digit of the bin holding the cut and marks
# the cut DONE as soon as it falls on a bin edge (within `slack` entries for select="approx"), after
# which every later launch for that cut returns at once. The first refinement also copies the keys
# of the cut's group into a candidate buffer when they fit, so the deeper digits read that buffer
# instead of base/tuned. Exact key ties (possible only beyond 2^32 entries, where the TIE hash
# repeats) are broken by index in _index_count/_index_pick.


@triton.jit
def _flat_keys(
    base_ptr, tuned_ptr, n, seed, offs, BASE_KIND: tl.constexpr, TUNED_KIND: tl.constexpr
):
    valid = offs < n
    _, delta = _delta(base_ptr, tuned_ptr, offs, valid, BASE_KIND, TUNED_KIND)
    return _order_key(delta, offs, seed), valid


@triton.jit
def _refine_kernel(
    base_ptr,
    tuned_ptr,
    n,
    seed,
    state_ptr,
    hist_ptr,  # [2, NB] int64 histogram of this digit, per cut
    cand_ptr,  # [2, cap] int64 candidate keys, per cut
    cap,
    BASE_KIND: tl.constexpr,
    TUNED_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    NB: tl.constexpr,
    SHIFT_PREV: tl.constexpr,
    SHIFT: tl.constexpr,
    FIRST: tl.constexpr,
):
    """Histogram of the next digit over the entries of the cut's group."""
    cut = tl.program_id(1)
    cut_ptr = state_ptr + cut * STATE_FIELDS
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    if tl.load(cut_ptr + F_DONE) == 0:
        prefix = tl.load(cut_ptr + F_PREFIX)
        compact = tl.load(cut_ptr + F_COMPACT) != 0
        if FIRST:
            key, valid = _flat_keys(base_ptr, tuned_ptr, n, seed, offs, BASE_KIND, TUNED_KIND)
            member = valid & ((key >> SHIFT_PREV) == prefix)
            if compact:
                found = tl.sum(member.to(tl.int64), axis=0)
                start = tl.atomic_add(cut_ptr + F_CANDIDATES, found)
                slot = start + tl.cumsum(member.to(tl.int64), axis=0) - 1
                tl.store(cand_ptr + cut * cap + slot, key, mask=member)
        elif compact:
            valid = offs < tl.load(cut_ptr + F_CANDIDATES)
            key = tl.load(cand_ptr + cut * cap + offs, mask=valid, other=0)
            member = valid & ((key >> SHIFT_PREV) == prefix)
        else:
            key, valid = _flat_keys(base_ptr, tuned_ptr, n, seed, offs, BASE_KIND, TUNED_KIND)
            member = valid & ((key >> SHIFT_PREV) == prefix)
        digit = ((key >> SHIFT) & (NB - 1)).to(tl.int32)
        counts = tl.histogram(digit, NB, mask=member)
        bins = tl.arange(0, NB)
        tl.atomic_add(hist_ptr + cut * NB + bins, counts.to(tl.int64), mask=counts > 0)


@triton.jit
def _scan_kernel(
    state_ptr,
    hist_ptr,
    slack,
    cap,
    NB: tl.constexpr,
    WIDTH: tl.constexpr,
    SHIFT: tl.constexpr,
    SHARED: tl.constexpr,  # one histogram for both cuts (the top digit)
):
    """Find the bin holding the cut (bins in descending key order) and narrow the cut to it."""
    cut = tl.program_id(0)
    cut_ptr = state_ptr + cut * STATE_FIELDS
    if tl.load(cut_ptr + F_DONE) == 0:
        rank = tl.load(cut_ptr + F_RANK)
        bins = tl.arange(0, NB)
        if SHARED:
            counts = tl.load(hist_ptr + (NB - 1 - bins))  # [NB], largest digit first
        else:
            counts = tl.load(hist_ptr + cut * NB + (NB - 1 - bins))
        upto = tl.cumsum(counts, axis=0)
        ahead = upto - counts
        hit = (ahead <= rank) & (rank < upto)
        digit = NB - 1 - tl.sum(tl.where(hit, bins, 0), axis=0)
        rank = rank - tl.sum(tl.where(hit, ahead, 0), axis=0)
        group = tl.sum(tl.where(hit, counts, 0), axis=0)
        prefix = (tl.load(cut_ptr + F_PREFIX) << WIDTH) | digit.to(tl.int64)
        at_start = rank <= slack
        at_end = (group - rank) <= slack
        # A cut at the group's end is a cut at the start of the prefix below it.
        prefix = tl.where(at_start | ~at_end, prefix, prefix - 1)
        tl.store(cut_ptr + F_PREFIX, prefix)
        tl.store(cut_ptr + F_SHIFT, SHIFT)
        tl.store(cut_ptr + F_RANK, rank)
        tl.store(cut_ptr + F_COUNT, group)
        tl.store(cut_ptr + F_LIMIT, 0)
        tl.store(cut_ptr + F_DONE, (at_start | at_end).to(tl.int64))
        if SHARED:
            tl.store(cut_ptr + F_COMPACT, (group <= cap).to(tl.int64))


@triton.jit
def _index_count_kernel(
    base_ptr,
    tuned_ptr,
    n,
    seed,
    state_ptr,
    counts_ptr,  # [2, n_blocks] int64
    BASE_KIND: tl.constexpr,
    TUNED_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per block of flat indices, how many entries share the cut's key (prefix)."""
    cut = tl.program_id(1)
    cut_ptr = state_ptr + cut * STATE_FIELDS
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if tl.load(cut_ptr + F_DONE) == 0:
        key, valid = _flat_keys(base_ptr, tuned_ptr, n, seed, offs, BASE_KIND, TUNED_KIND)
        member = valid & ((key >> tl.load(cut_ptr + F_SHIFT)) == tl.load(cut_ptr + F_PREFIX))
        total = tl.sum(member.to(tl.int64), axis=0)
        slot = cut.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
        tl.store(counts_ptr + slot, total)


@triton.jit
def _index_pick_kernel(
    base_ptr,
    tuned_ptr,
    n,
    seed,
    state_ptr,
    counts_ptr,
    n_blocks,
    BASE_KIND: tl.constexpr,
    TUNED_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    SCAN: tl.constexpr,
):
    """LIMIT = index of the group member the cut falls on: exactly RANK members come before."""
    cut = tl.program_id(0)
    cut_ptr = state_ptr + cut * STATE_FIELDS
    if tl.load(cut_ptr + F_DONE) == 0:
        rank = tl.load(cut_ptr + F_RANK)
        seen = tl.zeros([], tl.int64)
        block = tl.zeros([], tl.int64)
        local = tl.zeros([], tl.int64)
        for start in range(0, n_blocks, SCAN):
            ids = start + tl.arange(0, SCAN)
            counts = tl.load(counts_ptr + cut * n_blocks + ids, mask=ids < n_blocks, other=0)
            upto = seen + tl.cumsum(counts, axis=0)
            hit = (upto - counts <= rank) & (rank < upto) & (counts > 0)
            block += tl.sum(tl.where(hit, ids, 0).to(tl.int64), axis=0)
            local += tl.sum(tl.where(hit, rank - (upto - counts), 0), axis=0)
            seen += tl.sum(counts, axis=0)
        offs = block * BLOCK + tl.arange(0, BLOCK)
        key, valid = _flat_keys(base_ptr, tuned_ptr, n, seed, offs, BASE_KIND, TUNED_KIND)
        member = valid & ((key >> tl.load(cut_ptr + F_SHIFT)) == tl.load(cut_ptr + F_PREFIX))
        before = tl.cumsum(member.to(tl.int64), axis=0) - 1
        limit = tl.sum(tl.where(member & (before == local), offs, 0), axis=0)
        tl.store(cut_ptr + F_LIMIT, limit)
        tl.store(cut_ptr + F_DONE, 1)


# ----------------------------------------------------------------------------- della ranks


@triton.jit
def _indicator(N_DIMS: tl.constexpr, DIM: tl.constexpr):
    # 0/1 along hypercube dimension DIM (counted from the innermost), broadcastable.
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - DIM - 1) + [2] + [1] * DIM)


@triton.jit
def _compare_swap(key, col, flip, DIM: tl.constexpr, N_DIMS: tl.constexpr):
    # Partner along DIM is the other element of the pair: x ^ (x ^ partner).
    axis: tl.constexpr = N_DIMS - 1 - DIM
    other_key = key ^ tl.xor_sum(key, axis, keep_dims=True)
    other_col = col ^ tl.xor_sum(col, axis, keep_dims=True)
    # "later": this entry comes after its partner in SPEC order (key descending, column ascending).
    later = (key < other_key) | ((key == other_key) & (col > other_col))
    swap = later != (flip ^ _indicator(N_DIMS, DIM)).to(tl.int1)
    return tl.where(swap, other_key, key), tl.where(swap, other_col, col)


@triton.jit
def _sort_rows(key, col, LOG_ROWS: tl.constexpr, LOG_LEN: tl.constexpr):
    """Bitonic sort of each row of [2^LOG_ROWS, 2^LOG_LEN] (key, column) pairs into SPEC order."""
    N_DIMS: tl.constexpr = LOG_ROWS + LOG_LEN
    key = tl.reshape(key, [2] * N_DIMS)
    col = tl.reshape(col, [2] * N_DIMS)
    for stage in tl.static_range(1, LOG_LEN + 1):
        # Runs of 2^stage alternate direction until the last stage merges each whole row.
        flip = _indicator(N_DIMS, stage) if stage < LOG_LEN else 0
        for i in tl.static_range(stage):
            key, col = _compare_swap(key, col, flip, stage - 1 - i, N_DIMS)
    key = tl.reshape(key, [1 << LOG_ROWS, 1 << LOG_LEN])
    return key, tl.reshape(col, [1 << LOG_ROWS, 1 << LOG_LEN])


@triton.jit
def _della_sort_kernel(
    base_ptr,
    tuned_ptr,
    rank_ptr,  # [R, L] int32 out: r(i), 0 = smallest
    kept_part_ptr,  # [R] float64 out: Σ|Δ| over della's kept entries of the row
    R,
    L,
    seed,
    fparams_ptr,
    BASE_KIND: tl.constexpr,
    TUNED_KIND: tl.constexpr,
    LOG_ROWS: tl.constexpr,
    LOG_LEN: tl.constexpr,
    KEPT_SUM: tl.constexpr,
):
    """Per-row ranks for rows that fit one block: sort (key, column), then scatter positions."""
    ROWS: tl.constexpr = 1 << LOG_ROWS
    LEN: tl.constexpr = 1 << LOG_LEN
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, LEN)  # [LEN]
    mask = (rows < R)[:, None] & (cols < L)[None, :]  # [ROWS, LEN]
    idx = rows[:, None] * L + cols[None, :]
    _, delta = _delta(base_ptr, tuned_ptr, idx, mask, BASE_KIND, TUNED_KIND)
    # Padding sorts last: every real key is >= 0.
    key = tl.where(mask, _order_key(delta, idx, seed), -1)
    col = tl.broadcast_to(cols[None, :], [ROWS, LEN])
    if LOG_LEN > 0:
        key, col = _sort_rows(key, col, LOG_ROWS, LOG_LEN)
    rank = (L - 1 - cols)[None, :]  # position p in the sorted row has r = L - 1 - p
    sorted_idx = rows[:, None] * L + col
    tl.store(rank_ptr + sorted_idx, tl.broadcast_to(rank, [ROWS, LEN]).to(tl.int32), mask=mask)
    if KEPT_SUM:
        keep, _ = _della_keep(rank, sorted_idx, L, seed, fparams_ptr)
        magnitude = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        kept = tl.where(keep & mask, magnitude, 0.0).to(tl.float64)
        tl.store(kept_part_ptr + rows, tl.sum(kept, axis=1), mask=rows < R)


@triton.jit
def _della_count_kernel(
    base_ptr,
    tuned_ptr,
    rank_ptr,
    kept_part_ptr,  # [R, n_col_blocks] float64
    R,
    L,
    seed,
    fparams_ptr,
    BASE_KIND: tl.constexpr,
    TUNED_KIND: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    KEPT_SUM: tl.constexpr,
):
    """Per-row ranks for rows too long to sort in one block: count the entries ahead of each."""
    row = tl.program_id(0).to(tl.int64)
    ci = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
    mask_i = ci < L
    idx_i = row * L + ci
    _, delta = _delta(base_ptr, tuned_ptr, idx_i, mask_i, BASE_KIND, TUNED_KIND)
    key_i = _order_key(delta, idx_i, seed)
    ahead = tl.zeros([BLOCK_I], tl.int64)
    for start in range(0, L, BLOCK_J):
        cj = start + tl.arange(0, BLOCK_J)  # [BLOCK_J]
        mask_j = cj < L
        _, delta_j = _delta(base_ptr, tuned_ptr, row * L + cj, mask_j, BASE_KIND, TUNED_KIND)
        key_j = tl.where(mask_j, _order_key(delta_j, row * L + cj, seed), -1)
        first = (key_j[None, :] > key_i[:, None]) | (
            (key_j[None, :] == key_i[:, None]) & (cj[None, :] < ci[:, None])
        )  # [BLOCK_I, BLOCK_J]
        ahead += tl.sum(first.to(tl.int64), axis=1)
    rank = L - 1 - ahead
    tl.store(rank_ptr + idx_i, rank.to(tl.int32), mask=mask_i)
    if KEPT_SUM:
        keep, _ = _della_keep(rank, idx_i, L, seed, fparams_ptr)
        kept = tl.where(keep & mask_i, tl.abs(delta), 0.0).to(tl.float64)
        tl.store(kept_part_ptr + row * tl.num_programs(1) + tl.program_id(1), tl.sum(kept, axis=0))
