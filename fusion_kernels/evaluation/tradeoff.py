"""The trade-off drawn: one metric against another (language ability against visual ability, as
the paper's Figures 6-8 choose K and M), every grid point labelled by its parameters, the Pareto
front marked, the base and tuned models as reference points when they were scored, and the best
point by the objective ringed. Both axes are higher-is-better."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import FusionError, ParameterError
from .objective import PAPER_METRICS, Objective


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both axes (ties on both count once, the
    first), ordered by x; points with a NaN coordinate are never on it."""
    finite = [i for i in range(len(xs)) if not (math.isnan(xs[i]) or math.isnan(ys[i]))]
    front = []
    for i in finite:
        dominated = any(
            (xs[j] >= xs[i] and ys[j] >= ys[i]) and (xs[j] > xs[i] or ys[j] > ys[i] or j < i)
            for j in finite
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (xs[i], -ys[i]))


def parse_tradeoff(text: str | None) -> tuple[str, str] | None:
    """``--tradeoff X,Y``: the two metrics drawn (None: chosen by :func:`tradeoff_axes`)."""
    if not text:
        return None
    axes = tuple(a.strip() for a in text.split(","))
    if len(axes) != 2 or not all(axes) or axes[0] == axes[1]:
        raise ParameterError(f"--tradeoff {text!r} must name two metrics: X,Y")
    return axes[0], axes[1]


def tradeoff_axes(
    given: tuple[str, str] | None, metrics: Sequence[str], objective: Objective
) -> tuple[str, str] | None:
    """The two metrics drawn: ``--tradeoff``'s; else LA and VA when both were returned; else the
    two metrics a two-metric ``--objective`` averages; else None (no trade-off plot)."""
    for pair in (given or (), PAPER_METRICS, objective.metrics):
        if len(pair) == 2 and all(m in metrics for m in pair):
            return pair[0], pair[1]
    return None


def point_label(row: dict[str, Any], varying: Sequence[str]) -> str:
    """A point's swept values that differ between points, e.g. ``neu-p-ties, density=0.1``."""
    parts = [str(row[n]) if n == "method" else f"{n}={row[n]}" for n in varying]
    return ", ".join(parts) or str(row.get("point", ""))


def draw_tradeoff(
    rows: list[dict[str, Any]],
    names: Sequence[str],
    axes: tuple[str, str],
    path: Path,
    *,
    references: Sequence[dict[str, Any]] = (),
    best: str | None = None,
    best_metric: str | None = None,
    log: Callable[[str], None] = print,
) -> Path | None:
    """Draw the scatter into ``path`` (PNG); returns it, or None when matplotlib is missing.

    ``rows``: results rows (``point``, the swept names, the metrics); ``references``: rows of the
    scored inputs (``point`` = ``base`` or ``tuned``); ``best``: the best row's ``point``."""
    from ..plots import pyplot

    try:
        plt = pyplot()
    except FusionError as exc:
        log(f"no trade-off plot: {exc}")
        return None
    x_name, y_name = axes
    xs = [_number(r.get(x_name)) for r in rows]
    ys = [_number(r.get(y_name)) for r in rows]
    varying = [n for n in names if len({str(r[n]) for r in rows}) > 1]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(xs, ys, color="tab:blue", zorder=3, label="grid points")
    # Points that coincide (a method that ignores a swept parameter) share one label.
    labels: dict[tuple[float, float], list[str]] = {}
    for row, x, y in zip(rows, xs, ys, strict=True):
        labels.setdefault((x, y), []).append(point_label(row, varying))
    for (x, y), texts in labels.items():
        ax.annotate("\n".join(texts), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(xs, ys)
    ax.plot(
        [xs[i] for i in front],
        [ys[i] for i in front],
        color="tab:orange",
        marker="o",
        markerfacecolor="none",
        markersize=11,
        linewidth=1.5,
        zorder=2,
        label="Pareto front",
    )
    chosen = [i for i, r in enumerate(rows) if best is not None and r["point"] == best]
    for i in chosen:
        ax.scatter(
            [xs[i]],
            [ys[i]],
            s=260,
            facecolors="none",
            edgecolors="tab:red",
            linewidths=2,
            zorder=4,
            label=f"best by {best_metric or 'objective'}",
        )
    for reference in references:
        _draw_reference(ax, reference, x_name, y_name)
    ax.set_xlabel(f"{x_name} (higher is better)")
    ax.set_ylabel(f"{y_name} (higher is better)")
    ax.set_title(f"trade-off: {y_name} against {x_name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")  # labels near the edge stay whole
    plt.close(fig)
    return path


def _draw_reference(ax, row: dict[str, Any], x_name: str, y_name: str) -> None:
    """A scored input: a point when it has both metrics, else a line at the one it has."""
    name = str(row["point"])
    x, y = _number(row.get(x_name)), _number(row.get(y_name))
    style = {"base": ("black", "s"), "tuned": ("tab:green", "D")}.get(name, ("gray", "^"))
    if not math.isnan(x) and not math.isnan(y):
        ax.scatter([x], [y], color=style[0], marker=style[1], s=70, zorder=4, label=name)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    elif not math.isnan(x):
        ax.axvline(x, color=style[0], linestyle="--", linewidth=1, label=f"{name} {x_name}")
    elif not math.isnan(y):
        ax.axhline(y, color=style[0], linestyle="--", linewidth=1, label=f"{name} {y_name}")


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
