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
from ..evaluation.hooks import join_specs, split_specs
from ..evaluation.objective import parse_objective
from ..evaluation.report import write_report
from ..evaluation.tradeoff import parse_tradeoff
from ..io.outputs import check_output_path
from ..io.safeload import MAX_CONFIG_BYTES, load_json
from ..pipeline import plan_merge
from ..streaming.device import parse_device
from .grid import GridPoint, parse_grid
from .job import SweepJob, eval_spec_of, export_language_model, load_eval, merge_point, run_point
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
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) a sweep into ``out``; returns ``{"rows", "best", "plots", "skipped",
    "references", "tradeoff", "page", "scored_models"}``.

    Args:
        grid: ``name=v1,v2;name=...`` (see :func:`parse_grid`) or parsed points.
        evaluate: ``MODULE:FUNCTION``, ``lm-eval:TASK[,TASK...]``, a list of them (their metrics
            are combined), or a function: merged model directory -> {metric: number}. The ray
            executor needs one that other processes can import.
        eval_args: ``KEY=VALUE`` options of the lm-eval scorer (limit, batch_size, device,
            include_path, ...; see :data:`fusion_kernels.evaluation.lm_eval_scorer.EVAL_ARGS`).
        objective: ``M1,M2,...`` (their mean) or ``MODULE:FUNCTION`` of the metrics, written as
            ``OA``; default: the mean of LA and VA when both are returned.
        tradeoff: ``X,Y``: the metrics of the trade-off scatter (default LA,VA).
        score_inputs: also score base and tuned once, as the scatter's reference points.
        keep: merged models left in ``out/models``: ``best``, ``all`` or ``none``.
        metric, maximize: what "best" means (default: the largest ``OA``, else the largest first
            metric returned).
        executor: ``local`` (one point at a time, here) or ``ray`` (see :mod:`.ray_executor`).
        ray_address, cpus_per_trial, gpus_per_trial: the ray executor's cluster and resources.
        backend, device: how each merge runs (device default: ``cuda`` with GPUs per trial).
        log: where progress lines go.

    Points already in ``out/results.csv`` are skipped; ``out`` must be new, empty, or a sweep of
    the same base, tuned and eval function (and ``eval_args`` and ``objective``, when given). A
    bad grid, eval name or path raises
    :class:`FusionError` before any merge.
    """
    points = parse_grid(grid) if isinstance(grid, str) else list(grid)
    if keep not in KEEP_MODES:
        raise ParameterError(f"--keep must be one of {', '.join(KEEP_MODES)}, got {keep!r}")
    if executor not in ("local", "ray"):
        raise ParameterError(f"--executor must be local or ray, got {executor!r}")
    named = isinstance(evaluate, str | list | tuple)
    spec = join_specs(evaluate) if named else eval_spec_of(evaluate)
    eval_args = tuple(eval_args)
    function = load_eval(spec, eval_args) if named else evaluate
    target = parse_objective(objective)
    axes = parse_tradeoff(tradeoff)
    out_dir = Path(out).resolve()
    base_path, tuned_path = Path(base).resolve(), Path(tuned).resolve()
    # Unreadable or unmergeable inputs, and a bad device, fail before any work.
    base_ckpt, tuned_ckpt, _ = plan_merge(base_path, tuned_path)
    device = device or ("cuda" if gpus_per_trial > 0 else "cpu")
    parse_device(device)
    check_output_path(out_dir, [*base_ckpt.roots, *tuned_ckpt.roots])
    base_ckpt.close()
    tuned_ckpt.close()
    identity = {"base": str(base_path), "tuned": str(tuned_path), "eval": spec}
    # Options that change the scores are part of the sweep's identity, when given.
    identity.update(
        {k: v for k, v in [("eval_args", " ".join(eval_args)), ("objective", objective)] if v}
    )
    _claim(out_dir, identity)
    job = SweepJob(
        str(base_path),
        str(tuned_path),
        str(out_dir / "models"),
        spec,
        backend,
        device,
        eval_args,
        objective,
    )
    results = Results(out_dir / RESULTS_NAME)
    keeper = Keeper(results, keep, metric, maximize, out_dir / "models")
    todo = [p for p in points if p.key not in results.rows]
    log(f"sweep: {len(points)} points, {len(points) - len(todo)} already in {results.path}")
    done = []

    def record(row: dict[str, Any]) -> None:
        keeper.add(row)
        done.append(row["point"])
        log(f"[{len(done)}/{len(todo)}] {row['point']}: {_metrics_text(row, results.metrics())}")

    if executor == "ray":
        from .ray_executor import run_ray

        if todo and not _importable(spec, function, eval_args):
            raise ParameterError(
                f"--executor ray: the eval function {spec} cannot be imported by other "
                "processes; define it at the top level of a module and pass MODULE:FUNCTION"
            )
        run_ray(job, todo, record, ray_address, cpus_per_trial, gpus_per_trial)
    else:
        for point in todo:
            record(run_point(job, point, function))
    keeper.finish(points, functools.partial(merge_point, job))
    names = [name for name, _ in points[0].values] if points else []
    rows = [results.rows[p.key] for p in points if p.key in results.rows]
    plots = write_plots(rows, names, results.metrics(), out_dir / "plots", log)
    best = keeper.best()
    inputs = {"base": job.base, "tuned": job.tuned} if score_inputs else {}
    references = reference_points.score_inputs(
        inputs,
        function,
        spec,
        target,
        out_dir / reference_points.REFERENCES_NAME,
        log,
        lambda name, model: export_language_model(job, model, out_dir / "references" / name),
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
    return {
        "rows": rows,
        "best": best,
        "plots": plots,
        "skipped": len(points) - len(todo),
        "references": references,
        **report,
    }


def _importable(spec: str, function: Callable, eval_args: tuple[str, ...]) -> bool:
    """Whether a worker process importing ``spec`` gets ``function``."""
    if any(part.startswith("__main__:") for part in split_specs(spec)):
        return False
    try:
        return load_eval(spec, eval_args) is function
    except ParameterError:
        return False


def _claim(out_dir: Path, identity: dict[str, str]) -> None:
    marker = out_dir / SWEEP_NAME
    if marker.exists():
        previous = load_json(marker, MAX_CONFIG_BYTES, ParameterError)
        if not isinstance(previous, dict):
            raise ParameterError(f"{marker} is not a sweep record; choose another --out")
        changed = [k for k in {**previous, **identity} if previous.get(k) != identity.get(k)]
        if changed:
            raise ParameterError(
                f"--out {out_dir} holds a sweep with another {', '.join(changed)} "
                f"({', '.join(str(previous.get(k)) for k in changed)}); choose another --out"
            )
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ParameterError(f"--out {out_dir} exists and is not a sweep; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity, indent=2) + "\n")


def _metrics_text(row: dict[str, Any], metrics: list[str]) -> str:
    shown = " ".join(f"{name}={row[name]:g}" for name in metrics if name in row)
    return f"{shown} (merge {row['merge_seconds']:.2f} s, eval {row['eval_seconds']:.2f} s)"
