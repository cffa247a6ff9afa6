"""The per-tensor merge op, defined once, and the registry of backends that compute it.

Backends: ``torch`` (the reference, any device), ``cpp`` (fused C++ kernel, CPU), ``triton``
(fused Triton kernels, CUDA, or CPU under ``TRITON_INTERPRET=1``). ``auto`` picks the fastest
available for the tensors' device and falls back to the next one, logging each fallback once;
a backend requested by name that cannot run raises :class:`BackendUnavailableError`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..dtypes import MERGE_DTYPES
from ..errors import BackendUnavailableError, NonFiniteDeltaError, ParameterError
from ..neurons import AXES, default_axis
from ..params import MergeParams, params_for
from .contract import KernelStats
from .reference import change_scores_reference, merge_reference

log = logging.getLogger("fusion_kernels")

#: ``fn(base, tuned, out, name, axis, params) -> KernelStats`` writes the merged tensor into out.
KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, str, str, MergeParams], KernelStats]
#: ``fn(base, tuned, axis) -> (Σ|Δ|, C(j) float64 or None)``: the op's first pass alone, for
#: locate. C(j) has one entry per row (axis row) or column (col); a non-finite Δ gives a
#: non-finite Σ|Δ| (the function has no name to put in an error; change_scores raises).
ScoresFn = Callable[[torch.Tensor, torch.Tensor, str], tuple[float, "torch.Tensor | None"]]

ENV_BACKEND = "FUSION_KERNELS_BACKEND"


@dataclass
class Backend:
    """A registered implementation of the op.

    ``load()`` returns the kernel function or raises ImportError/RuntimeError saying why it cannot
    run; ``devices`` are the device types it serves; ``hint`` says how to get it; ``scores`` is
    its kernel's first pass alone (Σ|Δ| and the neuron sums C(j), see :data:`ScoresFn`), which
    locate streams the checkpoints through. Every built-in backend has one; a backend without
    one gets the torch reference's.
    """

    name: str
    load: Callable[[], KernelFn]
    devices: tuple[str, ...]
    hint: str = ""
    scores: ScoresFn | None = None
    _fn: KernelFn | None = field(default=None, repr=False)
    _error: Exception | None = field(default=None, repr=False)

    def kernel(self) -> KernelFn:
        """The kernel function; raises BackendUnavailableError (with the cause) if it can't run."""
        if not self.is_available():
            raise BackendUnavailableError(
                f"backend {self.name!r} is not available: {self._error}. {self.hint} "
                f"Available here: {', '.join(available_backends()) or 'none'}."
            )
        return self._fn

    def is_available(self) -> bool:
        """Load the backend once; remember why it failed."""
        if self._fn is None and self._error is None:
            try:
                self._fn = self.load()
            except (ImportError, RuntimeError, OSError) as exc:
                self._error = exc
        return self._fn is not None


_REGISTRY: dict[str, Backend] = {}
# Order in which ``auto`` tries backends, per device type.
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "torch")}
_warned: set[str] = set()


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _REGISTRY[backend.name] = backend


def available_backends() -> list[str]:
    """Names of the registered backends that can run here."""
    return [name for name, b in _REGISTRY.items() if b.is_available()]


def registered_backends() -> list[str]:
    return list(_REGISTRY)


def select_backend(requested: str | None, device_type: str) -> Backend:
    """The backend to use for tensors on ``device_type``.

    ``requested`` None means the env var ``FUSION_KERNELS_BACKEND``, else ``auto``.
    """
    requested = requested or os.environ.get(ENV_BACKEND) or "auto"
    if requested != "auto":
        if requested not in _REGISTRY:
            raise BackendUnavailableError(
                f"unknown backend {requested!r}; registered: {', '.join(_REGISTRY)}"
            )
        backend = _REGISTRY[requested]
        backend.kernel()
        if device_type not in backend.devices:
            raise BackendUnavailableError(
                f"backend {requested!r} runs on {', '.join(backend.devices)} tensors, not "
                f"{device_type}; choose --device accordingly or another backend"
            )
        return backend
    for name in _AUTO_ORDER.get(device_type, ("torch",)):
        backend = _REGISTRY.get(name)
        if backend is None:
            continue
        if backend.is_available() and device_type in backend.devices:
            return backend
        if name not in _warned:
            _warned.add(name)
            reason = backend._error or f"does not serve {device_type} tensors"
            log.warning("backend %r unavailable (%s); falling back. %s", name, reason, backend.hint)
    return _REGISTRY["torch"]


