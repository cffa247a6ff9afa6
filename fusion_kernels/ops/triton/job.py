"""One tensor's job on the ``triton`` backend: its plan, the block sizes the launches use
(:class:`Tuning`) and the small device buffers its passes share (:class:`_Job`, made by
:func:`_prepare`). Every host module of the backend launches through :meth:`_Job.launch`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ...params import MergeParams
from ..contract import L1_EPS, TensorPlan
from . import codes


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
    state: torch.Tensor  # [2, 8] int64: the window's two cuts (codes.F_* fields)
    scale: torch.Tensor  # [1] float32: scale of random/della's kept entries
    fparams: torch.Tensor  # float64 parameters (codes.P_* fields)
    rank: torch.Tensor  # [n] int32 della ranks
    stats: torch.Tensor  # [3] int64 counters (codes.S_*)

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
    fparams = codes.float_params(params.density, params.epsilon, plan.cols, L1_EPS)
    cuts = [codes.cut_state(cut, n) for cut in plan.window_cuts]
    return _Job(
        base=_kernel_view(base.contiguous()),
        tuned=_kernel_view(tuned.contiguous()),
        out=_kernel_view(out),
        kinds=dict(BASE_KIND=codes.KINDS[base.dtype], TUNED_KIND=codes.KINDS[tuned.dtype]),
        plan=plan,
        params=params,
        tuning=_tuning(dev),
        method=codes.METHODS[params.suppress],
        rescale=codes.RESCALES[plan.rescale],
        state=torch.tensor(cuts, dtype=torch.int64).to(dev),
        scale=torch.tensor([plan.random_scale], dtype=torch.float32, device=dev),
        fparams=torch.tensor(fparams, dtype=torch.float64, device=dev),
        rank=torch.empty(n if params.suppress == "della" else 1, dtype=torch.int32, device=dev),
        stats=torch.zeros(3, dtype=torch.int64, device=dev),
    )
