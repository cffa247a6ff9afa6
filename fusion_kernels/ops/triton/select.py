"""Triton kernels that select: the window's cuts by radix select over the SPEC order, and
della's per-row ranks. Launched from :mod:`.select_launch`; the streaming passes and the helpers
they share (Δ, the order key, the cut state) are in :mod:`.kernels`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .codes import (
    F_CANDIDATES,
    F_COMPACT,
    F_COUNT,
    F_DONE,
    F_LIMIT,
    F_PREFIX,
    F_RANK,
    F_SHIFT,
    STATE_FIELDS,
)
from .kernels import (
    _della_keep,
    _delta,
    _order_key,
)

# ----------------------------------------------------------------------------- window selection
#
# magnitude/breadcrumbs keep positions [t, t + k) of the SPEC order. Each nontrivial cut is found
# by radix selection on the 63-bit key: a histogram of the top digit (in _sums_kernel), then one
# _refine/_scan pair per further digit. _scan picks the digit of the bin holding the cut and marks
# the cut DONE as soon as it falls on a bin edge, or, for select="approx", within `slack` entries of
# an approx bin's edge (SPEC "Selection modes"), after which every later launch for that cut
# returns at once. The first refinement also copies the keys
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
    EDGE_BITS: tl.constexpr,  # select=approx: low digit bits below the approx bins' edges; 0: none
):
    """Find the bin holding the cut (bins in descending key order) and narrow the cut to it.

    With EDGE_BITS, the digit's bins group into approx bins (contract.approx_cut): the cut moves
    to the nearer edge of its approx bin (the start on a tie) when that is within ``slack``.
    """
    cut = tl.program_id(0)
    cut_ptr = state_ptr + cut * STATE_FIELDS
    if tl.load(cut_ptr + F_DONE) == 0:
        rank = tl.load(cut_ptr + F_RANK)
        bins = tl.arange(0, NB)
        if SHARED:
            counts = tl.load(hist_ptr + (NB - 1 - bins))  # [NB], largest digit first
        else:
            counts = tl.load(hist_ptr + cut * NB + (NB - 1 - bins))
        digit, within, group = _bin_of(counts, rank, NB)
        old_prefix = tl.load(cut_ptr + F_PREFIX)
        prefix = (old_prefix << WIDTH) | digit.to(tl.int64)
        at_start = within == 0  # a cut on a bin edge is resolved there
        shift = tl.zeros([], tl.int64) + SHIFT
        done = at_start
        if EDGE_BITS > 0:
            coarse = tl.sum(tl.reshape(counts, [NB >> EDGE_BITS, 1 << EDGE_BITS]), axis=1)
            c_digit, c_within, c_group = _bin_of(coarse, rank, NB >> EDGE_BITS)
            to_start = c_within <= c_group - c_within
            moved = tl.minimum(c_within, c_group - c_within) <= slack
            c_prefix = (old_prefix << (WIDTH - EDGE_BITS)) | c_digit.to(tl.int64)
            # A cut at an approx bin's end is a cut at the start of the prefix below it.
            c_prefix = tl.where(to_start, c_prefix, c_prefix - 1)
            prefix = tl.where(moved, c_prefix, prefix)
            shift = tl.where(moved, shift + EDGE_BITS, shift)
            done = done | moved
        tl.store(cut_ptr + F_PREFIX, prefix)
        tl.store(cut_ptr + F_SHIFT, shift)
        tl.store(cut_ptr + F_RANK, within)
        tl.store(cut_ptr + F_COUNT, group)
        tl.store(cut_ptr + F_LIMIT, 0)
        tl.store(cut_ptr + F_DONE, done.to(tl.int64))
        if SHARED:
            tl.store(cut_ptr + F_COMPACT, (group <= cap).to(tl.int64))


@triton.jit
def _bin_of(counts, rank, NB: tl.constexpr):
    """``(digit, rank within, count)`` of the bin holding ``rank``; counts are largest first."""
    bins = tl.arange(0, NB)
    upto = tl.cumsum(counts, axis=0)
    ahead = upto - counts
    hit = (ahead <= rank) & (rank < upto)
    digit = NB - 1 - tl.sum(tl.where(hit, bins, 0), axis=0)
    within = rank - tl.sum(tl.where(hit, ahead, 0), axis=0)
    return digit, within, tl.sum(tl.where(hit, counts, 0), axis=0)


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


# _della_keys writes each entry's key, inverted (~key = −1 − key, so ascending order is SPEC
# order), a stable segmented sort orders every row in global memory (ties keep ascending column
# order, SPEC's last tie-break), and _della_scatter writes position p's rank L − 1 − p to the
# entry that landed there. No block holds a whole row, so any L fits any GPU.


@triton.jit
def _della_keys_kernel(
    base_ptr,
    tuned_ptr,
    keys_ptr,  # [count] int64 out: inverted order keys of entries start .. start + count
    start,
    count,
    seed,
    BASE_KIND: tl.constexpr,
    TUNED_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Inverted order keys of a chunk of whole rows."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < count
    idx = start + offs
    _, delta = _delta(base_ptr, tuned_ptr, idx, valid, BASE_KIND, TUNED_KIND)
    tl.store(keys_ptr + offs, ~_order_key(delta, idx, seed), mask=valid)


@triton.jit
def _della_scatter_kernel(
    ordered_ptr,  # [rows, L] int64: each row's inverted keys, sorted ascending
    order_ptr,  # [rows, L] int64: the column each sorted key came from
    rank_ptr,  # [R, L] int32 out: r(i)
    kept_part_ptr,  # [R, tiles] float64 out: Σ|Δ| over della's kept entries per tile
    row0,  # the chunk's first row
    L,
    tiles,  # programs per row
    seed,
    fparams_ptr,
    BLOCK: tl.constexpr,
    KEPT_SUM: tl.constexpr,
):
    """Ranks of BLOCK sorted positions of one row, scattered to their entries."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // tiles
    tile = pid % tiles
    pos = tile * BLOCK + tl.arange(0, BLOCK)
    mask = pos < L
    col = tl.load(order_ptr + row * L + pos, mask=mask, other=0)
    rank = L - 1 - pos
    idx = (row0 + row) * L + col
    tl.store(rank_ptr + idx, rank.to(tl.int32), mask=mask)
    if KEPT_SUM:
        key = ~tl.load(ordered_ptr + row * L + pos, mask=mask, other=-1)
        keep, _ = _della_keep(rank, idx, L, seed, fparams_ptr)
        magnitude = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        kept = tl.where(keep & mask, magnitude, 0.0).to(tl.float64)
        tl.store(kept_part_ptr + (row0 + row) * tiles + tile, tl.sum(kept, axis=0))
