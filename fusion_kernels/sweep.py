"""Sweeps: merge at every point of a parameter grid, evaluate each merged model with your function,
and keep a table, plots and the merged models asked for.

``python -m fusion_kernels.sweep --base B --tuned T --out O --grid GRID --eval MODULE:FUNCTION``

- ``GRID``: ``name=v1,v2;name=v1,...``, e.g. ``method=ties,neu-p-ties;density=0.1,0.2``; the
  names are ``method`` (a preset) and the merge parameters (``density``, ``top_neurons``, ...);
  the points are every combination, the preset's values overridden by the swept ones.
- ``--eval``: a function taking a merged model directory and returning ``{metric: number}``;
  ``fusion_kernels.miniature:evaluate`` is the built-in example; ``lm-eval:TASK[,TASK...]`` is the
  built-in lm-evaluation-harness scorer (options: ``--eval-arg KEY=VALUE``). Repeat ``--eval`` to
  combine scorers (language and visual ability); ``--objective`` makes their ``OA`` (see
  :mod:`.evaluation`).
- ``O/results.csv``: one row per point (parameters, metrics, merge and eval seconds, kept model),
  rewritten after every point, so re-running the same command skips the points already done.
- ``O/plots/``: each metric against each swept numeric parameter, one line per method, and the
  LA-vs-VA trade-off; ``O/index.html`` shows them with the table.
- ``--keep best|all|none``: which merged models stay in ``O/models/``; each carries its scores.

Exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .errors import FusionError, ParameterError
from .evaluation import references as reference_points
from .evaluation.hooks import join_specs, load_evaluator, split_specs
from .evaluation.objective import OBJECTIVE_NAME, parse_objective
from .evaluation.report import write_report
from .evaluation.tradeoff import parse_tradeoff
from .params import PRESETS, MergeParams, params_for
from .pipeline import check_output_path, merge_checkpoints, plan_merge
from .process import interrupt_on_sigterm, run_and_exit

RESULTS_NAME = "results.csv"
SWEEP_NAME = "sweep.json"
KEEP_MODES = ("best", "all", "none")
_FIELD_TYPES = {f.name: type(f.default) for f in dataclasses.fields(MergeParams)}
_FIELD_TYPES["rescale"] = str  # its default None means "the SPEC default"
_TAIL_COLUMNS = ("merge_seconds", "eval_seconds", "model")
_NAME_ORDER = ["method", *_FIELD_TYPES]
#: Columns that are not metrics: the point, its parameters and the bookkeeping.
_RESERVED = frozenset({"point", "method", *_FIELD_TYPES, *_TAIL_COLUMNS})


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
        if name != "method" and name not in _FIELD_TYPES:
            raise ParameterError(
                f"--grid: unknown parameter {name!r}; use method or one of "
                f"{', '.join(_FIELD_TYPES)}"
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
    axes.sort(key=lambda axis: _NAME_ORDER.index(axis[0]))
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
    kind = _FIELD_TYPES[name]
    try:
        if kind is bool:
            return text.lower() in ("1", "true", "yes")
        return kind(text)
    except ValueError:
        raise ParameterError(f"--grid: {name} cannot be {text!r}") from None


def load_eval(spec: str, eval_args: tuple[str, ...] | list[str] = ()) -> Callable[[str], dict]:
    """The evaluator named by ``--eval``: ``MODULE:FUNCTION`` (a dotted name inside the module works
    too), ``lm-eval:TASK[,TASK...]``, or several joined (see :mod:`.evaluation.hooks`)."""
    return load_evaluator(spec, tuple(eval_args))


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
    #: ``--eval-arg KEY=VALUE`` items for the lm-eval scorer, and ``--objective``.
    eval_args: tuple[str, ...] = ()
    objective: str | None = None


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
    evaluate = evaluate or load_eval(job.eval_spec, job.eval_args)
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
        if str(name) in _RESERVED:
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


class Results:
    """``results.csv``: rows by point key, columns in first-seen order; every change rewrites the
    file atomically, so an interrupted sweep leaves a valid table to resume from."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        self.columns: list[str] = []
        if path.exists():
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                self.columns = [c for c in reader.fieldnames or [] if c not in _TAIL_COLUMNS]
                for row in reader:
                    self.rows[row["point"]] = row

    def metrics(self) -> list[str]:
        """Metric columns, in the order the eval function first returned them."""
        return [c for c in self.columns if c not in _RESERVED]

    def put(self, row: dict[str, Any]) -> None:
        self.columns += [c for c in row if c not in self.columns and c not in _TAIL_COLUMNS]
        self.rows[row["point"]] = row
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, [*self.columns, *_TAIL_COLUMNS], restval="")
            writer.writeheader()
            writer.writerows(self.rows.values())
        os.replace(tmp, self.path)


