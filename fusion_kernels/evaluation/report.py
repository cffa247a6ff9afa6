"""After a sweep: the trade-off scatter, the scores carried by each kept model, and the page."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .objective import Objective
from .page import write_sweep_page
from .scores_card import write_scores
from .tradeoff import draw_tradeoff, tradeoff_axes

_TAIL = ("merge_seconds", "eval_seconds", "model")


def write_report(
    out_dir: Path,
    identity: dict[str, str],
    names: list[str],
    columns: list[str],
    metrics: list[str],
    rows: list[dict[str, Any]],
    *,
    references: list[dict[str, Any]],
    plots: list[Path],
    best: dict[str, Any] | None,
    best_metric: str | None,
    objective: Objective,
    tradeoff: tuple[str, str] | None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Draw the scatter, write scores into kept models and ``out_dir/index.html``; returns
    ``{"tradeoff": PNG or None, "page": HTML, "scored_models": [JSON...]}``."""
    axes = tradeoff_axes(tradeoff, metrics, objective)
    scatter = None
    if axes is None:
        log("no trade-off plot: name its two metrics with --tradeoff X,Y (default LA,VA)")
    elif rows:
        path = out_dir / "plots" / f"tradeoff_{_safe(axes[0])}_vs_{_safe(axes[1])}.png"
        scatter = draw_tradeoff(
            rows,
            names,
            axes,
            path,
            references=references,
            best=best["point"] if best else None,
            best_metric=best_metric,
            log=log,
        )
    scored = [
        write_scores(
            row["model"],
            row,
            names,
            metrics,
            best_by=best_metric,
            is_best=best is not None and row["point"] == best["point"],
            evaluators=identity["eval"],
        )
        for row in rows
        if row.get("model") and Path(row["model"]).is_dir()
    ]
    figures = [(scatter, f"trade-off: {axes[1]} against {axes[0]}")] if scatter and axes else []
    figures += [(path, path.stem.replace("_", " ")) for path in plots]
    page = write_sweep_page(
        out_dir,
        identity,
        [*columns, *_TAIL],
        rows,
        figures,
        references=references,
        best=best["point"] if best else None,
        best_metric=best_metric,
    )
    return {"tradeoff": scatter, "page": page, "scored_models": scored}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