@dataclass
class TensorStats(KernelStats):
    """Per-tensor report: the kernel's stats plus name, backend, axis, action and seconds."""

    name: str = ""
    backend: str = ""
    axis: str = "none"
    numel: int = 0
    action: str = "merge"
    seconds: float = 0.0


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
        base, tuned: tensors of one shape, dtype (float32, float16, bfloat16) and device.
        name: the tensor's checkpoint name; seeds the hashes and picks the default neuron axis.
        axis: ``row``, ``col`` or ``none``; default: SPEC's rules for ``name`` (2-D tensors only).
        backend: ``auto`` (default, or ``$FUSION_KERNELS_BACKEND``), ``torch``, ``cpp``, ``triton``.
        out: optional preallocated output (shape of base, dtype of base) to write into.
        params: a :class:`MergeParams`; or give its fields as keywords (``suppress="magnitude"``,
            ``density=0.2``, ``restore="replace"``, ...), or ``method="neu-p-ties"`` for a preset.

    Returns:
        ``(merged, stats)``: merged has base's shape and dtype; stats is a :class:`TensorStats`.
    """
    if params is None:
        params = params_for(param_fields.pop("method", None), **param_fields)
    elif param_fields:
        params = params.replace(**param_fields)
    _check_pair(base, tuned, name)
    axis = resolve_axis(name, base.shape, axis)
    if out is None:
        out = torch.empty_like(base)
    chosen = select_backend(backend, base.device.type)
    start = time.perf_counter()
    try:
        kernel_stats = chosen.kernel()(base, tuned, out, name, axis, params)
        action = "merge"
    except NonFiniteDeltaError:
        if not params.allow_nonfinite:
            raise
        out.copy_(tuned)
        kernel_stats, action = KernelStats(kept=0), "copy-nonfinite"
    stats = TensorStats(
        **vars(kernel_stats),
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
    _check_pair(base, tuned, name)
    axis = resolve_axis(name, base.shape, axis)
    chosen = select_backend(backend, base.device.type)
    total, scores = (chosen.scores or change_scores_reference)(base, tuned, axis)
    if total != total or total in (float("inf"), float("-inf")):
        raise NonFiniteDeltaError(name)
    return total, scores, chosen.name


def _check_pair(base: torch.Tensor, tuned: torch.Tensor, name: str) -> None:
    if base.shape != tuned.shape:
        raise ParameterError(
            f"tensor {name!r}: base shape {tuple(base.shape)} != tuned {tuple(tuned.shape)}"
        )
    if base.dtype not in MERGE_DTYPES or tuned.dtype not in MERGE_DTYPES:
        raise ParameterError(f"tensor {name!r}: dtypes {base.dtype}/{tuned.dtype} are not float")
    if base.device != tuned.device:
        raise ParameterError(f"tensor {name!r}: base on {base.device}, tuned on {tuned.device}")


register_backend(
    Backend(
        "torch", lambda: merge_reference, devices=("cpu", "cuda"), scores=change_scores_reference
    )
)

__all__ = [
    "Backend",
    "KernelStats",
    "TensorStats",
    "available_backends",
    "change_scores",
    "merge_tensor",
    "register_backend",
    "select_backend",
]

# The fast backends register themselves; importing them never imports torch extensions or
# Triton eagerly (their ``load`` does, and keeps the error for when the backend is used).
from . import cpp as _cpp  # noqa: E402, F401
from . import triton as _triton  # noqa: E402, F401
