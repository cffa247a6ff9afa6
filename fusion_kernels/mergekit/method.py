"""The ``neuron_fusion`` merge method for mergekit.

Per output tensor it computes exactly :func:`fusion_kernels.merge_tensor` with base = the base
model's tensor, tuned = the one other model's tensor and ``name`` = mergekit's weight name, so
hashes, seeds and default neuron axes are those of ``python -m fusion_kernels.merge``.

mergekit is imported only when one of these functions runs; without it they raise
:class:`MergekitMissingError`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FusionError
from ..neurons import NeuronRules, parse_rule
from ..ops import merge_tensor
from ..params import PRESETS, MergeParams, params_for

METHOD_NAME = "neuron_fusion"
MISSING_HINT = "pip install 'fusion_kernels[test]' or pip install mergekit"

#: The method's parameters: name → (type, default). Defaults are the ``neuron_fusion`` preset.
_DEFAULTS = MergeParams(**PRESETS[METHOD_NAME])
METHOD_PARAMETERS: dict[str, tuple[Any, Any]] = {
    "suppress": (str, _DEFAULTS.suppress),
    "density": (float, _DEFAULTS.density),
    "gamma": (float, _DEFAULTS.gamma),
    "epsilon": (float, _DEFAULTS.epsilon),
    "rescale": (str | None, _DEFAULTS.rescale),
    "weight": (float, _DEFAULTS.weight),
    "restore": (str, _DEFAULTS.restore),
    "top_neurons": (float, _DEFAULTS.top_neurons),
    "seed": (int, _DEFAULTS.seed),
    # ``REGEX=row|col|none`` rules separated by ";", checked before the SPEC's default rules.
    "neuron_rules": (str, ""),
}


class MergekitMissingError(FusionError, ImportError):
    """mergekit is needed for this function but is not installed."""


@dataclass
class Settings:
    """What :func:`fusion_kernels.mergekit.install` set: our backend (``None``: auto) and the seed
    of the accelerated sparsify's draws."""

    seed: int = 0
    backend: str | None = None


#: The process-wide settings the method and the accelerated sparsify read.
settings = Settings()


def require_mergekit() -> None:
    """Raise :class:`MergekitMissingError` unless mergekit can be imported."""
    try:
        import mergekit.merge_methods  # noqa: F401
    except ImportError as exc:
        raise MergekitMissingError(
            f"this needs mergekit, which is not installed ({exc}); {MISSING_HINT}"
        ) from None


# ---------------------------------------------------------------------------------------------
# The neuron_fusion merge method


@functools.lru_cache(maxsize=1)
def neuron_fusion_method() -> Any:
    """The ``neuron_fusion`` method as a mergekit ``MergeMethod`` (built once, not registered).

    Every parameter is per non-base input, so a YAML file may set it under the model's
    ``parameters`` or the top-level ones, with mergekit's ``filter`` lists.
    """
    require_mergekit()
    from mergekit.merge_methods.base import (
        BasePolicy,
        FunctionalGroupMergeMethod,
        InputContract,
        MergeMethodSpec,
        ParameterScope,
        ParameterSpec,
    )

    spec = MergeMethodSpec(
        name=METHOD_NAME,
        pretty_name="Neuron-Fusion (Locate-then-Merge)",
        parameters=tuple(
            ParameterSpec(name, kind, ParameterScope.NON_BASE, default=default)
            for name, (kind, default) in METHOD_PARAMETERS.items()
        ),
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1, max_non_base=1),
    )
    return FunctionalGroupMergeMethod(spec, _merge_group)


def _merge_group(group: Any, /, **values: Any) -> torch.Tensor:
    """mergekit's group kernel: one base and one tuned tensor in, our op's result out."""
    (entry,) = group.non_base
    fields = {key: value[entry.id] for key, value in values.items()}
    rules = neuron_rules_from_text(fields.pop("neuron_rules"))
    name = group.metadata.name or ""
    params = _params(tuple(sorted(fields.items())))
    merged, _ = merge_tensor(
        group.base.tensor,
        entry.tensor,
        name,
        axis=rules.axis_for(name, group.base.tensor.shape),
        backend=settings.backend,
        params=params,
    )
    return merged


@functools.lru_cache(maxsize=256)
def _params(fields: tuple[tuple[str, Any], ...]) -> MergeParams:
    return params_for(None, **dict(fields))


@functools.lru_cache(maxsize=64)
def neuron_rules_from_text(text: str) -> NeuronRules:
    """The ``neuron_rules`` parameter: ``REGEX=row|col|none`` rules separated by ``;``, checked
    before the SPEC's default rules (``""``: the defaults alone)."""
    return NeuronRules([parse_rule(item.strip()) for item in text.split(";") if item.strip()])


def register_method() -> None:
    """Register ``neuron_fusion`` in mergekit's registry (once; later calls do nothing)."""
    require_mergekit()
    from mergekit.merge_methods import register, registered_methods

    if not any(m.spec.name == METHOD_NAME for m in registered_methods()):
        register(neuron_fusion_method())
