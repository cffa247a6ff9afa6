"""Read a mergekit YAML configuration as a merge of ours (``--config CONFIG.yml``).

A file such as::

    merge_method: ties
    base_model: ./Meta-Llama-3-8B
    models:
      - model: ./llava-next-llama3
        parameters:
          weight: 1.0
          density: [{filter: self_attn, value: 0.3}, {value: 0.1}]
    dtype: bfloat16

becomes base and tuned paths, a :class:`~fusion_kernels.params.TensorParams` and the dtypes.
Parameters resolve as mergekit resolves them: a model's own ``parameters`` before the top-level
ones; a list of ``{filter, value}`` takes the first entry whose ``filter`` is a substring of the
tensor name (no filter, or ``*``, matches every tensor); unmatched lists fall through to the next
scope, then to the method's default. Defaults are those of mergekit's method specs
(``merge_methods/registry.py`` and ``generalized_task_arithmetic.py``). Models are local paths
(relative to the working directory as in mergekit), Hub ids (``org/name@revision``) or
``MODEL+LORA``, as for ``--base``/``--tuned``.

mergekit is not needed here; PyYAML is.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..dtypes import MERGE_DTYPE_NAMES, MERGE_DTYPES, dtype_from_name
from ..errors import ParameterError
from ..io.safeload import load_yaml
from ..neurons import NeuronRules
from ..params import FIELD_TYPES, MergeParams, TensorParams, convert_field
from .method import METHOD_PARAMETERS, neuron_rules_from_text

_MISSING = object()


@dataclass(frozen=True)
class _Param:
    """One parameter of a mergekit method: its type, default and scope (``shared``: read from
    the top-level ``parameters`` only, like mergekit's SHARED scope)."""

    kind: type
    default: Any = _MISSING
    shared: bool = False
    optional: bool = False

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@dataclass(frozen=True)
class _TaskArithmetic:
    """One of mergekit's generalized task-arithmetic methods, as it acts on one tuned model."""

    suppress: str
    consensus: bool
    normalize: bool
    rescale: bool

    def parameters(self) -> dict[str, _Param]:
        params = {
            "int8_mask": _Param(bool, False, shared=True),
            "normalize": _Param(bool, self.normalize, shared=True),
            "rescale": _Param(bool, self.rescale, shared=True),
            "lambda": _Param(float, 1.0, shared=True),
            "weight": _Param(float),
            "density": _Param(float, 1.0),
        }
        if self.suppress == "breadcrumbs":
            params["gamma"] = _Param(float, 0.01)
        if self.suppress == "della":
            params["epsilon"] = _Param(float, 0.15)
        return params


#: mergekit's registry entries (consensus method, sparsification, normalize and rescale defaults).
TASK_ARITHMETIC_METHODS: dict[str, _TaskArithmetic] = {
    "task_arithmetic": _TaskArithmetic("none", consensus=False, normalize=False, rescale=False),
    "ties": _TaskArithmetic("magnitude", consensus=True, normalize=True, rescale=False),
    "breadcrumbs": _TaskArithmetic("breadcrumbs", consensus=False, normalize=False, rescale=False),
    "breadcrumbs_ties": _TaskArithmetic(
        "breadcrumbs", consensus=True, normalize=False, rescale=False
    ),
    "dare_linear": _TaskArithmetic("random", consensus=False, normalize=False, rescale=True),
    "dare_ties": _TaskArithmetic("random", consensus=True, normalize=False, rescale=True),
    "della_linear": _TaskArithmetic("della", consensus=False, normalize=False, rescale=True),
    "della": _TaskArithmetic("della", consensus=True, normalize=True, rescale=True),
}
NEURON_FUSION = "neuron_fusion"
SUPPORTED_METHODS = (*TASK_ARITHMETIC_METHODS, NEURON_FUSION)

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
_UNSUPPORTED_KEYS = {
    "slices": "layer slices",
    "modules": "per-module definitions",
    "tokenizer_source": "tokenizer merging (the tuned model's tokenizer is copied)",
    "tokenizer": "tokenizer merging (the tuned model's tokenizer is copied)",
    "chat_template": "chat templates (the tuned model's is copied)",
}


@dataclass(frozen=True)
class MergeConfigFile:
    """A mergekit YAML file as our merge: pass ``base``, ``tuned``, ``params`` and ``rules`` to
    :func:`fusion_kernels.merge_checkpoints`, after :meth:`check_dtypes`."""

    path: Path
    method: str
    base: Path
    tuned: Path
    params: TensorParams
    rules: NeuronRules
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None

    def check_dtypes(self, checkpoint_dtypes: Iterable[torch.dtype]) -> None:
        """Refuse ``dtype``/``out_dtype`` that would change the result or the written dtype.

        The op always computes in float32 and writes each tensor in its checkpoint dtype, so
        ``dtype: float32`` (or the checkpoint's own dtype) is what we do anyway; a narrower
        ``dtype`` would round the weights first, and an output dtype other than the checkpoint's
        is a cast the writer does not do.
        """
        # Tensors of other dtypes (F64, F8, integers) are copied as they are, whatever dtype says.
        for ckpt in {d for d in checkpoint_dtypes if d in MERGE_DTYPES}:
            if self.dtype is not None and self.dtype not in (ckpt, torch.float32):
                raise ParameterError(
                    f"{self.path}: dtype {_name(self.dtype)} would round the {_name(ckpt)} "
                    "weights before merging; fusion_kernels computes in float32: drop dtype"
                )
            written = self.out_dtype or self.dtype or ckpt
            if written != ckpt:
                raise ParameterError(
                    f"{self.path}: the merge would be written as {_name(written)}, but the "
                    f"checkpoint is {_name(ckpt)} and fusion_kernels keeps it: set out_dtype: "
                    f"{_name(ckpt)} (or drop dtype and out_dtype), or run python -m "
                    "fusion_kernels.mergekit"
                )


def load_merge_config(path: str | Path) -> MergeConfigFile:
    """Read and translate a mergekit YAML file; raises :class:`ParameterError` naming what is
    not supported or out of range."""
    path = Path(path)
    data = load_yaml(path, ParameterError)
    try:
        return parse_merge_config(data, path)
    except ParameterError as exc:
        raise ParameterError(f"{path}: {exc}") from None


def referenced_paths(data: Any) -> list[Path]:
    """Local paths a mergekit YAML document names as models (``base_model``, ``model``, in
    ``models`` and ``slices`` alike), each read as ``--base``/``--tuned`` read a reference: a
    ``MODEL+LORA`` names both, and a Hub id names its folder in the Hugging Face cache when it is
    there (nothing is downloaded)."""
    from ..io.sources import reference_paths

    found: list[Path] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            if key in ("model", "base_model") and isinstance(value, str):
                found += reference_paths(value)
            else:
                found += referenced_paths(value)
    elif isinstance(data, list):
        for item in data:
            found += referenced_paths(item)
    return found


def parse_merge_config(data: Any, path: Path = Path("<config>")) -> MergeConfigFile:
    """:func:`load_merge_config` on already-parsed YAML."""
    if not isinstance(data, Mapping):
        raise ParameterError("a merge config is a mapping with merge_method, base_model, models")
    _check_keys(data)
    method = data.get("merge_method")
    if method not in SUPPORTED_METHODS:
        raise ParameterError(
            f"merge_method {method!r} is not supported; use one of {', '.join(SUPPORTED_METHODS)}"
        )
    base = _model_path(data.get("base_model"), "base_model")
    tuned, model_settings = _tuned_model(data.get("models"), str(data.get("base_model")))
    definitions = _method_parameters(method)
    global_settings = _settings(data.get("parameters"), "parameters")
    _check_parameter_names(definitions, model_settings, global_settings)
    chains = {
        name: _chain(name, [] if p.shared else [model_settings], global_settings)
        for name, p in definitions.items()
    }
    to_fields = dict if method == NEURON_FUSION else functools.partial(_task_fields, method)
    rules = NeuronRules()
    if method == NEURON_FUSION:
        rules = _constant_rules(chains.pop("neuron_rules"), definitions.pop("neuron_rules"))
    params = _tensor_params(definitions, chains, to_fields)
    return MergeConfigFile(
        path=path,
        method=method,
        base=base,
        tuned=tuned,
        params=params,
        rules=rules,
        dtype=_dtype(data.get("dtype"), "dtype"),
        out_dtype=_dtype(data.get("out_dtype"), "out_dtype"),
    )


# ---------------------------------------------------------------------------------------------
# Structure


def _check_keys(data: Mapping) -> None:
    for key in data:
        if key in _UNSUPPORTED_KEYS:
            raise ParameterError(
                f"key {key!r} ({_UNSUPPORTED_KEYS[key]}) is not supported by --config; "
                "run python -m fusion_kernels.mergekit for the full mergekit"
            )
        if key not in _TOP_KEYS:
            raise ParameterError(f"unknown key {key!r}; supported: {', '.join(sorted(_TOP_KEYS))}")


def _model_path(reference: Any, where: str) -> Path:
    if not isinstance(reference, str) or not reference:
        raise ParameterError(
            f"{where} must be a model (a directory, Hub id or MODEL+LORA), got {reference!r}"
        )
    # A path, a Hub id (org/name@rev) or MODEL+LORA; fusion_kernels.io.sources opens each.
    return Path(reference)


def _tuned_model(models: Any, base: str) -> tuple[Path, Mapping]:
    """The one model besides the base and its ``parameters`` (the base's are mergekit's to
    ignore: every parameter here is per non-base input)."""
    if not isinstance(models, list) or not all(isinstance(m, Mapping) for m in models):
        raise ParameterError("models must be a list of {model: PATH, parameters: {...}}")
    others = []
    for entry in models:
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise ParameterError(f"models entry has unsupported key(s) {sorted(extra)}")
        if entry.get("model") != base:
            others.append(entry)
    if len(others) != 1:
        raise ParameterError(
            f"--config merges exactly one model into base_model; models lists {len(others)} "
            "besides the base"
        )
    (entry,) = others
    return _model_path(entry.get("model"), "model"), _settings(entry.get("parameters"), "model")


def _settings(value: Any, where: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ParameterError(f"{where} parameters must be a mapping, got {value!r}")
    return value


def _method_parameters(method: str) -> dict[str, _Param]:
    if method != NEURON_FUSION:
        return TASK_ARITHMETIC_METHODS[method].parameters()
    return {
        name: _Param(FIELD_TYPES.get(name, str), default, optional=default is None)
        for name, (_, default) in METHOD_PARAMETERS.items()
    }


def _check_parameter_names(definitions, model_settings: Mapping, global_settings: Mapping):
    known = ", ".join(definitions)
    for where, settings in (("the model's", model_settings), ("top-level", global_settings)):
        for key in settings:
            if key not in definitions:
                raise ParameterError(f"unknown parameter {key!r} in {where} parameters; {known}")
    for key in model_settings:
        if definitions[key].shared:
            raise ParameterError(
                f"parameter {key!r} applies to the whole merge: mergekit reads it from the "
                "top-level parameters only, so move it there"
            )


def _dtype(value: Any, where: str) -> torch.dtype | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    dtype = dtype_from_name(name)
    if dtype is None:
        names = ", ".join(MERGE_DTYPE_NAMES.values())
        raise ParameterError(f"{where} {value!r} is not supported; use {names}")
    return dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Values: filter chains, resolved per tensor name

#: ``(filter or None, value)`` in mergekit's order of precedence; None matches every tensor.
Chain = list[tuple[str | None, Any]]


def _chain(name: str, scopes: list[Mapping], global_settings: Mapping) -> Chain:
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
    """The first value whose filter is among ``matching`` (or has none), else _MISSING."""
    return next((v for f, v in chain if f is None or f in matching), _MISSING)


def _value(name: str, param: _Param, chain: Chain, matching: frozenset[str]) -> Any:
    """The parameter's value for tensors whose name contains exactly the filters ``matching``,
    converted like mergekit's pydantic types in lax mode (YAML's ``1e-3`` is a string)."""
    value = _resolve(chain, matching)
    value = param.default if value is _MISSING else value
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
        definitions: dict[str, _Param],
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


def _tensor_params(
    definitions: dict[str, _Param],
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


def _constant_rules(chain: Chain, param: _Param) -> NeuronRules:
    if any(f is not None for f, _ in chain):
        raise ParameterError("neuron_rules cannot take filters; list all rules in one string")
    return neuron_rules_from_text(_value("neuron_rules", param, chain, frozenset()))


# ---------------------------------------------------------------------------------------------
# Methods: mergekit's values → our fields


def _task_fields(method: str, values: dict[str, Any]) -> dict[str, Any]:
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
