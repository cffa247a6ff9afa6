"""The host side of the ``triton`` backend: it reads the tensor's plan, allocates the device
buffers, picks the grids and launches the kernels of :mod:`.kernels` and :mod:`.select`. The
package imports this module (and with it Triton) only when the backend is first used.
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

import contextlib
from dataclasses import dataclass

import torch

from ...errors import NonFiniteDeltaError
from ...params import MergeParams
from ..contract import APPROX_BIN_SHIFT, L1_EPS, KernelStats, TensorPlan, plan_tensor
from ..reference import change_scores_reference, merge_reference
from . import kernels
from . import select as selection


@dataclass(frozen=True)
class Tuning:
    """Block sizes. The interpreter's are small so tiny test tensors still span many blocks."""

    tile: int  # elements per [BLOCK_R, BLOCK_C] tile of the sums and write passes
    max_block_c: int
    flat_block: int  # elements per program of the selection passes
    rank_block: int  # positions per program of the della rank scatter
    rank_chunk: int  # entries (whole rows, at least one) sorted per global della sort
    neuron_block: int
    candidates_min: int  # the candidate key buffer holds max(min, n // div) keys per cut
    candidates_div: int
    programs: int  # how many programs the reductions aim for
    num_warps: int


# `programs` is a constant, not a multiple of the SM count: it sets how the float64 sums are split
# into partials (and so their summation order), and the l1 scale and Neu-S's C/C' round from those
# sums. A constant makes the output bytes a function of the shape alone, the same on every GPU.
# (The cpp backend's order follows its thread count; a float64 sum rounds differently in another
# order only in its last bits, so those scales agree with it unless that lands on a float32
# rounding boundary: at most one ulp, as SPEC allows.)
# The della global sort keeps 24 bytes per entry (key, sorted key, index): 2^24 entries, 384 MiB.
# Tiles of 2048 at 8 warps (8 entries a thread): at 4096 the heaviest sums/write variants took up
# to 184 registers a thread (one 256-thread block per SM); at 2048 at most 120 (two blocks), most
# far fewer, with at most 16 bytes spilled (tests/test_triton_compile.py checks all of it).
CUDA_TUNING = Tuning(2048, 512, 4096, 1024, 1 << 24, 64, 1 << 16, 8, 512, 8)
INTERPRETER_TUNING = Tuning(256, 32, 256, 16, 96, 16, 0, 4, 8, 4)

# The digits of the 63-bit order key, top first, as (shift, width). The top one (exponent and
# three mantissa bits of |Δ|) is histogrammed by the sums pass.
LEVELS = ((52, 11), (39, 13), (26, 13), (13, 13), (0, 13))


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _kernel_view(t: torch.Tensor) -> torch.Tensor:
    # bf16 reaches the kernels as its int16 bits (see kernels._load_f32/_store_f32).
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _tuning(device: torch.device) -> Tuning:
    # Never the device's properties (see CUDA_TUNING): the same shape runs the same way anywhere.
    return CUDA_TUNING if device.type == "cuda" else INTERPRETER_TUNING


def on_device(device: torch.device):
    """Make ``device`` current for the block: Triton launches on the current CUDA device (and
    its current stream), whatever device the tensors live on."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@dataclass
class _Job:
    """One tensor, its plan, and the small device buffers its passes share."""

    base: torch.Tensor
    tuned: torch.Tensor
    out: torch.Tensor
    kinds: dict
    plan: TensorPlan
    params: MergeParams
    tuning: Tuning
    method: int
    rescale: int
    state: torch.Tensor  # [2, 8] int64: the window's two cuts (kernels.F_* fields)
    scale: torch.Tensor  # [1] float32: scale of random/della's kept entries
    fparams: torch.Tensor  # float64 parameters (kernels.P_* fields)
    rank: torch.Tensor  # [n] int32 della ranks
    stats: torch.Tensor  # [3] int64 counters (kernels.S_*)

    # The plan's numbers under the names the launches use.
    @property
    def rows(self) -> int:
        return self.plan.rows

    @property
    def cols(self) -> int:
        return self.plan.cols

    @property
    def n(self) -> int:
        return self.plan.n

    @property
    def seed(self) -> int:
        return self.plan.tensor_seed

    @property
    def threshold(self) -> int:
        return self.plan.drop_threshold

    def method_args(self) -> tuple:
        return (self.state, self.threshold, self.scale, self.rank, self.fparams)

    def tile(self) -> tuple[int, int]:
        block_c = min(_pow2(self.cols), self.tuning.max_block_c)
        return min(_pow2(self.rows), max(1, self.tuning.tile // block_c)), block_c

    def launch(self, kernel, grid, *args, num_warps=None, **meta) -> None:
        # No FMA contraction: the reference rounds every product before adding.
        warps = num_warps or self.tuning.num_warps
        with on_device(self.state.device):
            kernel[grid](*args, **meta, num_warps=warps, enable_fp_fusion=False)


def _prepare(base, tuned, out, plan: TensorPlan, params: MergeParams) -> _Job:
    dev = base.device
    n = plan.n
    fparams = kernels.float_params(params.density, params.epsilon, plan.cols, L1_EPS)
    cuts = [kernels.cut_state(cut, n) for cut in plan.window_cuts]
    return _Job(
        base=_kernel_view(base.contiguous()),
        tuned=_kernel_view(tuned.contiguous()),
        out=_kernel_view(out),
        kinds=dict(BASE_KIND=kernels.KINDS[base.dtype], TUNED_KIND=kernels.KINDS[tuned.dtype]),
        plan=plan,
        params=params,
        tuning=_tuning(dev),
        method=kernels.METHODS[params.suppress],
        rescale=kernels.RESCALES[plan.rescale],
        state=torch.tensor(cuts, dtype=torch.int64).to(dev),
        scale=torch.tensor([plan.random_scale], dtype=torch.float32, device=dev),
        fparams=torch.tensor(fparams, dtype=torch.float64, device=dev),
        rank=torch.empty(n if params.suppress == "della" else 1, dtype=torch.int32, device=dev),
        stats=torch.zeros(3, dtype=torch.int64, device=dev),
    )


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
            kernels._reduce_partials_kernel, (_cdiv(n_neurons, block),),
            part, result.neurons, splits, n_neurons, BLOCK=block,
        )  # fmt: skip
    return result


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


def _select_neurons(job: _Job, change, kept_change, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron write mode (int8) and rescale factor (float32); counts the fallbacks."""
    n_neurons, block = change.numel(), job.tuning.neuron_block
    mode = torch.empty(n_neurons, dtype=torch.int8, device=change.device)
    factor = torch.ones(n_neurons, dtype=torch.float32, device=change.device)
    job.launch(
        kernels._neurons_kernel, (_cdiv(n_neurons, block),),
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
    mode: torch.Tensor  # [neurons] int8 write mode per neuron (kernels.N_*)
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
    l1 = job.rescale == kernels.R_L1.value
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
            kernels._l1_scale_kernel, (1,),
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
