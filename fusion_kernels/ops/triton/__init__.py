"""The ``triton`` backend: fused Triton kernels for CUDA (or the CPU under TRITON_INTERPRET=1).

``kernels`` holds the streaming passes and the helpers every kernel shares, ``select`` the
selection kernels (window cuts, della ranks); the host side: ``job`` a tensor's block sizes and
device buffers, ``launcher`` the passes of a merge and ``select_launch`` those of the selection,
``combine`` the merge of several tuned models. Only this file is imported with the package: it
registers the backend, and its ``load`` imports Triton and the launcher the first time the
backend is used, so importing fusion_kernels never imports Triton and never fails without it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from ..registry import Backend, KernelFn, register_backend

HINT = (
    "pip install triton, and a CUDA GPU (or TRITON_INTERPRET=1 to run on CPU tensors through "
    "the interpreter)"
)


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _launcher() -> ModuleType:
    """The launcher module; importing it imports Triton and the kernels (compiling nothing)."""
    return importlib.import_module(".launcher", __name__)


def load() -> KernelFn:
    """The kernel function; ImportError/RuntimeError saying why it cannot run here."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"triton is not installed ({exc})") from exc
    if not (torch.cuda.is_available() or interpreting()):
        raise RuntimeError("no CUDA device, and TRITON_INTERPRET=1 is not set")
    return _launcher().merge_triton


def scores_triton(
    base: torch.Tensor, tuned: torch.Tensor, axis: str
) -> tuple[float, torch.Tensor | None]:
    """Locate's first pass (see :func:`.launcher.scores_triton`); the backend is loaded by then."""
    return _launcher().scores_triton(base, tuned, axis)


def load_multi():
    """The merge of several tuned models (:mod:`.combine`); called once :func:`load` worked."""
    return importlib.import_module(".combine", __name__).merge_multi_triton


def _devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if interpreting() else ("cuda",)


register_backend(
    Backend("triton", load, devices=_devices(), hint=HINT, scores=scores_triton, multi=load_multi)
)

__all__ = ["HINT", "interpreting", "load", "load_multi", "scores_triton"]
