"""The host side of the selection kernels of :mod:`.select`: the window's cuts resolved on the
device by a radix select over the order key's digits (:func:`_select_window`, with the approx
bins' edges, :func:`_approx_edge_bits`), and della's per-row ranks (:func:`_della_ranks`).
"""

from __future__ import annotations

import torch

from ...params import MergeParams
from ..contract import APPROX_BIN_SHIFT
from . import select as selection
from .job import LEVELS, _cdiv, _Job, on_device


def _select_window(job: _Job, top_hist: torch.Tensor) -> None:
    """Resolve the window's cuts on the device (radix select over the key's digits)."""
    n, dev, block = job.n, job.state.device, job.tuning.flat_block
    cap = min(n, max(job.tuning.candidates_min, n // job.tuning.candidates_div))
    candidates = torch.empty(2, max(cap, 1), dtype=torch.int64, device=dev)
    hist = torch.zeros(len(LEVELS) - 1, 2, 1 << 13, dtype=torch.int64, device=dev)
    shift, width = LEVELS[0]
    job.launch(
        selection._scan_kernel, (2,), job.state, top_hist, 0, cap,
        NB=1 << width, WIDTH=width, SHIFT=shift, SHARED=True, EDGE_BITS=0,
    )  # fmt: skip
    for level, (shift, width) in enumerate(LEVELS[1:], 1):
        job.launch(
            selection._refine_kernel, (_cdiv(n, block), 2),
            job.base, job.tuned, n, job.seed, job.state, hist[level - 1], candidates, cap,
            **job.kinds, BLOCK=block, NB=1 << width, SHIFT_PREV=LEVELS[level - 1][0],
            SHIFT=shift, FIRST=level == 1,
        )  # fmt: skip
        edge_bits = _approx_edge_bits(job.params, shift, width)
        job.launch(
            selection._scan_kernel, (2,), job.state, hist[level - 1], job.plan.cut_slack, cap,
            NB=1 << width, WIDTH=width, SHIFT=shift, SHARED=False, EDGE_BITS=edge_bits,
        )  # fmt: skip
    blocks = _cdiv(n, block)
    counts = torch.empty(2, blocks, dtype=torch.int64, device=dev)
    job.launch(
        selection._index_count_kernel, (blocks, 2),
        job.base, job.tuned, n, job.seed, job.state, counts, **job.kinds, BLOCK=block,
    )  # fmt: skip
    job.launch(
        selection._index_pick_kernel, (2,),
        job.base, job.tuned, n, job.seed, job.state, counts, blocks,
        **job.kinds, BLOCK=block, SCAN=1024,
    )  # fmt: skip


def _approx_edge_bits(params: MergeParams, shift: int, width: int) -> int:
    """The digit bits below the approx bins' edges at the level whose digit spans them, else 0.

    Approx bins are |Δ| bits >> APPROX_BIN_SHIFT, the order key >> (32 + APPROX_BIN_SHIFT).
    """
    edge = 32 + APPROX_BIN_SHIFT
    return edge - shift if params.select == "approx" and shift < edge < shift + width else 0


def _della_ranks(job: _Job, kept_sum: bool) -> torch.Tensor:
    """r(i) into job.rank: per chunk of rows, write the keys, sort each row in global memory
    (O(L log L) work, no shared-memory bound on L), scatter the positions back.

    The keys are inverted (~key: larger SPEC key, smaller sort key) and the sort is stable, so equal
    keys keep ascending column order: SPEC's last tie-break, without room for it in 64 bits.
    (A bitonic sort of whole rows in one block needed 128 KiB of shared memory for rows of 16384
    and minutes of compilation per row length.) Returns the kept Σ|Δ| per (row, block of
    ``rank_block`` sorted positions).
    """
    rows, cols, dev, block = job.rows, job.cols, job.state.device, job.tuning.rank_block
    tiles = _cdiv(cols, block)
    kept = torch.zeros(rows * tiles, dtype=torch.float64, device=dev)
    per_chunk = max(1, min(rows, job.tuning.rank_chunk // cols))
    keys = torch.empty(per_chunk * cols, dtype=torch.int64, device=dev)
    for row0 in range(0, rows, per_chunk):
        count = min(per_chunk, rows - row0)
        chunk = keys[: count * cols]
        job.launch(
            selection._della_keys_kernel, (_cdiv(count * cols, job.tuning.flat_block),),
            job.base, job.tuned, chunk, row0 * cols, count * cols, job.seed, **job.kinds,
            BLOCK=job.tuning.flat_block,
        )  # fmt: skip
        with on_device(dev):
            ordered, order = torch.sort(chunk.view(count, cols), dim=1, stable=True)
        job.launch(
            selection._della_scatter_kernel, (count * tiles,),
            ordered, order, job.rank, kept, row0, cols, tiles, job.seed, job.fparams,
            BLOCK=block, KEPT_SUM=kept_sum,
        )  # fmt: skip
        del ordered, order
    return kept
