"""mergekit's sparsification computed by the fused op, and :func:`install`, which plugs both it
and the ``neuron_fusion`` method into the running mergekit.

``install(accelerate=True)`` replaces the ``sparsify`` dispatch that mergekit's task-arithmetic
family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) calls with
:func:`accelerated_sparsify`, which runs the fused op on ``(zeros, delta)``. Counts follow
mergekit's rules (they are the SPEC's), ties are broken by the SPEC order, and the random methods
draw from the SPEC's counter-based hash, so their masks are deterministic.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import MERGE_DTYPES
from ..errors import NonFiniteDeltaError, ParameterError
from ..ops import merge_tensor, registered_backends
from ..ops.contract import l1_scale
from ..params import MergeParams
from .method import register_method, require_mergekit, settings

#: mergekit's own functions while ours replace them (empty: not accelerated).
_originals: dict[str, Any] = {}


@dataclass
class _TensorScope:
    """The tensor mergekit is merging; sparsify calls within it are numbered per input."""

    name: str
    calls: int = 0

    def next_name(self) -> str:
        # The first input keeps the plain name, so one tuned model's masks equal our CLI's; later
        # inputs of a multi-model merge get their own hash streams.
        index, self.calls = self.calls, self.calls + 1
        return self.name if index == 0 else f"{self.name}#{index}"


_current: contextvars.ContextVar[_TensorScope | None] = contextvars.ContextVar(
    "fusion_kernels_mergekit_tensor", default=None
)


def accelerated_sparsify(
    tensor: torch.Tensor,
    density: float,
    method: Any,
    gamma: float = 0,
    epsilon: float = 0,
    rescale_norm: Any = None,
) -> torch.Tensor:
    """mergekit's ``sparsify`` with the same signature and semantics, computed by the fused op.

    - ``magnitude``: keeps ``max(1, int(K·n))`` entries (all for K ≥ 1, none for K ≤ 0);
    - ``magnitude_outliers``: drops the ``min(int(γ·n), n − int(K·n))`` largest, keeps the next
      ``int(K·n)``;
    - ``random``: keeps entry i iff ``u(i) < K`` (SPEC's counter-based draw);
    - ``della_magprune``: keep probability ramps from K − ε to K + ε by rank within each row;
    - ``rescale_norm=l1`` matches the L1 norm (mergekit's rule, sums in float64).

    Ties in |Δ| are broken by the SPEC order instead of ``argsort``'s; della rows of length 1 keep
    with probability K (mergekit's 0/0 rank fails there). Inputs outside what the op covers
    (other norms, non-float tensors, della on tensors of more than 2 dimensions, parameters out
    of the op's range, NaN/Inf deltas) go to mergekit's own function, so they behave exactly as
    in stock mergekit, errors included.
    """
    require_mergekit()
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    kind = SparsificationMethod(method)

    def stock() -> torch.Tensor:
        return sparsify(tensor, density, kind, gamma, epsilon, rescale_norm)

    if rescale_norm is not None and RescaleNorm(rescale_norm) != RescaleNorm.l1:
        return stock()
    if tensor.dtype not in MERGE_DTYPES or tensor.numel() == 0:
        return stock()
    if kind == SparsificationMethod.della_magprune and tensor.dim() > 2:
        # mergekit ranks along dim 1 of such tensors; SPEC's rows are the last dimension.
        return stock()
    if density >= 1:
        return tensor
    if density <= 0:
        # Nothing is kept (mergekit's bernoulli alone rejects a negative probability).
        negative_random = density < 0 and kind == SparsificationMethod.random
        return stock() if negative_random else torch.zeros_like(tensor)
    scope = _current.get()
    name = scope.next_name() if scope is not None else ""
    rescale = "l1" if rescale_norm is not None else "none"
    fields = {
        SparsificationMethod.magnitude: {"suppress": "magnitude"},
        SparsificationMethod.magnitude_outliers: {"suppress": "breadcrumbs", "gamma": gamma},
        SparsificationMethod.random: {"suppress": "random", "rescale": rescale},
        SparsificationMethod.della_magprune: {
            "suppress": "della",
            "epsilon": epsilon,
            "rescale": rescale,
        },
    }[kind]
    try:
        params = MergeParams(density=density, seed=settings.seed, **fields).validated()
        result, _ = merge_tensor(
            torch.zeros_like(tensor),
            tensor,
            name,
            axis="none",
            backend=settings.backend,
            params=params,
        )
    except (NonFiniteDeltaError, ParameterError):
        return stock()
    if rescale_norm is not None and params.suppress in ("magnitude", "breadcrumbs"):
        # The op rescales only random masks; mergekit rescales magnitude masks too on request.
        scale = l1_scale(tensor.double().abs().sum().item(), result.double().abs().sum().item())
        result = (result.float() * scale).to(result.dtype)
    return result


def install(accelerate: bool = True, *, seed: int = 0, backend: str | None = None) -> None:
    """Register ``neuron_fusion`` and, with ``accelerate``, route mergekit's sparsify through us.

    Args:
        accelerate: replace the sparsify dispatch of mergekit's task-arithmetic methods.
        seed: seed of our random draws and tie-breaks in accelerated mode (SPEC ``seed``).
        backend: our backend for both (``None``: ``$FUSION_KERNELS_BACKEND`` or ``auto``).

    Calling it again updates ``seed`` and ``backend``; :func:`uninstall` undoes ``accelerate``.
    """
    if backend not in (None, "auto") and backend not in registered_backends():
        raise ParameterError(
            f"unknown backend {backend!r}; choose auto or one of {', '.join(registered_backends())}"
        )
    register_method()
    settings.seed, settings.backend = seed, backend
    if not accelerate or _originals:
        return
    from mergekit.merge_methods import generalized_task_arithmetic as gta

    merge_group = gta.GeneralizedTaskArithmeticMerge.merge_group
    _originals.update({"sparsify": gta.sparsify, "merge_group": merge_group})

    @functools.wraps(merge_group)
    def named_merge_group(self: Any, group: Any, /, **parameters: Any) -> torch.Tensor:
        # sparsify() is not told which tensor it sees; the random draws need its name.
        token = _current.set(_TensorScope(group.metadata.name or ""))
        try:
            return merge_group(self, group, **parameters)
        finally:
            _current.reset(token)

    gta.sparsify = accelerated_sparsify
    gta.GeneralizedTaskArithmeticMerge.merge_group = named_merge_group


def uninstall() -> None:
    """Give mergekit back its own sparsify (``neuron_fusion`` stays registered)."""
    if not _originals:
        return
    from mergekit.merge_methods import generalized_task_arithmetic as gta

    gta.sparsify = _originals["sparsify"]
    gta.GeneralizedTaskArithmeticMerge.merge_group = _originals["merge_group"]
    _originals.clear()


def is_accelerated() -> bool:
    """Whether mergekit's sparsify is currently routed through the fused op."""
    return bool(_originals)
