"""A kept model carries its scores: ``sweep_scores.json`` beside its weights, and, when the model
has a card (``README.md``), a "Sweep scores" section in it, replaced rather than repeated when the
sweep runs again."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SCORES_NAME = "sweep_scores.json"
CARD_NAME = "README.md"
_BEGIN = "<!-- fusion_kernels sweep scores: begin -->"
_END = "<!-- fusion_kernels sweep scores: end -->"


def write_scores(
    model_dir: str | Path,
    row: dict[str, Any],
    names: list[str],
    metrics: list[str],
    *,
    best_by: str | None,
    is_best: bool,
    evaluators: str,
) -> Path:
    """Record ``row``'s parameters and metrics in ``model_dir``; returns the JSON file."""
    directory = Path(model_dir)
    record = {
        "point": row["point"],
        "parameters": {n: row[n] for n in names if n in row},
        "metrics": {m: _number(row.get(m)) for m in metrics if row.get(m) not in (None, "")},
        "evaluators": evaluators,
        "best_by": best_by,
        "is_best": is_best,
    }
    path = directory / SCORES_NAME
    _replace(path, json.dumps(record, indent=2) + "\n")
    card = directory / CARD_NAME
    if card.exists():
        _replace(card, _with_section(card.read_text(), _section(record)))
    return path


def _replace(path: Path, text: str) -> None:
    """Write beside, then rename: an interrupted sweep never leaves a half-written card."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _section(record: dict[str, Any]) -> str:
    lines = [
        _BEGIN,
        "## Sweep scores",
        "",
        f"Grid point `{record['point']}` of a `fusion_kernels.sweep`"
        + (f", the best by {record['best_by']}" if record["is_best"] else "")
        + f"; scored by `{record['evaluators']}`.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {value:.6g} |" for name, value in record["metrics"].items()],
        _END,
    ]
    return "\n".join(lines) + "\n"


def _with_section(text: str, section: str) -> str:
    start, end = text.find(_BEGIN), text.find(_END)
    if start != -1 and end > start:
        return text[:start] + section + text[end + len(_END) :].lstrip("\n")
    return text.rstrip("\n") + "\n\n" + section


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
