"""The per-tensor merge op, defined once: :func:`merge_tensor`, its merge of several tuned models
:func:`merge_tensors`, and locate's :func:`change_scores`.

Backends: ``torch`` (the reference, any device), ``cpp`` (fused C++ kernel, CPU), ``triton``
(fused Triton kernels, CUDA, or CPU under ``TRITON_INTERPRET=1``); :mod:`.registry` chooses
among them. ``auto`` picks the fastest available for the tensors' device and falls back to the
next one, logging each fallback once; a backend requested by name that cannot run raises
:class:`BackendUnavailableError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..dtypes import MERGE_DTYPES, dtype_mismatch
from ..errors import NonFiniteDeltaError, ParameterError
from ..neurons import AXES, default_axis
from ..params import DEFAULT_METHOD, Combine, MergeParams, params_for
from .contract import KernelStats, MultiKernelStats
from .reference import change_scores_reference, merge_reference
from .reference_multi import merge_multi_reference
from .registry import (
    Backend,
    KernelFn,
    MultiKernelFn,
    ScoresFn,
    available_backends,
    register_backend,
    registered_backends,
    requested_backend,
    select_backend,
)

Report = TypeVar("Report")


@dataclass
class TensorReport:
    """What the op adds to a kernel's stats: name, backend, axis, numel, action and seconds.
    Reports list it after the kernel's fields (``class X(TensorReport, KernelStats)``)."""

    name: str = ""
    backend: str = ""
    axis: str = "none"
    numel: int = 0
    action: str = "merge"
    seconds: float = 0.0


@dataclass
class TensorStats(TensorReport, KernelStats):
    """Per-tensor report: the kernel's stats plus name, backend, axis, action and seconds."""


def resolve_axis(name: str, shape: torch.Size, axis: str | None) -> str:
    """The neuron axis: ``axis`` if given, else SPEC's default rules; only 2-D tensors have neurons.

    A default rule that matches a tensor which is not 2-D gives ``none``; an explicit axis errors.
    """
    if axis is None:
        return default_axis(name, shape)
    if axis not in AXES:
        raise ParameterError(f"axis must be row, col or none, got {axis!r}")
    if axis != "none" and len(shape) != 2:
        raise ParameterError(f"tensor {name!r} has shape {tuple(shape)}: axis={axis} needs 2-D")
    return axis


def merge_tensor(
    base: torch.Tensor,
    tuned: torch.Tensor,
    name: str = "",
    *,
    axis: str | None = None,
    backend: str | None = None,
    out: torch.Tensor | None = None,
    params: MergeParams | None = None,
    **param_fields: Any,
) -> tuple[torch.Tensor, TensorStats]:
    """Merge one tensor pair as SPEC.md defines.

    Args:
        base, tuned: tensors of one shape, dtype (float32, float16, bfloat16) and device (a
            mixed pair is refused, as a merge of checkpoints refuses it).
        name: the tensor's checkpoint name; seeds the hashes and picks the default neuron axis.
        axis: ``row``, ``col`` or ``none``; default: SPEC's rules for ``name`` (2-D tensors only).
        backend: ``auto`` (default, or ``$FUSION_KERNELS_BACKEND``), ``torch``, ``cpp``, ``triton``.
        out: optional preallocated output (shape of base, dtype of base) to write into.
        params: a :class:`MergeParams`; or ``method="neu-p-ties"`` for a preset (default
            :data:`~fusion_kernels.params.DEFAULT_METHOD`, Neuron-Fusion, as the CLI's;
            ``method=None``: SPEC's field defaults), with fields given as keywords
            (``suppress="magnitude"``, ``density=0.2``, ...) overriding it, as CLI flags do.

    Returns:
        ``(merged, stats)``: merged has base's shape and dtype; stats is a :class:`TensorStats`.
    """
    if params is None:
        params = params_for(param_fields.pop("method", DEFAULT_METHOD), **param_fields)
    elif param_fields:
        params = params.replace(**param_fields)
    check_pair(base, tuned, name)

    def nonfinite(out: torch.Tensor) -> KernelStats:
        out.copy_(tuned)
        return KernelStats(kept=0)

    return dispatch_merge(
        base, name, axis, out, backend,
        lambda chosen, axis, out: chosen.kernel()(base, tuned, out, name, axis, params),
        nonfinite if params.allow_nonfinite else None,
        TensorStats,
    )  # fmt: skip


