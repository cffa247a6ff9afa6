"""What ``--eval`` names, loaded: user functions (``MODULE:FUNCTION``, model directory ->
``{metric: number}``), the built-in scorers ``lm-eval:TASK[,TASK...]`` (language ability, LA) and
``lmms-eval:TASK[,TASK...]`` (visual ability, VA), the preset ``paper`` (both, on the paper's
benchmarks), and several of them at once (``--eval`` repeated), whose metrics are merged into one
row.

Several specs travel as one string joined by :data:`JOIN`, so a sweep's identity and a Ray worker's
job stay plain text.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from ..errors import FusionError, ParameterError
from . import lm_eval_scorer, lmms_eval_scorer
from .harness import builtin_of, route_eval_args

JOIN = " + "

#: ``--eval`` presets: a name for the scorers it stands for. ``paper``: the paper's measurement,
#: LA over its seven language benchmarks (lm-eval's task names) and VA over its six visual ones
#: (lmms-eval's: MMMU's validation split, ScienceQA's image questions, MMBench's dev splits).
PRESETS = {
    "paper": (
        "lm-eval:race,commonsense_qa,piqa,openbookqa,gsm8k,arc_easy,arc_challenge",
        "lmms-eval:mme,mmmu_val,scienceqa_img,gqa,mmbench_cn_dev,mmbench_en_dev",
    ),
}
#: Each built-in scorer: its module (``EVAL_ARGS``, ``parse_eval_args``) and its class.
SCORERS = {
    "lm-eval": (lm_eval_scorer, lm_eval_scorer.LmEvalScorer),
    "lmms-eval": (lmms_eval_scorer, lmms_eval_scorer.LmmsEvalScorer),
}

Evaluator = Callable[[str], dict[str, float]]


def join_specs(specs: str | Sequence[str]) -> str:
    """One string for one or several ``--eval`` specs, presets expanded."""
    parts = split_specs(specs) if isinstance(specs, str) else [s.strip() for s in specs]
    return JOIN.join(spec for part in parts for spec in PRESETS.get(part, (part,)))


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
def load_evaluator(
    spec: str, eval_args: tuple[str, ...] = (), device: str | None = None
) -> Evaluator:
    """The evaluator for a joined ``--eval`` string, checked up front: functions imported, the
    built-in scorers' tasks looked up. ``device``: the sweep's ``--device``, where the built-in
    scorers run the model unless ``--eval-arg device=`` says. Cached, so loading the same spec
    twice gives the same object."""
    specs = split_specs(join_specs(spec))
    repeated = [s for i, s in enumerate(specs) if s in specs[:i]]
    if repeated:
        raise ParameterError(f"--eval names {repeated[0]!r} twice")
    used = [builtin_of(s) for s in specs if builtin_of(s)]
    for name in SCORERS:
        if used.count(name) > 1:
            raise ParameterError(f"--eval: name every {name} task in one {name}:TASK,TASK,...")
    routed = route_eval_args(eval_args, {n: tuple(SCORERS[n][0].EVAL_ARGS) for n in used})
    parts: list[tuple[str, Evaluator]] = []
    for part in specs:
        name = builtin_of(part)
        if name is None:
            parts.append((part, load_function(part)))
            continue
        module, scorer_class = SCORERS[name]
        scorer = scorer_class(part, module.parse_eval_args(routed[name]), device)
        scorer.check()
        parts.append((part, scorer))
    return parts[0][1] if len(parts) == 1 else Combined(tuple(parts))


def builtin_scorers(evaluator: Evaluator) -> list[Any]:
    """The built-in scorers inside an evaluator (one, or the parts of a :class:`Combined`)."""
    parts = evaluator.parts if isinstance(evaluator, Combined) else (("", evaluator),)
    classes = tuple(scorer_class for _, scorer_class in SCORERS.values())
    return [part for _, part in parts if isinstance(part, classes)]


def check_families(evaluator: Evaluator, tuned: str | os.PathLike) -> None:
    """Refuse, before the sweep starts, a tuned model whose family lmms-eval cannot load (the
    merged models share its layout); the error names the families it can."""
    for scorer in builtin_scorers(evaluator):
        if isinstance(scorer, lmms_eval_scorer.LmmsEvalScorer):
            scorer.model_name(tuned)


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