class Keeper:
    """Records rows and applies ``--keep`` as they arrive: ``best`` holds only the best model so
    far on disk, ``none`` deletes each model once evaluated."""

    def __init__(self, results: Results, mode: str, metric: str | None, maximize: bool):
        self.results, self.mode, self.maximize = results, mode, maximize
        self._metric = metric

    @property
    def metric(self) -> str | None:
        """``--metric``, or else the objective (``OA``), or else the first metric returned."""
        metrics = self.results.metrics()
        if self._metric is None and OBJECTIVE_NAME in metrics:
            return OBJECTIVE_NAME
        return self._metric or next(iter(metrics), None)

    def score(self, row: dict[str, Any]) -> float:
        try:
            value = float(row.get(self.metric or "", "nan"))
        except ValueError:
            value = math.nan
        if math.isnan(value):
            return -math.inf
        return value if self.maximize else -value

    def best(self) -> dict[str, Any] | None:
        rows = list(self.results.rows.values())
        return max(rows, key=self.score) if rows and self.metric else None

    def add(self, row: dict[str, Any]) -> None:
        previous = self.best()
        self.results.put(row)
        if self.metric not in row:
            returned = [c for c in row if c not in _RESERVED and c not in _TAIL_COLUMNS]
            raise ParameterError(f"--metric {self.metric}: the eval function returned {returned}")
        if self.mode == "none":
            self._drop(row)
        elif self.mode == "best" and previous is not None:
            self._drop(previous if self.score(row) > self.score(previous) else row)

    def finish(self, job: SweepJob, points: list[GridPoint]) -> None:
        """Leave on disk exactly what ``--keep`` asks for, whatever earlier runs kept: ``best``
        merges the best point again if an earlier ``--keep none`` run dropped it."""
        if self.mode == "all":
            return
        best = self.best() if self.mode == "best" else None
        for row in self.results.rows.values():
            if row is not best:
                self._drop(row)
        point = next((p for p in points if best and p.key == best["point"]), None)
        if best and point and not (best.get("model") and Path(best["model"]).exists()):
            best["model"] = str(merge_point(job, point))
            self.results.write()

    def _drop(self, row: dict[str, Any]) -> None:
        if row.get("model"):
            shutil.rmtree(row["model"], ignore_errors=True)
            row["model"] = ""
            self.results.write()


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
    """Run (or resume) a sweep into ``out``; returns ``{"rows", "best", "plots", "skipped"}``.

    Args:
        grid: ``name=v1,v2;name=...`` (see :func:`parse_grid`) or parsed points.
        evaluate: ``MODULE:FUNCTION``, ``lm-eval:TASK[,TASK...]``, a list of them (their metrics
            are combined), or a function: merged model directory -> {metric: number}. The ray
            executor needs one that other processes can import.
        eval_args: ``KEY=VALUE`` options of the lm-eval scorer (limit, batch_size, device,
            include_path, ...; see :data:`.evaluation.lm_eval_scorer.EVAL_ARGS`).
        objective: ``M1,M2,...`` (their mean) or ``MODULE:FUNCTION`` of the metrics, written as
            ``OA``; default: the mean of LA and VA when both are returned.
        tradeoff: ``X,Y``: the metrics of the trade-off scatter (default LA,VA).
        score_inputs: also score base and tuned once, as the scatter's reference points.
        keep: merged models left in ``out/models``: ``best``, ``all`` or ``none``.
        metric, maximize: what "best" means (default: the largest ``OA``, else the largest first
            metric returned).
        executor: ``local`` (one point at a time, here) or ``ray`` (see :mod:`.sweep_ray`).
        ray_address, cpus_per_trial, gpus_per_trial: the ray executor's cluster and resources.
        backend, device: how each merge runs (device default: ``cuda`` with GPUs per trial).
        log: where progress lines go.

    Points already in ``out/results.csv`` are skipped; ``out`` must be new, empty, or a sweep of
    the same base, tuned and eval function. A bad grid, eval name or path raises
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
    plan_merge(base_path, tuned_path)  # unreadable or unmergeable inputs fail before any work
    check_output_path(out_dir / "models", [base_path, tuned_path])
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
        device or ("cuda" if gpus_per_trial > 0 else "cpu"),
        eval_args,
        objective,
    )
    results = Results(out_dir / RESULTS_NAME)
    keeper = Keeper(results, keep, metric, maximize)
    todo = [p for p in points if p.key not in results.rows]
    log(f"sweep: {len(points)} points, {len(points) - len(todo)} already in {results.path}")
    done = []

    def record(row: dict[str, Any]) -> None:
        keeper.add(row)
        done.append(row["point"])
        log(f"[{len(done)}/{len(todo)}] {row['point']}: {_metrics_text(row, results.metrics())}")

    if executor == "ray":
        from .sweep_ray import run_ray

        if todo and not _importable(spec, function, eval_args):
            raise ParameterError(
                f"--executor ray: the eval function {spec} cannot be imported by other "
                "processes; define it at the top level of a module and pass MODULE:FUNCTION"
            )
        run_ray(job, todo, record, ray_address, cpus_per_trial, gpus_per_trial)
    else:
        for point in todo:
            record(run_point(job, point, function))
    keeper.finish(job, points)
    names = [name for name, _ in points[0].values] if points else []
    rows = [results.rows[p.key] for p in points if p.key in results.rows]
    plots = write_plots(rows, names, results.metrics(), out_dir / "plots", log)
    best = keeper.best()
    inputs = {"base": job.base, "tuned": job.tuned} if score_inputs else {}
    references = reference_points.score_inputs(
        inputs, function, spec, target, out_dir / reference_points.REFERENCES_NAME, log
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
        previous = json.loads(marker.read_text())
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


def write_plots(
    rows: list[dict[str, Any]],
    names: list[str],
    metrics: list[str],
    directory: Path,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Per metric: a line plot against each swept numeric parameter (one line per combination of
    the other swept values, method first), or a bar chart when only methods were swept."""
    from .plots import _pyplot

    numeric = [n for n in names if n != "method" and len({str(r[n]) for r in rows}) > 1]
    numeric = [n for n in numeric if _FIELD_TYPES[n] in (int, float)]
    if not rows or not metrics:
        return []
    try:
        plt = _pyplot()
    except FusionError as exc:
        log(f"no plots: {exc}")
        return []
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in metrics:
        for x_name in numeric or [None]:
            fig, ax = plt.subplots(figsize=(6.4, 4))
            if x_name is None:
                labels = [r["point"] for r in rows]
                ax.bar(range(len(rows)), [_number(r.get(metric)) for r in rows])
                ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
                path = directory / f"{_safe(metric)}_by_point.png"
            else:
                for label, line in _lines(rows, names, x_name):
                    xs = [float(r[x_name]) for r in line]
                    ax.plot(xs, [_number(r.get(metric)) for r in line], marker="o", label=label)
                ax.set_xlabel(x_name)
                ax.legend(fontsize=7)
                path = directory / f"{_safe(metric)}_vs_{x_name}.png"
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
    log(f"plots: {len(paths)} in {directory}")
    return paths


