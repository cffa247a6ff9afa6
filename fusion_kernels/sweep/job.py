"""One sweep point: merge it, evaluate the merged model with the ``--eval`` scorers, make its row
(their metrics and the objective, ``OA``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FusionError
from ..evaluation.hooks import load_evaluator, split_specs
from ..evaluation.lm_eval_scorer import TEXT_EXPORT_NAME, is_lm_eval, is_multimodal
from ..evaluation.lmms_eval_scorer import is_lmms_eval
from ..evaluation.objective import parse_objective
from ..io.sources import open_checkpoint
from ..neurons import NeuronRules, parse_rule
from ..params import MergeParams, TensorParams, parse_override
from ..pipeline import merge_checkpoints
from ..textexport import export_text_model
from .grid import GridPoint
from .results import RESERVED


def load_eval(
    spec: str, eval_args: tuple[str, ...] | list[str] = (), device: str | None = None
) -> Callable[[str], dict]:
    """The evaluator named by ``--eval``: ``MODULE:FUNCTION`` (a dotted name inside the module
    works too), ``lm-eval:TASK[,TASK...]``, ``lmms-eval:TASK[,TASK...]``, ``paper``, or several
    joined (see :mod:`fusion_kernels.evaluation.hooks`); the built-in scorers run on ``device``
    (the sweep's ``--device``; None: CUDA when present, else the CPU)."""
    return load_evaluator(spec, tuple(eval_args), device)


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
    #: ``--eval-arg KEY=VALUE`` items for the built-in scorers, and ``--objective``.
    eval_args: tuple[str, ...] = ()
    objective: str | None = None
    #: The merge options every point shares, as on merge's command line: ``--set`` overrides,
    #: ``--neuron-rule`` rules, ``--map`` rules, ``--layer-map``, ``--allow-unpaired``,
    #: ``--memory-budget`` and ``--max-shard-size`` in bytes, and the model card.
    overrides: tuple[str, ...] = ()
    neuron_rules: tuple[str, ...] = ()
    name_map: tuple[str, ...] = ()
    layer_map: str | None = None
    allow_unpaired: bool = False
    memory_budget: int | None = None
    max_shard_size: int | None = None
    model_card: bool = True

    def params(self, point: GridPoint) -> TensorParams:
        """The point's parameters, with the ``--set`` overrides for the tensors they match."""
        return TensorParams(point.params(), [parse_override(text) for text in self.overrides])

    def rules(self) -> NeuronRules:
        """The neuron rules: ``--neuron-rule`` before the defaults."""
        return NeuronRules([parse_rule(text) for text in self.neuron_rules])

    def pairing(self) -> dict[str, Any]:
        """How tuned tensors pair with base ones, as keyword arguments of a merge or an export."""
        return {
            "name_map": list(self.name_map),
            "layer_map": self.layer_map,
            "allow_unpaired": self.allow_unpaired,
        }

    #: The ``--device`` given (None: not given), where the built-in scorers run the model.
    eval_device: str | None = None


def merge_point(job: SweepJob, point: GridPoint) -> Path:
    """Merge one point into its model directory (replacing an old one); returns the directory."""
    model_dir = Path(job.models_dir) / point.slug
    merge_checkpoints(
        job.base,
        job.tuned,
        model_dir,
        job.params(point),
        rules=job.rules(),
        backend=job.backend,
        device=job.device,
        max_shard_size=job.max_shard_size,
        memory_budget=job.memory_budget,
        model_card=job.model_card,
        overwrite=True,
        progress=False,
        **job.pairing(),
    )
    export_language_model(job, model_dir, model_dir / TEXT_EXPORT_NAME)
    return model_dir


def export_language_model(job: SweepJob, model: str | os.PathLike, out: Path) -> Path | None:
    """When lm-eval scores the sweep and ``model`` (a directory, or any reference ``--tuned``
    takes) is multimodal, write its language model alone to ``out`` as the base names it
    (``--text-model-out``), the model the harness loads; returns ``out``, or None when no export
    is needed."""
    if not any(is_lm_eval(s) for s in split_specs(job.eval_spec)):
        return None
    checkpoint = open_checkpoint(model)  # a Hub id or MODEL+ADAPTER: the directory of its config
    checkpoint.close()
    if not is_multimodal(checkpoint.directory):
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    export_text_model(job.base, model, out, overwrite=True, **job.pairing())
    return out


def multimodal_frame(job: SweepJob, model: str | os.PathLike, out: Path) -> Path | None:
    """When lmms-eval scores the sweep, ``model`` (a reference input) is a language model and
    the tuned model multimodal, write ``model`` in the merged models' frame to ``out``: the tuned
    model's layout, vision tower and files with ``model``'s language weights (a merge that adds
    none of the task vector, weight 0), the model lmms-eval loads; returns ``out``, or None when
    ``model`` is scored as it is."""
    if not any(is_lmms_eval(s) for s in split_specs(job.eval_spec)):
        return None
    checkpoint, tuned = open_checkpoint(model), open_checkpoint(job.tuned)
    checkpoint.close()
    tuned.close()
    if is_multimodal(checkpoint.directory) or not is_multimodal(tuned.directory):
        return None
    merge_checkpoints(
        model,
        job.tuned,
        out,
        MergeParams(weight=0.0),
        rules=job.rules(),
        backend=job.backend,
        device=job.device,
        memory_budget=job.memory_budget,
        model_card=False,
        overwrite=True,
        progress=False,
        **job.pairing(),
    )
    return out


def run_point(job: SweepJob, point: GridPoint, evaluate: Callable | None = None) -> dict[str, Any]:
    """Merge and evaluate one point; returns its results row (the model is left on disk)."""
    evaluate = evaluate or load_eval(job.eval_spec, job.eval_args, job.eval_device)
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
    row.update(parse_objective(job.objective)({str(k): row[str(k)] for k in metrics}))
    row["merge_seconds"] = round(merged - start, 4)
    row["eval_seconds"] = round(time.perf_counter() - merged, 4)
    row["model"] = str(model_dir)
    return row
