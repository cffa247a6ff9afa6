"""Running a sweep: every point of a grid merged and evaluated (here or as Ray Tune trials),
resumable from ``results.csv``, then its report (plots, the trade-off, the page, scores in the kept
models; see :mod:`fusion_kernels.evaluation`)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ParameterError
from ..evaluation import references as reference_points
from ..evaluation.hooks import check_families, join_specs, split_specs
from ..evaluation.objective import parse_objective
from ..evaluation.report import write_report
from ..evaluation.tradeoff import parse_tradeoff
from ..io.outputs import check_output_path
from ..io.safeload import MAX_CONFIG_BYTES, load_json
from ..io.sources import split_adapter
from ..pipeline import plan_merge
from ..streaming.device import parse_device
from .grid import GridPoint, parse_grid
from .job import (
    SweepJob,
    eval_spec_of,
    export_language_model,
    load_eval,
    merge_point,
    multimodal_frame,
    run_point,
)
from .plots import write_plots
from .results import KEEP_MODES, RESULTS_NAME, Keeper, Results

SWEEP_NAME = "sweep.json"


def run_sweep(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    out: str | os.PathLike,
    grid: str | list[GridPoint],
    evaluate: str | list[str] | Callable[[str], dict[str, float]],
    *,
    eval_args: tuple[str, ...] | list[str] = (),
    objective: str | None = None,
    tradeoff: str | None = None,
    score_inputs: bool = False,
    keep: str = "best",
    metric: str | None = None,
    maximize: bool = True,
    executor: str = "local",
    ray_address: str | None = None,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    backend: str | None = None,
    device: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    neuron_rules: tuple[str, ...] | list[str] = (),
    name_map: tuple[str, ...] | list[str] = (),
    layer_map: str | None = None,
    allow_unpaired: bool = False,
    memory_budget: int | None = None,
    max_shard_size: int | None = None,
    model_card: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) a sweep into ``out``; returns ``{"rows", "best", "plots", "skipped",
    "references", "tradeoff", "page", "scored_models"}``.

    Args:
        base, tuned: any reference merge takes (a directory or weights file, a Hub id,
            ``MODEL+ADAPTER`` for tuned).
        grid: ``name=v1,v2;name=...`` (see :func:`parse_grid`) or parsed points.
        evaluate: ``MODULE:FUNCTION``, ``lm-eval:TASK[,TASK...]`` (LA),
            ``lmms-eval:TASK[,TASK...]`` (VA), ``paper`` (both, the paper's benchmarks), a list of
            them (their metrics are combined), or a function: merged model directory ->
            {metric: number}. The ray executor needs one that other processes can import.
        eval_args: ``[lm-eval:|lmms-eval:]KEY=VALUE`` options of the built-in scorers (limit,
            batch_size, device, include_path, ...; see ``EVAL_ARGS`` in
            :mod:`fusion_kernels.evaluation.lm_eval_scorer` and ``lmms_eval_scorer``).
        objective: ``M1,M2,...`` (their mean) or ``MODULE:FUNCTION`` of the metrics, written as
            ``OA``; default: the mean of LA and VA when both are returned.
        tradeoff: ``X,Y``: the metrics of the trade-off scatter (default LA,VA).
        score_inputs: also score base and tuned once, as the scatter's reference points.
        keep: merged models left in ``out/models``: ``best``, ``all`` or ``none``.
        metric, maximize: what "best" means (default: the largest ``OA``, else the largest first
            metric returned); of equal points, the first in grid order is the best.
        executor: ``local`` (one point at a time, here) or ``ray`` (see :mod:`.ray_executor`).
        ray_address, cpus_per_trial, gpus_per_trial: the ray executor's cluster and resources.
        backend, device: how each merge runs (device default: ``cuda`` with GPUs per trial); the
            built-in scorers run on ``device`` when given, else on CUDA when present, else the
            CPU.
        overrides, neuron_rules, name_map, layer_map, allow_unpaired, memory_budget,
            max_shard_size, model_card: merge's ``--set``, ``--neuron-rule``, ``--map``,
            ``--layer-map``, ``--allow-unpaired``, ``--memory-budget``, ``--max-shard-size`` and
            ``--no-model-card``, the same for every point.
        log: where progress lines go.

    Points already in ``out/results.csv`` are skipped; ``out`` must be new, empty, a sweep with
    no point done yet, or a sweep of the same base, tuned, eval function and merge options (and
    ``eval_args`` and ``objective``, when given). ``results.csv`` lists the points in grid order,
    whatever order they finish in. A bad grid, eval name, option or path raises
    :class:`FusionError` before any merge.
    """
    points = parse_grid(grid) if isinstance(grid, str) else list(grid)
    _check_choices(keep, executor)
    named = isinstance(evaluate, str | list | tuple)
    spec = join_specs(evaluate) if named else eval_spec_of(evaluate)
    eval_args = tuple(eval_args)
    # The built-in scorers run where the sweep runs (see load_eval).
    function = load_eval(spec, eval_args, device) if named else evaluate
    target, axes = parse_objective(objective), parse_tradeoff(tradeoff)
    out_dir = Path(out).resolve()
    job = SweepJob(
        absolute_reference(base),
        absolute_reference(tuned),
        str(out_dir / "models"),
        spec,
        backend,
        device or ("cuda" if gpus_per_trial > 0 else "cpu"),
        eval_args,
        objective,
        tuple(overrides),
        tuple(neuron_rules),
        tuple(name_map),
        layer_map,
        allow_unpaired,
        memory_budget,
        max_shard_size,
        model_card,
        device,  # the given --device: where the built-in scorers run (None: see load_eval)
    )
    _check_job(job, points, out_dir, function)
    identity = sweep_identity(job)
    _claim(out_dir, identity)
    results = Results(out_dir / RESULTS_NAME, [p.key for p in points])
    keeper = Keeper(results, keep, metric, maximize, out_dir / "models")
    todo = [p for p in points if p.key not in results.rows]
    log(f"sweep: {len(points)} points, {len(points) - len(todo)} already in {results.path}")
    runner = (ray_address, cpus_per_trial, gpus_per_trial) if executor == "ray" else None
    _run_points(job, todo, function, keeper, runner, log)
    keeper.finish(points, functools.partial(merge_point, job))
    report = _report(
        job, points, results, keeper, identity, function, target, axes, score_inputs, log
    )
    return {**report, "skipped": len(points) - len(todo)}


