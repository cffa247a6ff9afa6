"""Locate: where did fine-tuning change the model, and how concentrated is the change?

``python -m fusion_kernels.locate --base DIR --tuned DIR --out DIR`` streams the checkpoints like a
merge (same name mapping and neuron rules) and writes, per tensor, the neuron change scores
C(j) = Σ|Δ| over neuron j and summary figures: total |Δ|, the share of the total held by the top
1/5/10/30 % of neurons, a concentration index (Gini), and the kept count each density K would give.
Outputs: ``locate.json``, ``neurons.csv`` (one row per tensor), PNG plots and ``index.html``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm import tqdm

from . import options
from .errors import FusionError, NonFiniteDeltaError
from .io.outputs import (
    PAYLOAD_NAME,
    check_output_path,
    check_replaceable,
    check_target,
    create_workspace,
    held_interrupts,
    move_into_place,
    remove_stale_workspaces,
    remove_tree,
    uninterruptible,
)
from .neurons import NeuronRules, parse_rule
from .ops import change_scores
from .ops.contract import count
from .params import check_pattern
from .pipeline import plan_merge
from .process import run_cli
from .streaming.device import parse_device

TOP_PERCENTS = (1, 5, 10, 30)
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
#: The file every locate report holds: what ``--overwrite`` recognises one by.
REPORT_NAME = "locate.json"
LOCATE_KIND = "locate"
_LAYER_MODULE = re.compile(r"layers\.(\d+)\.(.+?)(?:\.weight)?$")


def top_share(scores: torch.Tensor, fraction: float) -> float:
    """Share of Σ C held by the top ``fraction`` of neurons (at least one neuron)."""
    total = float(scores.sum())
    if total == 0.0:
        return 0.0
    m = max(1, count(fraction, scores.numel()))
    return float(torch.topk(scores, m).values.sum()) / total


def gini(scores: torch.Tensor) -> float:
    """Gini coefficient of the scores: 0 when change is spread evenly, → 1 when concentrated."""
    n = scores.numel()
    total = float(scores.sum())
    if n == 0 or total == 0.0:
        return 0.0
    ranked = torch.sort(scores).values
    weights = torch.arange(1, n + 1, dtype=torch.float64)
    return float(2.0 * (weights * ranked).sum() / (n * total) - (n + 1) / n)


def restored_share_curve(scores: torch.Tensor, points: int = 51) -> list[float]:
    """Share of Σ C restored by the top-M neurons for M = 0, 1/(points-1), ..., 1."""
    total = float(scores.sum())
    cumulative = torch.sort(scores, descending=True).values.cumsum(0)
    curve = []
    for i in range(points):
        m = count(i / (points - 1), scores.numel())
        curve.append(0.0 if m == 0 or total == 0 else float(cumulative[m - 1]) / total)
    return curve


def layer_and_module(name: str) -> tuple[int | None, str]:
    """(layer index or None, module name) from a tensor name."""
    match = _LAYER_MODULE.search(name)
    if match:
        return int(match.group(1)), match.group(2)
    return None, name.removesuffix(".weight")


def summarize(name: str, base_name: str, axis: str, shape, total: float, scores) -> dict[str, Any]:
    """The locate.json entry of one tensor."""
    numel = 1
    for d in shape:
        numel *= d
    layer, module = layer_and_module(base_name)
    entry: dict[str, Any] = {
        "name": name,
        "base_name": base_name,
        "layer": layer,
        "module": module,
        "axis": axis,
        "shape": list(shape),
        "numel": numel,
        "total_abs": total,
        "mean_abs": total / numel if numel else 0.0,
        "kept_for_density": {str(k): max(1, count(k, numel)) for k in DENSITIES},
    }
    if scores is not None:
        entry.update(
            neurons=scores.numel(),
            top_share={str(p): top_share(scores, p / 100) for p in TOP_PERCENTS},
            gini=gini(scores),
            restored_share=restored_share_curve(scores),
            scores=[float(x) for x in scores.tolist()],
        )
    return entry


def locate_checkpoints(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    *,
    rules: NeuronRules | None = None,
    name_map: list[str] | None = None,
    layer_map: str | None = None,
    allow_unpaired: bool = False,
    backend: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    out: str | os.PathLike | None = None,
    overwrite: bool | None = None,
) -> dict[str, Any]:
    """Change statistics of every mergeable tensor; streams one tensor pair at a time.

    ``out``, where the caller will write the results, is checked against the inputs first; with
    ``overwrite`` given it must also be new, or (``overwrite=True``) an earlier locate report,
    as :func:`publish_outputs` requires.
    """
    parse_device(device)
    base_ckpt, tuned_ckpt, plan = plan_merge(
        base, tuned, rules, None, name_map, layer_map, allow_unpaired
    )
    if out is not None:
        check_output_path(out, [*base_ckpt.roots, *tuned_ckpt.roots])
        if overwrite is not None:
            check_target(Path(os.path.abspath(out)), overwrite, "--out", REPORT_NAME, LOCATE_KIND)
    tasks = [t for t in plan.tasks.values() if t.action == "merge"]
    entries, backends = [], set()
    # On the CPU the scores pass reads the shards in place; elsewhere tensors are copied over.
    in_place = torch.device(device).type == "cpu"
    bar = tqdm(tasks, desc="locating", unit="tensor", disable=not progress, dynamic_ncols=True)
    for task in bar:
        rows = task.merge_rows
        tuned_tensor = tuned_ckpt.view(task.name) if in_place else tuned_ckpt.read(task.name)
        block = tuned_tensor if rows is None else tuned_tensor[:rows]
        base_tensor = base_ckpt.view(task.base.name) if in_place else base_ckpt.read(task.base.name)
        try:
            total, scores, used = change_scores(
                base_tensor.to(device), block.to(device), task.name, axis=task.axis, backend=backend
            )
        except NonFiniteDeltaError:
            entries.append({"name": task.name, "nonfinite": True})
            continue
        finally:
            if in_place:
                tuned_ckpt.release(task.name)
                base_ckpt.release(task.base.name)
        backends.add(used)
        scores = None if scores is None else scores.cpu()
        entries.append(
            summarize(task.name, task.base.name, task.axis, base_tensor.shape, total, scores)
        )
    return {
        "base": str(base_ckpt.path),
        "tuned": str(tuned_ckpt.path),
        "backends": sorted(backends),
        "name_map": [{"tuned": t, "base": b} for t, b in plan.name_map.rules],
        "tensors": entries,
    }


def locate_from_args(
    args: argparse.Namespace, rules: NeuronRules, overwrite: bool | None = None
) -> dict[str, Any]:
    """:func:`locate_checkpoints` with the options locate and merge share (base, tuned, map,
    layer map, allow-unpaired, backend, device, quiet)."""
    return locate_checkpoints(
        args.base,
        args.tuned,
        rules=rules,
        name_map=args.map,
        layer_map=args.layer_map,
        allow_unpaired=args.allow_unpaired,
        backend=args.backend,
        device=args.device,
        progress=not args.quiet,
        out=args.out,
        overwrite=overwrite,
    )


def write_outputs(
    result: dict[str, Any],
    out: Path,
    plot_pattern: str | None = None,
    merge_report: dict | None = None,
) -> list[Path]:
    """locate.json, neurons.csv, the plots and index.html under ``out``; returns the PNG paths."""
    try:
        return _write_outputs(result, out, plot_pattern, merge_report)
    except OSError as exc:
        raise FusionError(
            f"{out}: cannot write ({exc.strerror or exc}); choose another --out"
        ) from None


def _write_outputs(result, out: Path, plot_pattern, merge_report) -> list[Path]:
    from .plots import write_page

    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_NAME).write_text(json.dumps(result) + "\n")
    with open(out / "neurons.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "name",
                "layer",
                "module",
                "axis",
                "rows",
                "cols",
                "total_abs",
                *[f"top{p}_share" for p in TOP_PERCENTS],
                "gini",
            ]
        )
        for e in result["tensors"]:
            if e.get("nonfinite"):
                continue
            shape = e["shape"] + [1] * (2 - len(e["shape"]))
            shares = [e.get("top_share", {}).get(str(p), "") for p in TOP_PERCENTS]
            writer.writerow(
                [
                    e["name"],
                    e["layer"],
                    e["module"],
                    e["axis"],
                    shape[0],
                    shape[1],
                    e["total_abs"],
                    *shares,
                    e.get("gini", ""),
                ]
            )
    return write_page(result, out, plot_pattern, merge_report)


def build_parser() -> argparse.ArgumentParser:
    parser = options.Parser(
        prog="python -m fusion_kernels.locate",
        description="Where did fine-tuning change the model? Neuron change scores, tables, plots.",
    )
    options.add_models(parser, required=True)
    options.add_output(
        parser,
        "directory for the report (appears only when complete)",
        overwrite="an earlier locate report",
        required=True,
    )
    options.add_pairing(parser)
    options.add_neuron_rules(parser)
    parser.add_argument(
        "--plot-tensors",
        metavar="REGEX",
        help="tensors whose C(j) is plotted (default: first and last layer's q_proj and up_proj)",
    )
    options.add_execution(parser)
    options.add_quiet(parser)
    return parser


def command(argv: list[str] | None = None) -> int:
    """The locate command; raises :class:`FusionError` on bad input (see :func:`run_cli`).

    Everything is computed before the first file is written, so an interrupt during the
    (long) scoring leaves nothing behind; the report is written beside ``--out`` and renamed
    into place when complete, like a merge's output.
    """
    args = build_parser().parse_args(argv)
    rules = NeuronRules([parse_rule(r) for r in args.neuron_rule])
    if args.plot_tensors is not None:
        check_pattern(args.plot_tensors, f"--plot-tensors {args.plot_tensors!r}")
    result = locate_from_args(args, rules, overwrite=args.overwrite)
    out = Path(os.path.abspath(args.out))
    plots = publish_outputs(result, out, args.overwrite, args.plot_tensors)
    print(
        f"located change in {len(result['tensors'])} tensors; {len(plots)} plots; "
        f"open {args.out / 'index.html'}"
    )
    return 0


def publish_outputs(
    result: dict[str, Any], out: Path, overwrite: bool, plot_pattern: str | None = None
) -> list[Path]:
    """:func:`write_outputs` into a new directory ``out`` (or, with ``overwrite``, in place of
    an earlier locate report), which appears complete in one step: nothing of an earlier
    report is left in it. Returns the PNG paths."""
    remove_stale_workspaces(out)
    with held_interrupts():
        workspace = create_workspace(out)
    try:
        pngs = write_outputs(result, workspace / PAYLOAD_NAME, plot_pattern)
        replaceable = functools.partial(
            check_replaceable, flag="--out", marker=REPORT_NAME, kind=LOCATE_KIND
        )
        with uninterruptible():
            move_into_place(workspace, out, overwrite, "--out", replaceable)
    finally:
        remove_tree(workspace)
    return [out / png.name for png in pngs]


def main(argv: list[str] | None = None) -> int:
    """Entry point from Python; returns the exit status (0, 2 bad input, 130 interrupted)."""
    return run_cli(command, argv, exit=False)


def cli() -> NoReturn:
    """Console-script entry point: :func:`command` under :func:`run_cli`, then a fast exit."""
    run_cli(command)


if __name__ == "__main__":
    cli()
