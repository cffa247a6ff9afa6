"""The results table of a sweep (``results.csv``) and which merged models stay on disk
(``--keep``)."""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ParameterError
from ..evaluation.objective import OBJECTIVE_NAME
from ..io.safeload import MAX_INDEX_BYTES, read_text
from ..params import FIELD_TYPES
from .grid import GridPoint

RESULTS_NAME = "results.csv"
KEEP_MODES = ("best", "all", "none")
#: Bookkeeping columns, last in every row.
TAIL_COLUMNS = ("merge_seconds", "eval_seconds", "model")
#: Columns that are not metrics: the point, its parameters and the bookkeeping.
RESERVED = frozenset({"point", "method", *FIELD_TYPES, *TAIL_COLUMNS})


class Results:
    """``results.csv``: rows by point key, in grid order (``order``: the grid's point keys; rows
    of points outside it, from an earlier grid, follow in the order they were read or came),
    whatever order the points finish in; columns in first-seen order. Every change rewrites the
    file atomically, so an interrupted sweep leaves a valid table to resume from."""

    def __init__(self, path: Path, order: list[str] | tuple[str, ...] = ()):
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        self.columns: list[str] = []
        self._rank = {key: i for i, key in enumerate(order)}
        if path.exists():
            self._load(read_text(path, MAX_INDEX_BYTES, ParameterError))

    def _load(self, text: str) -> None:
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            self.columns = [c for c in reader.fieldnames or [] if c not in TAIL_COLUMNS]
            for row in reader:
                self.rows[row["point"]] = row
        except (csv.Error, KeyError) as exc:
            raise ParameterError(
                f"{self.path}: not a results table of a sweep ({type(exc).__name__}: {exc}); "
                "move it away or choose another --out"
            ) from None

    def metrics(self) -> list[str]:
        """Metric columns, in the order the eval function first returned them."""
        return [c for c in self.columns if c not in RESERVED]

    def put(self, row: dict[str, Any]) -> None:
        self.columns += [c for c in row if c not in self.columns and c not in TAIL_COLUMNS]
        self.rows[row["point"]] = row
        ranked = sorted(enumerate(self.rows), key=lambda item: self._position(*item))
        self.rows = {key: self.rows[key] for _, key in ranked}
        self.write()

    def _position(self, arrival: int, key: str) -> tuple[int, int]:
        return (self._rank.get(key, len(self._rank)), arrival)

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, [*self.columns, *TAIL_COLUMNS], restval="")
            writer.writeheader()
            writer.writerows(self.rows.values())
        os.replace(tmp, self.path)


class Keeper:
    """Records rows and applies ``--keep`` as they arrive: ``best`` holds only the best model so
    far on disk, ``none`` deletes each model once evaluated."""

    def __init__(
        self,
        results: Results,
        mode: str,
        metric: str | None,
        maximize: bool,
        models_dir: Path | None = None,
    ):
        self.results, self.mode, self.maximize = results, mode, maximize
        self._metric = metric
        self.models_dir = models_dir

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
        """The row with the best score; of equal ones, the first in grid order (``max`` keeps
        the first maximum, and the rows are in grid order)."""
        rows = list(self.results.rows.values())
        return max(rows, key=self.score) if rows and self.metric else None

    def add(self, row: dict[str, Any]) -> None:
        previous = self.best()
        self.results.put(row)
        if self.metric not in row:
            returned = [c for c in row if c not in RESERVED and c not in TAIL_COLUMNS]
            raise ParameterError(f"--metric {self.metric}: the eval function returned {returned}")
        if self.mode == "none":
            self._drop(row)
        elif self.mode == "best" and previous is not None:
            self._drop(previous if self.best() is row else row)

    def finish(self, points: list[GridPoint], merge: Callable[[GridPoint], Path]) -> None:
        """Leave on disk exactly what ``--keep`` asks for, whatever earlier runs kept: ``best``
        merges the best point again (with ``merge``) if an earlier ``--keep none`` run dropped
        it."""
        if self.mode == "all":
            return
        best = self.best() if self.mode == "best" else None
        for row in self.results.rows.values():
            if row is not best:
                self._drop(row)
        point = next((p for p in points if best and p.key == best["point"]), None)
        if best and point and not (best.get("model") and Path(best["model"]).exists()):
            best["model"] = str(merge(point))
            self.results.write()

    def _drop(self, row: dict[str, Any]) -> None:
        if row.get("model"):
            model = Path(row["model"])
            # results.csv is a file anyone can edit: only a model directory of this sweep's
            # models/ is ever removed, whatever path a row names.
            if self.models_dir is not None and _inside(model, self.models_dir):
                shutil.rmtree(model, ignore_errors=True)
            row["model"] = ""
            self.results.write()


def _inside(model: Path, models_dir: Path) -> bool:
    """A real directory (not a link) directly in ``models_dir``."""
    return (
        model.is_dir()
        and not model.is_symlink()
        and model.absolute().parent.resolve() == models_dir.resolve()
    )
