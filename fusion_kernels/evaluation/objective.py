"""The objective: one number per point that says which is best, written as the ``OA`` column.

- ``--objective M1,M2,...``: the mean of the named metrics (the paper's OA: mean of LA and VA);
- ``--objective MODULE:FUNCTION``: your function of ``{metric: value}`` returning a number;
- no ``--objective``: ``OA = mean(LA, VA)`` when the evaluators return both and no ``OA`` of their
  own, else nothing (the best point is then chosen by ``--metric``, as before).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from ..errors import FusionError, ParameterError
from .hooks import load_function

OBJECTIVE_NAME = "OA"
#: The paper's two abilities, averaged when no objective is given.
PAPER_METRICS = ("LA", "VA")


@dataclass(frozen=True)
class Objective:
    """A parsed ``--objective`` (``spec`` None: the paper's default)."""

    spec: str | None
    metrics: tuple[str, ...] = ()
    function: Callable[[dict[str, float]], float] | None = None

    def __call__(self, scores: Mapping[str, float]) -> dict[str, float]:
        """``{"OA": value}`` for one point's metrics, or ``{}`` when the default does not apply."""
        if self.spec is None:
            if OBJECTIVE_NAME in scores or not all(m in scores for m in PAPER_METRICS):
                return {}
            return {OBJECTIVE_NAME: _mean([scores[m] for m in PAPER_METRICS])}
        if OBJECTIVE_NAME in scores:
            raise FusionError(
                f"--objective {self.spec}: the evaluators already return {OBJECTIVE_NAME}; "
                "drop --objective or rename their metric"
            )
        if self.function is None:
            missing = [m for m in self.metrics if m not in scores]
            if missing:
                raise ParameterError(
                    f"--objective {self.spec}: no metric {', '.join(map(repr, missing))}; "
                    f"the evaluators returned {list(scores)}"
                )
            return {OBJECTIVE_NAME: _mean([scores[m] for m in self.metrics])}
        try:
            value = self.function(dict(scores))
        except Exception as exc:
            raise FusionError(
                f"--objective {self.spec} failed: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            return {OBJECTIVE_NAME: float(value)}
        except (TypeError, ValueError):
            raise FusionError(f"--objective {self.spec} returned {value!r}, not a number") from None


@lru_cache(maxsize=8)
def parse_objective(spec: str | None) -> Objective:
    """``M1,M2,...`` or ``MODULE:FUNCTION`` (see the module docstring); None: the default."""
    if spec is None:
        return Objective(None)
    text = spec.strip()
    if ":" in text:
        return Objective(text, function=load_function(text, "--objective"))
    metrics = tuple(m.strip() for m in text.split(","))
    if not all(metrics) or len(set(metrics)) != len(metrics):
        raise ParameterError(
            f"--objective {spec!r} must be METRIC[,METRIC...] (each once) or MODULE:FUNCTION"
        )
    if OBJECTIVE_NAME in metrics:
        raise ParameterError(f"--objective {spec!r} cannot average {OBJECTIVE_NAME}, its result")
    return Objective(text, metrics)


def _mean(values: list[float]) -> float:
    numbers = [float(v) for v in values]
    return math.fsum(numbers) / len(numbers)
