"""The ``cpp`` backend: the fused C++ CPU kernel (csrc/), registered when its extension loads.

The host side lives here: the tensor's plan (:func:`.contract.plan_tensor`) as the extension's
arguments, and numpy views of the CPU tensors (fp16/bf16 as their int16 bits). The extension does
the rest in a few passes over base and tuned with the GIL released (see ``csrc/merge_kernel.h``);
locate's change scores are its first pass alone (``csrc/scores.h``).
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from ..dtypes import MERGE_DTYPE_NAMES
from ..errors import NonFiniteDeltaError
from ..params import Combine, MergeParams
from .contract import (
    L1_EPS,
    KernelStats,
    MultiKernelStats,
    TensorPlan,
    matrix_shape,
    plan_tensor,
)
from .registry import Backend, KernelFn, MultiKernelFn, register_backend


def load() -> KernelFn:
    """Import the compiled extension; raises ImportError when it was not built."""
    return functools.partial(merge_cpp, importlib.import_module("fusion_kernels._cpp"))


def merge_cpp(
    ext: ModuleType,
    base: torch.Tensor,
    tuned: torch.Tensor,
    out: torch.Tensor,
    name: str,
    axis: str,
    params: MergeParams,
    **options: int,
) -> KernelStats:
    """Write ``cast(f32(base) + Δ', base.dtype)`` into ``out`` (any layout) with the C++ kernel.

    base, tuned: CPU tensors of one shape, float32/float16/bfloat16. When their dtypes differ the
    kernel runs on float32 copies (exact: f32(x) is what SPEC's Δ uses) and ``out`` gets the
    float32 result rounded to base's dtype, as the reference does. ``out`` may be base or tuned
    itself. When Δ is not finite this raises :class:`NonFiniteDeltaError` and ``out``'s
    contents are undefined (the kernel may have written part of it before it knew).

    ``options`` go to the extension as they are, for tests and benchmarks: ``threads`` (0:
    OpenMP's default), ``sample_size`` (keys sampled to bracket the window; -1 picks by size,
    0 uses the radix select alone) and ``collect_cap`` (the largest group the radix select
    collects at once).
    """
    for label, t in (("base", base), ("tuned", tuned), ("out", out)):
        if t.device.type != "cpu":
            raise ValueError(
                f"tensor {name!r}: the cpp backend needs CPU tensors, {label} is on {t.device}"
            )
    if out.shape != base.shape or out.dtype != base.dtype:
        raise ValueError(f"tensor {name!r}: out must have base's shape and dtype")
    if tuned.dtype != base.dtype:
        wide = torch.empty(base.shape, dtype=torch.float32)
        stats = merge_cpp(ext, base.float(), tuned.float(), wide, name, axis, params, **options)
        out.copy_(wide)
        return stats
    base_c = base.detach().contiguous()
    tuned_c = tuned.detach().contiguous()
    target = out if out.is_contiguous() else torch.empty_like(base_c)
    plan = plan_tensor(params, base_c.shape, axis, name)
    args = kernel_args(plan, params, MERGE_DTYPE_NAMES[base_c.dtype]) | options
    result = ext.merge(_bits(base_c), _bits(tuned_c), _bits(target), **args)
    if result["nonfinite"]:
        raise NonFiniteDeltaError(name, int(result["nonfinite"]))
    if target is not out:
        out.copy_(target)
    return KernelStats(
        kept=int(result["kept"]),
        restored=int(result["restored"]),
        fallbacks=int(result["fallbacks"]),
        l1_scale=float(result["l1_scale"]),
    )


def load_multi() -> MultiKernelFn:
    """The merge of several tuned models; ImportError when the extension was not built."""
    return functools.partial(merge_multi_cpp, importlib.import_module("fusion_kernels._cpp"))


def merge_multi_cpp(
    ext: ModuleType,
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    out: torch.Tensor,
    name: str,
    axis: str,
    params: Sequence[MergeParams],
    combine: Combine,
    **options: int,
) -> MultiKernelStats:
    """SPEC's merge of several tuned models into ``out`` with the C++ kernel: each model located
    by merge()'s own passes, then one pass that reads base and every tuned tensor once and
    writes out. Dtypes and layouts as :func:`merge_cpp` takes them (tensors of differing dtypes
    run as float32 copies); ``options``: ``threads``, ``sample_size``, ``collect_cap``."""
    for label, t in (("base", base), ("out", out), *(("tuned", t) for t in tuned)):
        if t.device.type != "cpu":
            raise ValueError(
                f"tensor {name!r}: the cpp backend needs CPU tensors, {label} is on {t.device}"
            )
    if out.shape != base.shape or out.dtype != base.dtype:
        raise ValueError(f"tensor {name!r}: out must have base's shape and dtype")
    if any(t.dtype != base.dtype for t in tuned):
        wide = torch.empty(base.shape, dtype=torch.float32)
        tuned32 = [t.float() for t in tuned]
        stats = merge_multi_cpp(
            ext, base.float(), tuned32, wide, name, axis, params, combine, **options
        )
        out.copy_(wide)
        return stats
    base_c = base.detach().contiguous()
    target = out if out.is_contiguous() else torch.empty_like(base_c)
    dtype = MERGE_DTYPE_NAMES[base_c.dtype]
    models = [
        kernel_args(plan_tensor(p, base_c.shape, axis, name, model), p, dtype)
        | {k: v for k, v in options.items() if k != "threads"}
        for model, p in enumerate(params, start=1)
    ]
    rows, cols = matrix_shape(base_c.shape)
    result = ext.merge_multi(
        _bits(base_c), [_bits(t.detach().contiguous()) for t in tuned], _bits(target),
        models=models, dtype=dtype, rows=rows, cols=cols, consensus=combine.consensus,
        normalize=combine.normalize, lambda_=float(np.float32(combine.lambda_)),
        threads=options.get("threads", 0),
    )  # fmt: skip
    if result["nonfinite"]:
        raise NonFiniteDeltaError(name, int(result["nonfinite"]))
    if target is not out:
        out.copy_(target)
    return MultiKernelStats(
        models=[_stats(r) for r in result["models"]], dropped=int(result["dropped"])
    )


def _stats(result: dict) -> KernelStats:
    return KernelStats(
        kept=int(result["kept"]),
        restored=int(result["restored"]),
        fallbacks=int(result["fallbacks"]),
        l1_scale=float(result["l1_scale"]),
    )


class ChunkedMergeCpp:
    """The C++ kernel's merge of one tensor streamed through in chunks of whole rows, for
    tensors larger than the memory budget (``csrc/chunked.h``); the bytes are :func:`merge_cpp`'s.

    The caller iterates :meth:`passes` and, within each pass, feeds every chunk of the tensor in
    row order with :meth:`feed` (``out`` only in the ``write`` pass); then :meth:`stats`. Rows are
    the tensor's leading dimensions flattened (a 1-D tensor is one row).

    Args:
        plan: the tensor's :func:`~.contract.plan_tensor` (of the block merged, for a grown
            vocabulary): the same plan :func:`merge_cpp` builds for the whole tensor.
        params: the tensor's parameters, as for :func:`merge_cpp`; ``options`` too.
        base_dtype, tuned_dtype: the inputs' dtypes; when they differ the chunks run as float32
            and the result is rounded to base's dtype, as :func:`merge_cpp` does.
        name: the tensor's name, for errors.
    """

    def __init__(
        self,
        plan: TensorPlan,
        params: MergeParams,
        base_dtype: torch.dtype,
        tuned_dtype: torch.dtype,
        name: str,
        **options: int,
    ):
        ext = importlib.import_module("fusion_kernels._cpp")
        self.name = name
        self.kernel_dtype = base_dtype if tuned_dtype == base_dtype else torch.float32
        self.rows, self.cols = plan.rows, plan.cols
        args = kernel_args(plan, params, MERGE_DTYPE_NAMES[self.kernel_dtype]) | options
        self._op = ext.ChunkedMerge(**args)

    def passes(self):
        """The names of the passes, each to be fed every chunk before asking for the next."""
        while (name := self._op.next()) != "done":
            yield name

    def feed(self, base: torch.Tensor, tuned: torch.Tensor, out: torch.Tensor | None, row: int):
        """Rows ``[row, row + len)`` of base and tuned (CPU, row-major: ``len x cols`` entries);
        in the write pass ``out`` (base's dtype, same shape) receives the merged rows."""
        if base.dtype != self.kernel_dtype:
            base = base.float()
        if tuned.dtype != self.kernel_dtype:
            tuned = tuned.float()
        target = out
        if out is not None and (out.dtype != self.kernel_dtype or not out.is_contiguous()):
            target = torch.empty(out.shape, dtype=self.kernel_dtype)
        self._op.feed(
            _bits(base.contiguous()),
            _bits(tuned.contiguous()),
            None if target is None else _bits(target),
            row,
        )
        if target is not out:
            out.copy_(target)

    def stats(self) -> KernelStats:
        """What the merge reports; raises :class:`NonFiniteDeltaError` when Δ was not finite
        (then nothing was written: the first pass finds it)."""
        result = self._op.result()
        if result["nonfinite"]:
            raise NonFiniteDeltaError(self.name, int(result["nonfinite"]))
        return KernelStats(
            kept=int(result["kept"]),
            restored=int(result["restored"]),
            fallbacks=int(result["fallbacks"]),
            l1_scale=float(result["l1_scale"]),
        )


def scores_cpp(
    base: torch.Tensor, tuned: torch.Tensor, axis: str, *, threads: int = 0
) -> tuple[float, torch.Tensor | None]:
    """Locate's first pass with the C++ kernel: ``(Σ|Δ|, C(j) as float64 or None)``.

    base, tuned: CPU tensors of one shape, float32/float16/bfloat16, any layout; mixed dtypes
    run on float32 copies (exact, as in :func:`merge_cpp`). C(j) has one entry per row (axis
    row) or column (col) of the 2-D tensor; None for axis none. When Δ is not finite the total
    is NaN, which :func:`~fusion_kernels.ops.change_scores` turns into NonFiniteDeltaError.
    ``threads``: 0 for OpenMP's default.
    """
    ext = importlib.import_module("fusion_kernels._cpp")
    for label, t in (("base", base), ("tuned", tuned)):
        if t.device.type != "cpu":
            raise ValueError(f"the cpp backend needs CPU tensors, {label} is on {t.device}")
    if tuned.dtype != base.dtype:
        base, tuned = base.float(), tuned.float()
    base_c, tuned_c = base.detach().contiguous(), tuned.detach().contiguous()
    rows, cols = matrix_shape(base_c.shape)
    result = ext.scores(
        _bits(base_c), _bits(tuned_c), dtype=MERGE_DTYPE_NAMES[base_c.dtype], rows=rows, cols=cols,
        axis=axis, threads=threads,
    )  # fmt: skip
    if result["nonfinite"]:
        return math.nan, None
    return float(result["total"]), None if axis == "none" else torch.from_numpy(result["scores"])


def _bits(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor; 16-bit floats as their int16 bits."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.detach().numpy()


def kernel_args(plan: TensorPlan, params: MergeParams, dtype: str) -> dict:
    """The extension's keyword arguments: the plan, and the parameters the kernel reads itself."""
    return dict(
        dtype=dtype,
        rows=plan.rows,
        cols=plan.cols,
        axis=plan.axis,
        suppress=params.suppress,
        rescale=plan.rescale,
        restore=params.restore,
        window_start=plan.window_start,
        window_len=plan.window_len,
        drop_threshold=plan.drop_threshold,
        random_inverse=plan.random_scale,
        density=float(params.density),
        epsilon=float(params.epsilon),
        weight=plan.weight,
        restored_neurons=plan.restored_neurons,
        tensor_seed=plan.tensor_seed,
        approx=params.select == "approx",
        approx_tolerance=plan.approx_slack,
        l1_eps=L1_EPS,
    )


register_backend(
    Backend(
        "cpp",
        load,
        devices=("cpu",),
        scores=scores_cpp,
        multi=load_multi,
        chunked=ChunkedMergeCpp,
        hint="Build it with `pip install -e .` (needs a C++ compiler with OpenMP); "
        "FUSION_KERNELS_SKIP_CPP_BUILD=1 skips it.",
    )
)
