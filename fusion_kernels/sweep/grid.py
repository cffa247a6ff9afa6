"""Sweep grids: ``name=v1,v2;name=...`` as the points of a sweep, each a validated parameter set."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ParameterError
from ..params import FIELD_TYPES, PRESETS, MergeParams, convert_field, params_for

#: Names a grid may sweep, in the order a point's key lists them.
NAME_ORDER = ["method", *FIELD_TYPES]


@dataclass(frozen=True)
class GridPoint:
    """One combination of swept values, in grid order (``method`` is one of them)."""

    values: tuple[tuple[str, Any], ...]

    @property
    def key(self) -> str:
        """Canonical text, e.g. ``method=ties,density=0.1``: the point's identity in results."""
        return ",".join(f"{name}={value}" for name, value in self.values)

    @property
    def slug(self) -> str:
        """A directory name for the point's merged model."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.key.replace("=", "-").replace(",", "_"))

    def params(self) -> MergeParams:
        """The merge parameters: the preset (if any) with the swept values applied, validated."""
        fields = dict(self.values)
        return params_for(fields.pop("method", None), **fields)


def parse_grid(text: str) -> list[GridPoint]:
    """Every point of ``name=v1,v2;name=...``, names in a fixed order (method first, then the
    parameters in :class:`MergeParams` order); each is validated, so bad ones fail up front."""
    axes: list[tuple[str, list[Any]]] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, eq, values = part.partition("=")
        name = name.strip().replace("-", "_")
        items = [v.strip() for v in values.split(",")]
        if not eq or not name or not all(items):
            raise ParameterError(f"--grid {part!r} must look like name=value1,value2,...")
        if name != "method" and name not in FIELD_TYPES:
            raise ParameterError(
                f"--grid: unknown parameter {name!r}; use method or one of {', '.join(FIELD_TYPES)}"
            )
        if any(name == seen for seen, _ in axes):
            raise ParameterError(f"--grid names {name!r} twice")
        converted = [_convert(name, item) for item in items]
        if len(set(converted)) != len(converted):
            raise ParameterError(f"--grid {part!r} repeats a value")
        axes.append((name, converted))
    if not axes:
        raise ParameterError("--grid is empty; e.g. 'method=ties,neu-p-ties;density=0.1,0.2'")
    # A fixed name order makes a point's key independent of how the grid was written, so a
    # resumed sweep recognises its points whatever order the names come in.
    axes.sort(key=lambda axis: NAME_ORDER.index(axis[0]))
    points = [
        GridPoint(tuple(zip([n for n, _ in axes], combo, strict=True)))
        for combo in itertools.product(*(values for _, values in axes))
    ]
    for point in points:
        try:
            point.params()
        except ParameterError as exc:
            raise ParameterError(f"--grid point {point.key}: {exc}") from None
    return points


def _convert(name: str, text: str) -> Any:
    if name == "method":
        if text not in PRESETS:
            raise ParameterError(
                f"--grid: unknown method {text!r}; choose from {', '.join(PRESETS)}"
            )
        return text
    try:
        return convert_field(name, text)
    except ParameterError as exc:
        raise ParameterError(f"--grid: {exc}") from None
