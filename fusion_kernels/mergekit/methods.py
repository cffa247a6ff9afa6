"""The mergekit methods ``--config`` supports: their parameters (types, defaults, scopes) as
mergekit's method specs define them, and what each computes for one tuned model, in our fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ParameterError
from ..params import FIELD_TYPES
from .method import METHOD_PARAMETERS

#: A parameter without default (mergekit requires a value).
MISSING = object()


@dataclass(frozen=True)
class Param:
    """One parameter of a mergekit method: its type, default and scope (``shared``: read from
    the top-level ``parameters`` only, like mergekit's SHARED scope)."""

    kind: type
    default: Any = MISSING
    shared: bool = False
    optional: bool = False

    @property
    def required(self) -> bool:
        return self.default is MISSING


@dataclass(frozen=True)
class TaskArithmetic:
    """One of mergekit's generalized task-arithmetic methods, as it acts on one tuned model."""

    suppress: str
    consensus: bool
    normalize: bool
    rescale: bool

    def parameters(self) -> dict[str, Param]:
        params = {
            "int8_mask": Param(bool, False, shared=True),
            "normalize": Param(bool, self.normalize, shared=True),
            "rescale": Param(bool, self.rescale, shared=True),
            "lambda": Param(float, 1.0, shared=True),
            "weight": Param(float),
            "density": Param(float, 1.0),
        }
        if self.suppress == "breadcrumbs":
            params["gamma"] = Param(float, 0.01)
        if self.suppress == "della":
            params["epsilon"] = Param(float, 0.15)
        return params


#: mergekit's registry entries (consensus method, sparsification, normalize and rescale defaults).
TASK_ARITHMETIC_METHODS: dict[str, TaskArithmetic] = {
    "task_arithmetic": TaskArithmetic("none", consensus=False, normalize=False, rescale=False),
    "ties": TaskArithmetic("magnitude", consensus=True, normalize=True, rescale=False),
    "breadcrumbs": TaskArithmetic("breadcrumbs", consensus=False, normalize=False, rescale=False),
    "breadcrumbs_ties": TaskArithmetic(
        "breadcrumbs", consensus=True, normalize=False, rescale=False
    ),
    "dare_linear": TaskArithmetic("random", consensus=False, normalize=False, rescale=True),
    "dare_ties": TaskArithmetic("random", consensus=True, normalize=False, rescale=True),
    "della_linear": TaskArithmetic("della", consensus=False, normalize=False, rescale=True),
    "della": TaskArithmetic("della", consensus=True, normalize=True, rescale=True),
}
NEURON_FUSION = "neuron_fusion"
SUPPORTED_METHODS = (*TASK_ARITHMETIC_METHODS, NEURON_FUSION)


def method_parameters(method: str) -> dict[str, Param]:
    if method != NEURON_FUSION:
        return TASK_ARITHMETIC_METHODS[method].parameters()
    return {
        name: Param(FIELD_TYPES.get(name, str), default, optional=default is None)
        for name, (_, default) in METHOD_PARAMETERS.items()
    }


def task_fields(method: str, values: dict[str, Any]) -> dict[str, Any]:
    """What one of mergekit's task-arithmetic methods computes for one model, as our fields.

    With one model the merged delta is ``Sub(Δ)·w`` (the TIES sign election keeps every kept
    entry), divided by w under ``normalize`` (mergekit's divisor is the weight sum; a linear
    method leaves a sum below 1e-8 at 1, a consensus one only an exact 0), times ``lambda``.
    """
    spec = TASK_ARITHMETIC_METHODS[method]
    weight, lam = values["weight"], values["lambda"]
    if not values["normalize"]:
        alpha = weight * lam
    elif spec.consensus:
        alpha = lam if weight != 0 else 0.0
    else:
        alpha = lam if abs(weight) >= 1e-8 else weight * lam
    density = values["density"]
    if spec.suppress == "none" or density >= 1:
        # mergekit's sparsify returns a density ≥ 1 delta untouched, without rescaling.
        return {"suppress": "none", "weight": alpha}
    if spec.suppress in ("magnitude", "breadcrumbs") and values["rescale"]:
        raise ParameterError(
            f"rescale: true with {method} (an l1 rescale of a magnitude mask) is not supported "
            "by --config; run python -m fusion_kernels.mergekit"
        )
    if density == 0:
        # Every sparsification keeps nothing at density 0 (della's ramp would be invalid).
        return {"suppress": "magnitude", "density": 0.0, "weight": alpha}
    fields = {"suppress": spec.suppress, "density": density, "weight": alpha}
    if spec.suppress == "breadcrumbs":
        fields["gamma"] = values["gamma"]
    if spec.suppress == "della":
        fields["epsilon"] = values["epsilon"]
    if spec.suppress in ("random", "della"):
        fields["rescale"] = "l1" if values["rescale"] else "none"
    return fields
