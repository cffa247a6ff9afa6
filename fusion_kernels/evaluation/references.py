"""The inputs as reference points: ``--score-inputs`` runs the same evaluators on the base and
tuned models once per sweep directory, into ``references.json``. An evaluator that cannot score an
input (a visual benchmark on a text-only base) leaves its metrics out, with the reason recorded,
instead of failing the sweep."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import FusionError
from .hooks import Combined
from .lm_eval_scorer import is_lm_eval
from .lmms_eval_scorer import is_lmms_eval
from .objective import Objective

REFERENCES_NAME = "references.json"


def score_inputs(
    inputs: dict[str, str],
    evaluate: Callable[[str], dict[str, float]],
    spec: str,
    objective: Objective,
    path: Path,
    log: Callable[[str], None] = print,
    language_model: Callable[[str, str], str | os.PathLike | None] | None = None,
    multimodal_model: Callable[[str, str], str | os.PathLike | None] | None = None,
) -> list[dict[str, Any]]:
    """Score each ``{name: model directory}`` not yet in ``path``; returns every reference row
    (``point`` = the name, its metrics, ``OA`` when the objective applies, ``failed``, and
    ``scored`` = the directory each scorer read when not the input itself).
    ``language_model(name, directory)``, when given, is where the lm-eval scorer reads a
    multimodal input's language model (its text-only export; None: the input itself);
    ``multimodal_model(name, directory)`` is where the lmms-eval scorer reads a language-only
    input (it in the merged models' multimodal frame; None: the input itself)."""
    saved: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
    parts = evaluate.parts if isinstance(evaluate, Combined) else ((spec, evaluate),)
    for name, directory in inputs.items():
        if name in saved:
            continue
        start = time.perf_counter()
        row: dict[str, Any] = {"point": name, "model": directory, "failed": {}, "scored": {}}
        for part_spec, part in parts:
            try:
                target = directory
                if language_model is not None and is_lm_eval(part_spec):
                    target = str(language_model(name, directory) or directory)
                if multimodal_model is not None and is_lmms_eval(part_spec):
                    target = str(multimodal_model(name, directory) or directory)
                if target != directory:
                    row["scored"][part_spec] = target
                row.update({str(k): float(v) for k, v in part(target).items()})
            except Exception as exc:
                row["failed"][part_spec] = f"{type(exc).__name__}: {exc}"
                log(f"{name}: {part_spec} did not score it ({type(exc).__name__}: {exc})")
        metrics = {k: v for k, v in row.items() if isinstance(v, float)}
        try:
            row.update(objective(metrics))
        except FusionError as exc:
            row["failed"]["--objective"] = str(exc)
        row["eval_seconds"] = round(time.perf_counter() - start, 4)
        saved[name] = row
        _write(path, saved)
        log(f"reference {name}: {', '.join(f'{k}={v:g}' for k, v in metrics.items()) or '-'}")
    return [saved[name] for name in inputs if name in saved]


def _write(path: Path, saved: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(saved, indent=2) + "\n")
    os.replace(tmp, path)
