"""The Ray executor of ``fusion_kernels.sweep``: every grid point is a Ray Tune trial with its own
CPU and GPU resources, so points run side by side on one machine or across a cluster.

Ray is optional (``pip install 'fusion_kernels[ray]'``) and imported only here. On a cluster, the
checkpoints and ``--out`` must be on a filesystem every node sees, and the eval module must be
importable on every node. Results reach ``results.csv`` in the driver as trials finish, so an
interrupted sweep resumes like a local one; ``--keep`` prunes models as their rows arrive.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import FusionError
from ..evaluation.harness import builtin_of
from ..evaluation.hooks import split_specs
from .grid import GridPoint
from .job import SweepJob, run_point

_ROW_KEY = "fusion_kernels_row"


def _import_ray():
    try:
        import ray
        from ray import tune
    except ImportError:
        raise FusionError(
            "--executor ray needs Ray: pip install 'fusion_kernels[ray]' (or 'ray[tune]')"
        ) from None
    return ray, tune


def import_root(eval_spec: str) -> str:
    """The directory the eval module is imported from, for workers whose path lacks it ("" for
    modules without a file, which every interpreter has anyway, and for the built-in scorers)."""
    user_specs = [s for s in split_specs(eval_spec) if builtin_of(s) is None]
    if not user_specs:
        return ""
    module_name = user_specs[0].partition(":")[0]
    file = getattr(importlib.import_module(module_name), "__file__", None)
    if not file:
        return ""
    path = Path(file).resolve()
    # a.b.c lives in ROOT/a/b/c.py or ROOT/a/b/c/__init__.py
    depth = module_name.count(".") + (1 if path.name == "__init__.py" else 0)
    return str(path.parents[depth])


def _trial(config: dict[str, Any]) -> dict[str, str]:
    """One grid point, in a Ray worker: merge, evaluate, hand the row back as JSON."""
    if config["import_root"] and config["import_root"] not in sys.path:
        sys.path.insert(0, config["import_root"])
    job = SweepJob(**config["job"])
    point = GridPoint(tuple((name, value) for name, value in config["point"]))
    return {_ROW_KEY: json.dumps(run_point(job, point))}


def run_ray(
    job: SweepJob,
    points: list[GridPoint],
    record: Callable[[dict[str, Any]], None],
    address: str | None,
    cpus_per_trial: float,
    gpus_per_trial: float,
) -> None:
    """Run ``points`` as Ray Tune trials; ``record`` gets each row in the driver as it arrives.

    Joins ``address`` (a running cluster), or an instance this process already started with
    ``ray.init``, or else starts a local one and shuts it down at the end.
    """
    ray, tune = _import_ray()
    if not points:
        return
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise FusionError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    run_config_cls = getattr(tune, "RunConfig", None) or ray.train.RunConfig
    failure_config_cls = getattr(tune, "FailureConfig", None) or ray.train.FailureConfig
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    failures: list[BaseException] = []

    class Record(tune.Callback):
        # Runs in the driver, one result at a time: the table and --keep need no locking.
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if _ROW_KEY in result and not failures:
                try:
                    record(json.loads(result[_ROW_KEY]))
                except FusionError as exc:
                    failures.append(exc)

    try:
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
            param_space={
                "job": dataclasses.asdict(job),
                "import_root": import_root(job.eval_spec),
                "point": tune.grid_search([[list(v) for v in p.values] for p in points]),
            },
            tune_config=tune.TuneConfig(trial_dirname_creator=lambda trial: trial.trial_id),
            run_config=run_config_cls(
                name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(Path(job.models_dir).parent / "ray_tune"),
                verbose=0,
                callbacks=[Record()],
                failure_config=failure_config_cls(max_failures=0),
            ),
        )
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    if failures:
        raise failures[0]
    if grid.errors:
        first = _message(grid.errors[0])
        raise FusionError(f"{len(grid.errors)} of {len(points)} points failed; first: {first}")


def _message(error: BaseException) -> str:
    """The worker's own error message, without Ray's wrapping and traceback."""
    cause = getattr(error, "cause", None) or error.__cause__ or error
    text = str(cause).strip().splitlines()
    return next((line for line in reversed(text) if line.strip()), type(cause).__name__)