def dispatch_merge(
    base: torch.Tensor,
    name: str,
    axis: str | None,
    out: torch.Tensor | None,
    backend: str | None,
    kernel: Callable[[Backend, str, torch.Tensor], Any],
    nonfinite: Callable[[torch.Tensor], Any] | None,
    report: Callable[..., Report],
) -> tuple[torch.Tensor, Report]:
    """What :func:`merge_tensor` and :func:`merge_tensors` share once their inputs are checked:
    resolve the axis, allocate ``out``, choose the backend, run ``kernel(backend, axis, out)``
    (its stats), timed. When a Δ is not finite, ``nonfinite(out)`` (None: refuse, raising
    NonFiniteDeltaError) writes the fallback copy and gives its stats. Returns ``out`` and
    ``report`` built from the stats plus name, backend, axis, numel, action and seconds."""
    axis = resolve_axis(name, base.shape, axis)
    if out is None:
        out = torch.empty_like(base)
    chosen = select_backend(backend, base.device.type)
    start = time.perf_counter()
    try:
        result, action = kernel(chosen, axis, out), "merge"
    except NonFiniteDeltaError:
        if nonfinite is None:
            raise
        result, action = nonfinite(out), "copy-nonfinite"
    stats = report(
        **vars(result),
        name=name,
        backend=chosen.name,
        axis=axis,
        numel=base.numel(),
        action=action,
        seconds=time.perf_counter() - start,
    )
    return out, stats


def change_scores(
    base: torch.Tensor,
    tuned: torch.Tensor,
    name: str = "",
    *,
    axis: str | None = None,
    backend: str | None = None,
) -> tuple[float, torch.Tensor | None, str]:
    """Locate's first pass: ``(Σ|Δ|, C(j) per neuron as float64 or None, backend used)``.

    Computed by the chosen backend's :attr:`Backend.scores` (the first pass of its fused merge:
    one read of base and tuned, sums in float64), chosen as :func:`merge_tensor` chooses.
    C(j) is on the tensors' device; None for axis none. Raises NonFiniteDeltaError naming the
    tensor when Δ has NaN/Inf. ``axis`` defaults to SPEC's rules for ``name``.
    """
    check_pair(base, tuned, name)
    axis = resolve_axis(name, base.shape, axis)
    chosen = select_backend(backend, base.device.type)
    total, scores = (chosen.scores or change_scores_reference)(base, tuned, axis)
    if total != total or total in (float("inf"), float("-inf")):
        raise NonFiniteDeltaError(name)
    return total, scores, chosen.name


def check_pair(base: torch.Tensor, tuned: torch.Tensor, name: str) -> None:
    """Refuse a pair the op cannot merge: shapes, dtypes or devices that differ."""
    if base.shape != tuned.shape:
        raise ParameterError(
            f"tensor {name!r}: base shape {tuple(base.shape)} != tuned {tuple(tuned.shape)}"
        )
    if base.dtype not in MERGE_DTYPES or tuned.dtype not in MERGE_DTYPES:
        raise ParameterError(f"tensor {name!r}: dtypes {base.dtype}/{tuned.dtype} are not float")
    mixed = dtype_mismatch(name, tuned.dtype, base.dtype)
    if mixed:
        raise ParameterError(mixed)
    if base.device != tuned.device:
        raise ParameterError(f"tensor {name!r}: base on {base.device}, tuned on {tuned.device}")


register_backend(
    Backend(
        "torch",
        lambda: merge_reference,
        devices=("cpu", "cuda"),
        scores=change_scores_reference,
        multi=lambda: merge_multi_reference,
    )
)

__all__ = [
    "Backend",
    "Combine",
    "KernelFn",
    "KernelStats",
    "MultiKernelFn",
    "MultiKernelStats",
    "MultiTensorStats",
    "ScoresFn",
    "TensorStats",
    "available_backends",
    "change_scores",
    "merge_tensor",
    "merge_tensors",
    "register_backend",
    "registered_backends",
    "requested_backend",
    "resolve_axis",
    "select_backend",
]

# The fast backends register themselves; importing them never imports torch extensions or
# Triton eagerly (their ``load`` does, and keeps the error for when the backend is used).
from . import cpp as _cpp  # noqa: E402, F401
from . import triton as _triton  # noqa: E402, F401

# The merge of several tuned models uses check_pair and dispatch_merge above.
from .multi import MultiTensorStats, merge_tensors  # noqa: E402
