"""Merge parameters (SPEC.md "Inputs"), their validation, and the method presets.

One :class:`MergeParams` describes what every tensor of a merge computes; the op validates it once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import ParameterError

SUPPRESS_METHODS = ("none", "magnitude", "breadcrumbs", "random", "della")
RESCALE_MODES = ("none", "l1", "inverse")
RESTORE_MODES = ("none", "replace", "rescale")
SELECT_MODES = ("exact", "approx")
RANDOM_METHODS = ("random", "della")


@dataclass(frozen=True)
class MergeParams:
    """What one merge computes per tensor; field names and defaults follow SPEC.md.

    ``rescale=None`` means the SPEC default: ``l1`` for random and della, ``none`` otherwise.
    """

    suppress: str = "none"
    density: float = 0.2
    gamma: float = 0.01
    epsilon: float = 0.15
    rescale: str | None = None
    weight: float = 1.0
    restore: str = "none"
    top_neurons: float = 0.3
    seed: int = 0
    select: str = "exact"
    allow_nonfinite: bool = False

    @property
    def rescale_mode(self) -> str:
        """The rescale mode in force (the SPEC default resolved)."""
        if self.rescale is not None:
            return self.rescale
        return "l1" if self.suppress in RANDOM_METHODS else "none"

    def replace(self, **changes: Any) -> MergeParams:
        """A copy with some fields changed, validated."""
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> MergeParams:
        """Return self after checking every field; raises :class:`ParameterError`."""
        _choice("suppress", self.suppress, SUPPRESS_METHODS)
        _choice("restore", self.restore, RESTORE_MODES)
        _choice("select", self.select, SELECT_MODES)
        if self.rescale is not None:
            _choice("rescale", self.rescale, RESCALE_MODES)
            if self.rescale != "none" and self.suppress not in RANDOM_METHODS:
                raise ParameterError(
                    f"--rescale {self.rescale} applies only to the random and della suppress "
                    f"methods, not {self.suppress!r}; drop --rescale"
                )
        _unit("density", self.density)
        _unit("top_neurons", self.top_neurons)
        if not float32_finite(self.epsilon):
            # Unused outside della, but written to the report, which must stay valid JSON.
            raise ParameterError(f"epsilon must be a finite number, got {self.epsilon}")
        if not 0.0 <= self.gamma < 1.0:
            raise ParameterError(f"gamma must be in [0, 1), got {self.gamma}")
        if self.suppress == "della" and not (
            self.epsilon >= 0
            and self.density - self.epsilon > 0
            and self.density + self.epsilon < 1
        ):
            raise ParameterError(
                f"della needs 0 < density - epsilon and density + epsilon < 1; got density "
                f"{self.density}, epsilon {self.epsilon}: lower --epsilon"
            )
        if not float32_finite(self.weight):
            raise ParameterError(
                "weight must be a finite number (a finite float32: |weight| <= "
                f"{FLOAT32_MAX:.4g}), got {self.weight}"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ParameterError(f"seed must be an integer, got {self.seed!r}")
        return self

    def as_dict(self) -> dict[str, Any]:
        """All fields plus the resolved rescale mode, for reports."""
        return {**dataclasses.asdict(self), "rescale": self.rescale_mode}


def _choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ParameterError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")


#: The largest finite float32: every float parameter is used in float32 by the kernels, so a
#: value beyond it (1e300 is finite in Python) would be Inf there.
FLOAT32_MAX = 3.4028234663852886e38


def float32_finite(x: float) -> bool:
    """A number (not a boolean) that is finite in float32, the dtype every parameter is used in.
    The bound is compared first: a huge int is not converted to float, which would overflow."""
    return (
        isinstance(x, (int, float))
        and not isinstance(x, bool)
        and abs(x) <= FLOAT32_MAX
        and math.isfinite(x)
    )


def _unit(field: str, value: float) -> None:
    if not float32_finite(value) or not 0.0 <= value <= 1.0:
        raise ParameterError(f"{field} must be in [0, 1], got {value}")


# Method presets. The paper's Task Arithmetic scales the whole delta by α; with α = 1 it would
# return the tuned model unchanged, so the "taska" presets use α = 0.5 (override with --weight).
PRESETS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"suppress": "none", "weight": 0.5},
    "ties": {"suppress": "magnitude", "density": 0.2},
    "breadcrumbs": {"suppress": "breadcrumbs", "density": 0.2, "gamma": 0.01},
    "dare": {"suppress": "random", "density": 0.2},
    "della": {"suppress": "della", "density": 0.2, "epsilon": 0.15},
    "neuron_fusion": {"suppress": "magnitude", "density": 0.2, "restore": "replace"},
    "neu-p-taska": {"suppress": "none", "weight": 0.5, "restore": "replace"},
    "neu-p-ties": {"suppress": "magnitude", "density": 0.2, "restore": "replace"},
    "neu-s-ties": {"suppress": "magnitude", "density": 0.2, "restore": "rescale"},
    "neu-p-bread": {"suppress": "breadcrumbs", "density": 0.2, "restore": "replace"},
    "neu-s-bread": {"suppress": "breadcrumbs", "density": 0.2, "restore": "rescale"},
}


#: The preset a merge uses when none is named: the CLI's ``--method`` default and
#: :func:`~fusion_kernels.ops.merge_tensor`'s (explicit fields override it, as flags do).
DEFAULT_METHOD = "neuron_fusion"


def params_for(method: str | None = None, **overrides: Any) -> MergeParams:
    """Parameters of a preset (``None``: SPEC defaults) with explicit overrides, validated.

    Overrides whose value is ``None`` are ignored, so CLI flags that were not given fall through.
    """
    fields: dict[str, Any] = {}
    if method is not None:
        if method not in PRESETS:
            raise ParameterError(f"unknown method {method!r}; choose one of {', '.join(PRESETS)}")
        fields.update(PRESETS[method])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return MergeParams(**fields).validated()
    except TypeError as exc:
        raise ParameterError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Several tuned models (SPEC "Several tuned models"): each model has its own MergeParams, whose
# ``weight`` is the model's w_t; how the models' weighted deltas combine is one Combine.

CONSENSUS_MODES = ("none", "sum", "count")
#: Presets that elect signs (consensus sum) when they merge two or more tuned models.
SIGN_ELECTING_PRESETS = ("ties", "neu-p-ties", "neu-s-ties")


@dataclass(frozen=True)
class Combine:
    """How the tuned models' weighted deltas combine into one: TIES sign election
    (``consensus``: none, sum or count), ``normalize`` by the kept entries' weights, and the
    final scale ``lambda_`` (SPEC's λ). The defaults leave a one-model merge unchanged."""

    consensus: str = "none"
    normalize: bool = False
    lambda_: float = 1.0

    def validated(self) -> Combine:
        """Return self after checking every field; raises :class:`ParameterError`."""
        _choice("consensus", self.consensus, CONSENSUS_MODES)
        if not isinstance(self.normalize, bool):
            raise ParameterError(f"normalize must be true or false, got {self.normalize!r}")
        if not float32_finite(self.lambda_):
            raise ParameterError(f"lambda must be a finite float32 number, got {self.lambda_}")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The fields under SPEC's names, for reports."""
        return {"consensus": self.consensus, "normalize": self.normalize, "lambda": self.lambda_}


def combine_for(method: str | None, models: int, **overrides: Any) -> Combine:
    """The :class:`Combine` of a preset merging ``models`` tuned models (SPEC's defaults: with
    two or more, the TIES presets elect signs by sum; otherwise no consensus), with explicit
    overrides (``consensus``, ``normalize``, ``lambda_``; ``None`` values are ignored)."""
    fields: dict[str, Any] = {}
    if method is not None and method not in PRESETS:
        raise ParameterError(f"unknown method {method!r}; choose one of {', '.join(PRESETS)}")
    if models >= 2 and method in SIGN_ELECTING_PRESETS:
        fields["consensus"] = "sum"
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Combine(**fields).validated()
    except TypeError as exc:
        raise ParameterError(str(exc)) from None


@dataclass(frozen=True)
class ParamOverride:
    """Parameter changes for tensors whose name matches ``pattern`` (a regex, searched)."""

    pattern: str
    changes: dict[str, Any]


def parse_override(text: str) -> ParamOverride:
    """``REGEX:key=value[,key=value...]``, e.g. ``self_attn:density=0.3,restore=rescale``."""
    pattern, sep, assignments = text.rpartition(":")
    if not sep or not pattern or not assignments:
        raise ParameterError(f"--set {text!r} must look like REGEX:key=value[,key=value]")
    check_pattern(pattern, f"--set {text!r}")
    changes: dict[str, Any] = {}
    for item in assignments.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in FIELD_TYPES:
            raise ParameterError(
                f"--set {text!r}: unknown parameter {key!r}; valid: {', '.join(FIELD_TYPES)}"
            )
        try:
            changes[key] = convert_field(key, value.strip())
        except ParameterError as exc:
            raise ParameterError(f"--set {text!r}: {exc}") from None
    return ParamOverride(pattern, changes)


# ---------------------------------------------------------------------------------------------
# Text (or a YAML scalar) → a field's value: the one converter of --set, --grid and --config

#: The type each :class:`MergeParams` field converts to. ``rescale`` converts to a string: its
#: default ``None`` ("the SPEC default") is not something a user spells.
FIELD_TYPES: dict[str, type] = {
    **{f.name: type(f.default) for f in dataclasses.fields(MergeParams)},
    "rescale": str,
}
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")
_KIND_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a float", str: "a string"}


def convert_field(name: str, value: Any, kind: type | None = None) -> Any:
    """``value`` as the :class:`MergeParams` field ``name`` (or as ``kind`` for a parameter that
    is not a field, like mergekit's ``lambda``).

    ``value`` is command-line text or a YAML scalar; conversion is lax the way mergekit's
    (pydantic) parameters are: ``"3e-1"`` is a float, ``4.0`` an integer, ``"yes"`` and ``1``
    booleans. Raises :class:`ParameterError` (``NAME cannot be VALUE ...``) for anything else.
    """
    kind = kind or FIELD_TYPES[name]
    try:
        return _as(kind, value)
    except (TypeError, ValueError, OverflowError):
        raise ParameterError(
            f"{name} cannot be {value!r}: it must be {_KIND_NAMES.get(kind, kind.__name__)}"
        ) from None


def _as(kind: type, value: Any) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise TypeError("a boolean is not a number or a string")
    if kind is bool:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        text = str(value).strip().lower()
        if isinstance(value, str) and text in _TRUE + _FALSE:
            return text in _TRUE
        raise ValueError(value)
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        number = float(value)
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    if kind is float:
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise TypeError(value)


# ---------------------------------------------------------------------------------------------
# Parameters per tensor

#: A function of a tensor's name giving the fields that differ from the default there.
Changes = Callable[[str], dict[str, Any]]


def check_pattern(pattern: str, where: str) -> None:
    """Refuse a pattern that is not a regular expression, before any work."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ParameterError(f"{where}: bad regular expression ({exc})") from None


class TensorParams:
    """Parameters per tensor: ``default`` with the changes that apply to the tensor's name.

    The changes come from ``overrides`` (``--set``: the first whose pattern matches wins; every
    one is validated up front, so a bad override fails before any work) or from a function of the
    name (``changes``, e.g. mergekit's filter chains; :meth:`check` validates the tensors of a
    plan before any work).
    """

    def __init__(
        self,
        default: MergeParams,
        overrides: tuple[ParamOverride, ...] | list = (),
        changes: Changes | None = None,
    ):
        self.default = default.validated()
        self.overrides = tuple(overrides)
        self._changes = changes
        for override in self.overrides:
            check_pattern(override.pattern, f"parameter override /{override.pattern}/")
            default.replace(**override.changes)
        self._resolved: dict[tuple, MergeParams] = {}

    def changes_for(self, name: str) -> dict[str, Any]:
        """The overridden fields for ``name`` (empty when the default applies), for reports."""
        if self._changes is not None:
            return self._changes(name)
        return next((o.changes for o in self.overrides if re.search(o.pattern, name)), {})

    def for_tensor(self, name: str) -> MergeParams:
        """The validated parameters of tensor ``name``."""
        changes = self.changes_for(name)
        key = tuple(sorted(changes.items()))
        if key not in self._resolved:
            self._resolved[key] = self.default.replace(**changes) if changes else self.default
        return self._resolved[key]

    def check(self, names: Iterable[str]) -> None:
        """Resolve every name now, so bad parameters fail before any work; an override whose
        pattern matches none of the names (a typo: ``selfattn``) would change nothing and is
        refused."""
        names = list(names)
        for name in names:
            self.for_tensor(name)
        for override in self.overrides:
            if not any(re.search(override.pattern, name) for name in names):
                changes = ",".join(f"{k}={v}" for k, v in override.changes.items())
                example = f" (names look like {names[0]!r})" if names else ""
                raise ParameterError(
                    f"--set {override.pattern}:{changes}: the pattern matches no tensor this "
                    f"merge merges{example}; fix the pattern or drop the rule"
                )

    def with_default(self, default: MergeParams) -> TensorParams:
        """The same per-tensor changes on another default."""
        return TensorParams(default, self.overrides, self._changes)

    def describe(self) -> list[dict[str, Any]]:
        """What differs from the default where, for reports and ``--dry-run``."""
        if self._changes is not None:
            return list(getattr(self._changes, "description", []))
        return [{"pattern": o.pattern, **o.changes} for o in self.overrides]