def absolute_reference(reference: str | os.PathLike) -> str:
    """A checkpoint reference with each local path in it made absolute (the Ray workers and the
    sweep record must find the same files from anywhere); Hub ids stay as written."""
    text = os.fspath(reference)
    parts = split_adapter(text) or (text,)
    return "+".join(str(Path(p).resolve()) if Path(p).exists() else p for p in parts)


def sweep_identity(job: SweepJob) -> dict[str, Any]:
    """What a sweep directory is a sweep of: inputs, scorer, and every option that changes the
    merged models or their scores (those left at their defaults are not listed, so adding an
    option here keeps older sweeps resumable)."""
    identity: dict[str, Any] = {"base": job.base, "tuned": job.tuned, "eval": job.eval_spec}
    optional = {
        "eval_args": " ".join(job.eval_args),
        "objective": job.objective,
        "set": list(job.overrides),
        "neuron_rule": list(job.neuron_rules),
        "map": list(job.name_map),
        "layer_map": job.layer_map,
        "allow_unpaired": job.allow_unpaired,
    }
    identity.update({k: v for k, v in optional.items() if v})
    return identity


def _check_choices(keep: str, executor: str) -> None:
    if keep not in KEEP_MODES:
        raise ParameterError(f"--keep must be one of {', '.join(KEEP_MODES)}, got {keep!r}")
    if executor not in ("local", "ray"):
        raise ParameterError(f"--executor must be local or ray, got {executor!r}")


def _check_job(job: SweepJob, points: list[GridPoint], out_dir: Path, function) -> None:
    """Unreadable or unmergeable inputs, bad merge options, a bad device, a model family the
    scorers cannot load and an ``out`` that overlaps an input fail before any work."""
    base_ckpt, tuned_ckpt, plan = plan_merge(
        job.base, job.tuned, job.rules(), job.max_shard_size, **job.pairing()
    )
    try:
        parse_device(job.device)
        check_families(function, tuned_ckpt.directory)
        merged = [name for name, task in plan.tasks.items() if task.action == "merge"]
        for point in points:
            try:
                job.params(point).check(merged)
            except ParameterError as exc:
                raise ParameterError(f"--grid point {point.key} with --set: {exc}") from None
        check_output_path(out_dir, [*base_ckpt.roots, *tuned_ckpt.roots])
    finally:
        base_ckpt.close()
        tuned_ckpt.close()


