"""Plots of a sweep: each metric against each swept numeric parameter."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import FusionError
from ..params import FIELD_TYPES


def write_plots(
    rows: list[dict[str, Any]],
    names: list[str],
    metrics: list[str],
    directory: Path,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Per metric: a line plot against each swept numeric parameter (one line per combination of
    the other swept values, method first), or a bar chart when only methods were swept."""
    from ..plots import pyplot

    numeric = [n for n in names if n != "method" and len({str(r[n]) for r in rows}) > 1]
    numeric = [n for n in numeric if FIELD_TYPES[n] in (int, float)]
    if not rows or not metrics:
        return []
    try:
        plt = pyplot()
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
