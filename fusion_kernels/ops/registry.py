"""The registry of backends that compute the op, and how one is chosen.

A backend registers a :class:`Backend` whose ``load`` imports what it needs only when it is first
used, so registering never imports a compiled extension or Triton and never fails. ``auto`` picks
the fastest available backend for the tensors' device and falls back to the next one, logging each
fallback once; a backend requested by name that cannot run raises
:class:`~fusion_kernels.errors.BackendUnavailableError` saying why, what is available and how to
get it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BackendUnavailableError
from ..params import Combine, MergeParams
from .contract import KernelStats, MultiKernelStats

log = logging.getLogger("fusion_kernels")

#: ``fn(base, tuned, out, name, axis, params) -> KernelStats`` writes the merged tensor into out.
KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, str, str, MergeParams], KernelStats]
#: ``fn(base, tuned, axis) -> (Σ|Δ|, C(j) float64 or None)``: the op's first pass alone, for
#: locate. C(j) has one entry per row (axis row) or column (col); a non-finite Δ gives a
#: non-finite Σ|Δ| (the function has no name to put in an error; change_scores raises).
ScoresFn = Callable[[torch.Tensor, torch.Tensor, str], tuple[float, "torch.Tensor | None"]]
#: ``fn(base, [tuned_1 … tuned_N], out, name, axis, [params_1 … params_N], combine) ->
#: MultiKernelStats`` writes the merge of several tuned models into out (SPEC "Several tuned
#: models").
MultiKernelFn = Callable[
    [torch.Tensor, Sequence[torch.Tensor], torch.Tensor, str, str, Sequence[MergeParams], Combine],
    MultiKernelStats,
]
#: ``factory(plan, params, base_dtype, tuned_dtype, name)``: the op of one tensor streamed
#: through in chunks of rows, for tensors over the memory budget; the bytes are the kernel's
#: (see :class:`~fusion_kernels.ops.cpp.ChunkedMergeCpp` for the protocol: ``passes``,
#: ``feed``, ``stats``).
ChunkedOpFactory = Callable[..., Any]

ENV_BACKEND = "FUSION_KERNELS_BACKEND"


@dataclass
class Backend:
    """A registered implementation of the op.

    ``load()`` returns the kernel function or raises ImportError/RuntimeError saying why it cannot
    run; ``devices`` are the device types it serves; ``hint`` says how to get it; ``scores`` is
    its kernel's first pass alone (Σ|Δ| and the neuron sums C(j), see :data:`ScoresFn`), which
    locate streams the checkpoints through. Every built-in backend has one; a backend without
    one gets the torch reference's. ``chunked`` builds its op over a tensor streamed in chunks
    of rows (:data:`ChunkedOpFactory`); a backend without one merges whole tensors only.
    """

    name: str
    load: Callable[[], KernelFn]
    devices: tuple[str, ...]
    hint: str = ""
    scores: ScoresFn | None = None
    multi: Callable[[], MultiKernelFn] | None = None
    chunked: ChunkedOpFactory | None = None
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

    def multi_kernel(self) -> MultiKernelFn:
        """The merge of several tuned models; raises BackendUnavailableError when the backend
        cannot run or has none."""
        self.kernel()
        if self.multi is None:
            raise BackendUnavailableError(
                f"backend {self.name!r} cannot merge several tuned models; "
                f"choose {', '.join(n for n, b in _REGISTRY.items() if b.multi) or 'torch'}"
            )
        return self.multi()

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
    """Names of every registered backend, available here or not."""
    return list(_REGISTRY)


def requested_backend(requested: str | None) -> str:
    """The backend name in force: ``requested``, else ``$FUSION_KERNELS_BACKEND``, else ``auto``;
    raises :class:`BackendUnavailableError` for a name no backend has, saying where it came from.
    """
    source = "backend"
    if not requested:
        requested, source = os.environ.get(ENV_BACKEND) or "auto", f"${ENV_BACKEND}"
    if requested != "auto" and requested not in _REGISTRY:
        fix = f"; unset ${ENV_BACKEND} or set it to one of them" if source != "backend" else ""
        raise BackendUnavailableError(
            f"{source} {requested!r} is not a backend; registered: auto, "
            f"{', '.join(_REGISTRY)}{fix}"
        )
    return requested


def select_backend(requested: str | None, device_type: str) -> Backend:
    """The backend to use for tensors on ``device_type``.

    ``requested`` None means the env var ``FUSION_KERNELS_BACKEND``, else ``auto``.
    """
    requested = requested_backend(requested)
    if requested != "auto":
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


__all__ = [
    "ENV_BACKEND",
    "Backend",
    "ChunkedOpFactory",
    "KernelFn",
    "MultiKernelFn",
    "ScoresFn",
    "available_backends",
    "register_backend",
    "registered_backends",
    "requested_backend",
    "select_backend",
]