def _lines(rows: list[dict[str, Any]], names: list[str], x_name: str):
    """Rows grouped by the other swept values (in grid order), each group sorted by x."""
    others = [n for n in names if n != x_name and len({str(r[n]) for r in rows}) > 1]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = ", ".join(str(row[n]) if n == "method" else f"{n}={row[n]}" for n in others)
        groups.setdefault(label or "all", []).append(row)
    return [(label, sorted(g, key=lambda r: float(r[x_name]))) for label, g in groups.items()]


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fusion_kernels.sweep",
        description="Merge at every point of a grid, evaluate each merged model, keep the best.",
    )
    parser.add_argument("--base", type=Path, required=True, help="base model directory")
    parser.add_argument("--tuned", type=Path, required=True, help="fine-tuned model directory")
    parser.add_argument("--out", type=Path, required=True, help="sweep directory (resumable)")
    parser.add_argument(
        "--grid",
        required=True,
        help="'name=v1,v2;name=...', names: method and merge parameters "
        "(e.g. 'method=ties,neu-p-ties;density=0.1,0.2;top_neurons=0.1,0.3')",
    )
    parser.add_argument(
        "--eval",
        required=True,
        action="append",
        metavar="MODULE:FUNCTION|lm-eval:TASK[,TASK]",
        help="model directory -> {metric: number} (e.g. fusion_kernels.miniature:evaluate), or "
        "lm-eval:TASKS, the built-in lm-evaluation-harness scorer; repeat to combine scorers",
    )
    parser.add_argument(
        "--eval-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an lm-eval option (repeatable): limit, batch_size, max_batch_size, device, "
        "include_path, include_defaults, num_fewshot, apply_chat_template, model_args",
    )
    parser.add_argument(
        "--objective",
        metavar="METRIC,METRIC|MODULE:FUNCTION",
        help="OA, what picks the best: the mean of the named metrics, or your function of them "
        "(default: the mean of LA and VA when both are returned)",
    )
    parser.add_argument(
        "--tradeoff",
        metavar="X,Y",
        help="metrics of the trade-off scatter (default: LA,VA)",
    )
    parser.add_argument(
        "--score-inputs",
        action="store_true",
        help="also score base and tuned, drawn as reference points (once per --out)",
    )
    parser.add_argument(
        "--keep",
        choices=KEEP_MODES,
        default="best",
        help="merged models left in OUT/models: the best point's (default), all, none",
    )
    parser.add_argument(
        "--metric", help="metric that picks the best (default: OA if there is one, else the first)"
    )
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument(
        "--maximize",
        dest="maximize",
        action="store_true",
        default=True,
        help="the best point has the largest --metric (default)",
    )
    direction.add_argument(
        "--minimize",
        dest="maximize",
        action="store_false",
        help="the best point has the smallest --metric",
    )
    parser.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: one point at a time in this process (default); ray: Ray Tune trials",
    )
    parser.add_argument(
        "--ray-address", help="Ray cluster to join (default: start a local instance)"
    )
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="ray: CPUs per point")
    parser.add_argument("--gpus-per-trial", type=float, default=0, help="ray: GPUs per point")
    parser.add_argument("--backend", help="merge backend (auto, torch, cpp, triton)")
    parser.add_argument("--device", help="merge device (default cpu; cuda with GPUs per trial)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    interrupt_on_sigterm()
    args = build_parser().parse_args(argv)
    try:
        run_sweep(
            args.base,
            args.tuned,
            args.out,
            args.grid,
            args.eval,
            eval_args=args.eval_arg,
            objective=args.objective,
            tradeoff=args.tradeoff,
            score_inputs=args.score_inputs,
            keep=args.keep,
            metric=args.metric,
            maximize=args.maximize,
            executor=args.executor,
            ray_address=args.ray_address,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            backend=args.backend,
            device=args.device,
        )
    except FusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the points done so far are in results.csv", file=sys.stderr)
        return 130
    return 0


def cli() -> NoReturn:
    """Console-script entry point: :func:`main`, then a fast exit."""
    run_and_exit(main)


if __name__ == "__main__":
    cli()