def _run_points(job, todo, function, keeper: Keeper, ray: tuple | None, log) -> None:
    """Merge and score every point still to do, here or (``ray``: address, CPUs and GPUs per
    trial) as Ray Tune trials; each row is recorded as it arrives."""
    done = []

    def record(row: dict[str, Any]) -> None:
        keeper.add(row)
        done.append(row["point"])
        metrics = keeper.results.metrics()
        log(f"[{len(done)}/{len(todo)}] {row['point']}: {_metrics_text(row, metrics)}")

    if ray is None:
        for point in todo:
            record(run_point(job, point, function))
        return
    from .ray_executor import run_ray

    if todo and not _importable(job.eval_spec, function, job.eval_args, job.eval_device):
        raise ParameterError(
            f"--executor ray: the eval function {job.eval_spec} cannot be imported by other "
            "processes; define it at the top level of a module and pass MODULE:FUNCTION"
        )
    run_ray(job, todo, record, *ray)


def _report(job, points, results, keeper, identity, function, target, axes, score_inputs, log):
    """Plots, the reference points, the page; returns :func:`run_sweep`'s result."""
    out_dir = results.path.parent
    names = [name for name, _ in points[0].values] if points else []
    rows = [results.rows[p.key] for p in points if p.key in results.rows]
    plots = write_plots(rows, names, results.metrics(), out_dir / "plots", log)
    best = keeper.best()
    inputs = {"base": job.base, "tuned": job.tuned} if score_inputs else {}
    references = reference_points.score_inputs(
        inputs,
        function,
        job.eval_spec,
        target,
        out_dir / reference_points.REFERENCES_NAME,
        log,
        lambda name, model: export_language_model(job, model, out_dir / "references" / name),
        lambda name, model: multimodal_frame(
            job, model, out_dir / "references" / f"{name}_multimodal"
        ),
    )
    report = write_report(
        out_dir,
        identity,
        names,
        results.columns,
        results.metrics(),
        rows,
        references=references,
        plots=plots,
        best=best,
        best_metric=keeper.metric,
        objective=target,
        tradeoff=axes,
        log=log,
    )
    if best is not None:
        log(f"best {keeper.metric}: {best[keeper.metric]} at {best['point']} {best['model']}")
    return {"rows": rows, "best": best, "plots": plots, "references": references, **report}


def _importable(
    spec: str, function: Callable, eval_args: tuple[str, ...], device: str | None
) -> bool:
    """Whether a worker process importing ``spec`` gets ``function``."""
    if any(part.startswith("__main__:") for part in split_specs(spec)):
        return False
    try:
        return load_eval(spec, eval_args, device) is function
    except ParameterError:
        return False


def _claim(out_dir: Path, identity: dict[str, Any]) -> None:
    """Make ``out_dir`` the sweep ``identity`` names: new, empty, a sweep with no point done
    yet (one that failed on its first point is taken over, whatever it was run with), or a
    sweep of the same identity (resumed)."""
    marker = out_dir / SWEEP_NAME
    if marker.exists():
        previous = load_json(marker, MAX_CONFIG_BYTES, ParameterError)
        if not isinstance(previous, dict):
            raise ParameterError(f"{marker} is not a sweep record; choose another --out")
        changed = [k for k in {**previous, **identity} if previous.get(k) != identity.get(k)]
        done = len(Results(out_dir / RESULTS_NAME).rows)
        if changed and done:
            raise ParameterError(
                f"--out {out_dir} holds a sweep with another {', '.join(changed)} "
                f"({'; '.join(str(previous.get(k)) for k in changed)}) and {done} points done; "
                "rerun with its options to resume it, or choose another --out"
            )
        if changed:
            # Nothing scored under the old identity survives it: its reference scores neither.
            (out_dir / reference_points.REFERENCES_NAME).unlink(missing_ok=True)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ParameterError(f"--out {out_dir} exists and is not a sweep; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity, indent=2) + "\n")


def _metrics_text(row: dict[str, Any], metrics: list[str]) -> str:
    shown = " ".join(f"{name}={row[name]:g}" for name in metrics if name in row)
    return f"{shown} (merge {row['merge_seconds']:.2f} s, eval {row['eval_seconds']:.2f} s)"
