"""What ``--eval`` names, loaded: user functions (``MODULE:FUNCTION``, model directory ->
``{metric: number}``), the built-in ``lm-eval:TASK[,TASK...]`` scorer, and several of them at once
(``--eval`` repeated), whose metrics are merged into one row.

Several specs travel as one string joined by :data:`JOIN`, so a sweep's identity and a Ray worker's
job stay plain text.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from ..errors import FusionError, ParameterError
from .lm_eval_scorer import LmEvalScorer, is_lm_eval, parse_eval_args

JOIN = " + "

Evaluator = Callable[[str], dict[str, float]]


def join_specs(specs: str | Sequence[str]) -> str:
    """One string for one or several ``--eval`` specs."""
    return specs if isinstance(specs, str) else JOIN.join(s.strip() for s in specs)


def split_specs(spec: str) -> list[str]:
    """The ``--eval`` specs in a joined string."""
    return [part.strip() for part in spec.split(JOIN.strip())]


def load_function(spec: str, option: str = "--eval") -> Callable:
    """The function named by ``MODULE:FUNCTION`` (a dotted name inside the module works too)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ParameterError(f"{option} {spec!r} must look like MODULE:FUNCTION")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ParameterError(f"{option} {spec!r}: cannot import {module_name}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ParameterError(f"{option} {spec!r}: {module_name} has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ParameterError(f"{option} {spec!r} is not a function")
    return target


@lru_cache(maxsize=16)
def load_evaluator(spec: str, eval_args: tuple[str, ...] = ()) -> Evaluator:
    """The evaluator for a joined ``--eval`` string, checked up front: functions imported,
    lm-eval's tasks looked up. Cached, so loading the same spec twice gives the same object."""
    specs = split_specs(spec)
    repeated = [s for i, s in enumerate(specs) if s in specs[:i]]
    if repeated:
        raise ParameterError(f"--eval names {repeated[0]!r} twice")
    builtin = [s for s in specs if is_lm_eval(s)]
    if len(builtin) > 1:
        raise ParameterError("--eval: name every lm-eval task in one lm-eval:TASK,TASK,...")
    if eval_args and not builtin:
        raise ParameterError("--eval-arg sets lm-eval's options; it needs --eval lm-eval:TASK")
    options = parse_eval_args(eval_args)
    parts: list[tuple[str, Evaluator]] = []
    for part in specs:
        if is_lm_eval(part):
            scorer = LmEvalScorer(part, options)
            scorer.check()
            parts.append((part, scorer))
        else:
            parts.append((part, load_function(part)))
    return parts[0][1] if len(parts) == 1 else Combined(tuple(parts))


class Combined:
    """Several evaluators called in turn on one model; their metrics in one dict, in order."""

    def __init__(self, parts: tuple[tuple[str, Evaluator], ...]):
        self.parts = parts

    def __call__(self, model_dir: str) -> dict[str, float]:
        merged: dict[str, float] = {}
        owner: dict[str, str] = {}
        for spec, evaluate in self.parts:
            try:
                metrics = evaluate(model_dir)
            except FusionError:
                raise
            except Exception as exc:
                raise FusionError(f"{spec}: {type(exc).__name__}: {exc}") from exc
            if not isinstance(metrics, dict):
                raise FusionError(f"{spec} returned {type(metrics).__name__}, not a dict")
            for name, value in metrics.items():
                if name in merged:
                    raise FusionError(
                        f"metric {name!r} comes from both {owner[name]} and {spec}; rename one"
                    )
                merged[name], owner[name] = value, spec
        return merged
