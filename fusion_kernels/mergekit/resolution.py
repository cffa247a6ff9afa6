"""Parameter values of a mergekit YAML file, resolved per tensor name as mergekit resolves them:
a model's own ``parameters`` before the top-level ones; a list of ``{filter, value}`` takes the
first entry whose ``filter`` is a substring of the name (no filter, or ``*``, matches every
tensor); unmatched lists fall through to the next scope, then to the method's default."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ParameterError
from ..neurons import NeuronRules
from ..params import MergeParams, TensorParams, convert_field
from .method import neuron_rules_from_text
from .methods import MISSING, Param

#: ``(filter or None, value)`` in mergekit's order of precedence; None matches every tensor.
Chain = list[tuple[str | None, Any]]


def build_chain(name: str, scopes: list[Mapping], global_settings: Mapping) -> Chain:
    """Parameter ``name``'s values from the ``scopes`` (the model's settings) then the top-level
    settings, in order of precedence."""
    chain: Chain = []
    for settings in (*scopes, global_settings):
        if name not in settings:
            continue
        setting = settings[name]
        if isinstance(setting, Mapping):
            setting = [setting]
        if not isinstance(setting, list):
            chain.append((None, setting))
            continue
        for condition in setting:
            if not isinstance(condition, Mapping):
                raise ParameterError(
                    f"parameter {name!r}: gradients (lists of values interpolated over layers) "
                    "are not supported by --config; use filters, or python -m "
                    "fusion_kernels.mergekit"
                )
            if set(condition) - {"filter", "value"} or "value" not in condition:
                raise ParameterError(f"parameter {name!r}: a condition is {{filter, value}}")
            if isinstance(condition["value"], list):
                raise ParameterError(f"parameter {name!r}: gradients are not supported")
            where = condition.get("filter")
            chain.append((None if where in (None, "", "*") else str(where), condition["value"]))
    return chain


def _resolve(chain: Chain, matching: frozenset[str]) -> Any:
    """The first value whose filter is among ``matching`` (or has none), else MISSING."""
    return next((v for f, v in chain if f is None or f in matching), MISSING)


def _value(name: str, param: Param, chain: Chain, matching: frozenset[str]) -> Any:
    """The parameter's value for tensors whose name contains exactly the filters ``matching``,
    converted like mergekit's pydantic types in lax mode (YAML's ``1e-3`` is a string)."""
    value = _resolve(chain, matching)
    value = param.default if value is MISSING else value
    if value is None and param.optional:
        return None
    try:
        return convert_field(name, value, param.kind)
    except ParameterError as exc:
        raise ParameterError(f"parameter {exc}") from None


class _FilterChains:
    """Per tensor name, the fields that differ from the default: every parameter takes the first
    value of its chain whose filter is a substring of the name. Names that contain the same
    filters share one resolution, so a file's filters cost one resolution per combination that
    occurs among the tensors, never an enumeration of all of them."""

    def __init__(
        self,
        definitions: dict[str, Param],
        chains: dict[str, Chain],
        to_fields: Callable[[dict[str, Any]], dict[str, Any]],
    ):
        self.definitions, self.chains, self.to_fields = definitions, chains, to_fields
        self.filters = tuple(dict.fromkeys(f for c in chains.values() for f, _ in c if f))
        self.default = self.params(frozenset())
        #: The filtered values as written, for reports.
        self.description = [
            {"filter": f, "parameter": name, "value": v}
            for name, chain in chains.items()
            for f, v in chain
            if f is not None
        ]
        self._changes = functools.lru_cache(maxsize=None)(self._changes_for)

    def params(self, matching: frozenset[str]) -> MergeParams:
        """Our parameters for names that contain exactly the filters ``matching``."""
        values = {
            name: _value(name, param, self.chains[name], matching)
            for name, param in self.definitions.items()
        }
        try:
            return MergeParams(**self.to_fields(values)).validated()
        except ParameterError as exc:
            where = f" for tensors matching {sorted(matching)}" if matching else ""
            raise ParameterError(f"{exc}{where}") from None

    def _changes_for(self, matching: frozenset[str]) -> dict[str, Any]:
        params = self.params(matching)
        return {
            f.name: getattr(params, f.name)
            for f in dataclasses.fields(MergeParams)
            if getattr(params, f.name) != getattr(self.default, f.name)
        }

    def __call__(self, name: str) -> dict[str, Any]:
        return self._changes(frozenset(f for f in self.filters if f in name))


def tensor_params(
    definitions: dict[str, Param],
    chains: dict[str, Chain],
    to_fields: Callable[[dict[str, Any]], dict[str, Any]],
) -> TensorParams:
    """The file's parameters per tensor: the default (no filter matching) and a function of the
    name for the rest."""
    for name, param in definitions.items():
        if param.required and all(f is not None for f, _ in chains[name]):
            raise ParameterError(
                f"parameter {name!r} is required (mergekit has no default): give it a value "
                "without filter"
            )
    resolver = _FilterChains(definitions, chains, to_fields)
    return TensorParams(resolver.default, changes=resolver)


def constant_rules(chain: Chain, param: Param) -> NeuronRules:
    """neuron_fusion's ``neuron_rules``: one value for every tensor."""
    if any(f is not None for f, _ in chain):
        raise ParameterError("neuron_rules cannot take filters; list all rules in one string")
    return neuron_rules_from_text(_value("neuron_rules", param, chain, frozenset()))
