"""The op's front door for several tuned models over one base: :func:`merge_tensors` (SPEC.md
"Several tuned models"), dispatched to a backend's ``multi`` kernel as :func:`merge_tensor`
dispatches to its kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ParameterError
from ..params import DEFAULT_METHOD, Combine, MergeParams, combine_for, params_for
from . import TensorReport, check_pair, dispatch_merge
from .contract import KernelStats, MultiKernelStats


@dataclass
class MultiTensorStats(TensorReport, MultiKernelStats):
    """Per-tensor report of a merge of several tuned models: each model's kernel stats and the
    consensus drops, plus name, backend, axis, action and seconds."""


def merge_tensors(
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    name: str = "",
    *,
    axis: str | None = None,
    backend: str | None = None,
    out: torch.Tensor | None = None,
    params: MergeParams | Sequence[MergeParams] | None = None,
    combine: Combine | None = None,
    **param_fields: Any,
) -> tuple[torch.Tensor, MultiTensorStats]:
    """Merge one tensor of base with its counterparts in N ≥ 1 tuned models, as SPEC.md's
    "Several tuned models" defines.

    Args:
        base: the base tensor (float32, float16 or bfloat16).
        tuned: ``[tuned_1 … tuned_N]``, each of base's shape and device; tuned_1's name is
            ``name``, which seeds every model's hashes (model t's seed mixes in t).
        name, axis, backend, out: as for :func:`~fusion_kernels.ops.merge_tensor`.
        params: one :class:`MergeParams` for every model, or one per model; a model's
            ``weight`` is its w_t. ``seed`` and ``allow_nonfinite`` belong to the whole merge and
            must be equal in all. Or give fields as keywords, ``method=...`` for a preset
            (default :data:`~fusion_kernels.params.DEFAULT_METHOD`, as for ``merge_tensor``).
        combine: consensus, normalize and λ; default: the preset's for N models
            (:func:`~fusion_kernels.params.combine_for`), else none, off, 1.

    Returns:
        ``(merged, stats)``: merged has base's shape and dtype. When a model's Δ is not finite
        this raises NonFiniteDeltaError, or, with ``allow_nonfinite``, copies tuned_1.
    """
    # As merge_tensor: without params or a method, the CLI's default preset.
    method = param_fields.pop("method", DEFAULT_METHOD if params is None else None)
    per_model = _per_model_params(len(tuned), params, method, param_fields)
    combine = (combine or combine_for(method, len(tuned))).validated()
    for t in tuned:
        check_pair(base, t, name)

    def nonfinite(out: torch.Tensor) -> MultiKernelStats:
        out.copy_(tuned[0])
        return MultiKernelStats(models=[KernelStats(kept=0) for _ in tuned])

    return dispatch_merge(
        base, name, axis, out, backend,
        lambda chosen, axis, out: chosen.multi_kernel()(
            base, tuned, out, name, axis, per_model, combine
        ),
        nonfinite if per_model[0].allow_nonfinite else None,
        MultiTensorStats,
    )  # fmt: skip


def _per_model_params(
    models: int,
    params: MergeParams | Sequence[MergeParams] | None,
    method: str | None,
    fields: dict[str, Any],
) -> list[MergeParams]:
    """One validated MergeParams per model; the merge-level fields equal in all."""
    if models < 1:
        raise ParameterError("a merge needs at least one tuned model")
    if params is None:
        params = params_for(method, **fields)
    elif fields:
        raise ParameterError("give params or parameter keywords, not both")
    per_model = [params] * models if isinstance(params, MergeParams) else list(params)
    if len(per_model) != models:
        raise ParameterError(
            f"{models} tuned models need {models} parameter sets, got {len(per_model)}"
        )
    per_model = [p.validated() for p in per_model]
    for field in ("seed", "allow_nonfinite"):
        values = {getattr(p, field) for p in per_model}
        if len(values) > 1:
            raise ParameterError(f"{field} belongs to the whole merge: the models give {values}")
    return per_model
