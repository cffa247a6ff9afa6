"""One sweep point: merge it, evaluate the merged model with the user's function, make its row."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FusionError, ParameterError
from ..pipeline import merge_checkpoints
from .grid import GridPoint
from .results import RESERVED


def load_eval(spec: str) -> Callable[[str], dict[str, float]]:
    """The function named by ``MODULE:FUNCTION`` (a dotted name inside the module works too)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ParameterError(f"--eval {spec!r} must look like MODULE:FUNCTION")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ParameterError(f"--eval {spec!r}: cannot import {module_name}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ParameterError(f"--eval {spec!r}: {module_name} has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ParameterError(f"--eval {spec!r} is not a function")
    return target


def eval_spec_of(function: Callable) -> str:
    """``MODULE:FUNCTION`` naming ``function``: what identifies the sweep and what the workers of
    the ray executor import."""
    module = getattr(function, "__module__", None) or "?"
    return f"{module}:{getattr(function, '__qualname__', repr(function))}"


@dataclass
class SweepJob:
    """What every point shares: inputs, the eval function, where models go, how to merge."""

    base: str
    tuned: str
    models_dir: str
    eval_spec: str
    backend: str | None = None
    device: str = "cpu"


def merge_point(job: SweepJob, point: GridPoint) -> Path:
    """Merge one point into its model directory (replacing an old one); returns the directory."""
    model_dir = Path(job.models_dir) / point.slug
    merge_checkpoints(
        job.base,
        job.tuned,
        model_dir,
        point.params(),
        backend=job.backend,
        device=job.device,
        overwrite=True,
        progress=False,
    )
    return model_dir


def run_point(job: SweepJob, point: GridPoint, evaluate: Callable | None = None) -> dict[str, Any]:
    """Merge and evaluate one point; returns its results row (the model is left on disk)."""
    evaluate = evaluate or load_eval(job.eval_spec)
    start = time.perf_counter()
    model_dir = merge_point(job, point)
    merged = time.perf_counter()
    try:
        metrics = evaluate(str(model_dir))
    except Exception as exc:
        raise FusionError(
            f"--eval {job.eval_spec} failed on {point.key}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(metrics, dict) or not metrics:
        raise FusionError(
            f"--eval {job.eval_spec} returned {type(metrics).__name__}; expected a non-empty "
            "dict of metric name -> number"
        )
    row: dict[str, Any] = {"point": point.key, **dict(point.values)}
    for name, value in metrics.items():
        if str(name) in RESERVED:
            raise FusionError(
                f"--eval {job.eval_spec}: metric {name!r} has the name of a results column; "
                "rename it"
            )
        try:
            row[str(name)] = float(value)
        except (TypeError, ValueError):
            raise FusionError(
                f"--eval {job.eval_spec}: metric {name!r} is {value!r}, not a number"
            ) from None
    row["merge_seconds"] = round(merged - start, 4)
    row["eval_seconds"] = round(time.perf_counter() - merged, 4)
    row["model"] = str(model_dir)
    return row
