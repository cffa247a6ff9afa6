"""Sweeps: merge at every point of a parameter grid, evaluate each merged model with your function
or the built-in lm-evaluation-harness scorer, and keep a table, plots and the merged models asked
for.

``python -m fusion_kernels.sweep --base B --tuned T --out O --grid GRID --eval MODULE:FUNCTION``

- ``GRID``: ``name=v1,v2;name=v1,...``, e.g. ``method=ties,neu-p-ties;density=0.1,0.2``; the
  names are ``method`` (a preset) and the merge parameters (``density``, ``top_neurons``, ...);
  the points are every combination, the preset's values overridden by the swept ones.
- ``--eval``: a function taking a merged model directory and returning ``{metric: number}``;
  ``fusion_kernels.experiments.miniature:evaluate`` is the built-in example;
  ``lm-eval:TASK[,TASK...]`` is the built-in lm-evaluation-harness scorer (options:
  ``--eval-arg KEY=VALUE``). Repeat ``--eval`` to combine scorers (language and visual ability);
  ``--objective`` makes their ``OA`` (see :mod:`fusion_kernels.evaluation`).
- ``O/results.csv``: one row per point (parameters, metrics, merge and eval seconds, kept model),
  in grid order whatever order points finish in, rewritten after every point, so re-running the
  same command skips the points already done.
- Merge options shared with ``merge`` (``--set``, ``--neuron-rule``, ``--map``, ``--layer-map``,
  ``--allow-unpaired``, ``--memory-budget``, ``--max-shard-size``, ``--no-model-card``,
  ``--backend``, ``--device``) apply to every point.
- ``O/plots/``: each metric against each swept numeric parameter, one line per method, and the
  LA-vs-VA trade-off; ``O/index.html`` shows them with the table.
- ``--keep best|all|none``: which merged models stay in ``O/models/``; each carries its scores.

Modules: :mod:`.grid` (the points), :mod:`.job` (one point: merge, evaluate, row),
:mod:`.results` (the table and ``--keep``), :mod:`.plots`, :mod:`.run` (the sweep, local),
:mod:`.ray_executor` (the points as Ray Tune trials), :mod:`.cli` (the command).

Exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted.
"""

from .cli import main
from .grid import GridPoint, parse_grid
from .job import SweepJob, eval_spec_of, load_eval, merge_point, run_point
from .results import Keeper, Results
from .run import run_sweep

__all__ = [
    "GridPoint",
    "Keeper",
    "Results",
    "SweepJob",
    "eval_spec_of",
    "load_eval",
    "main",
    "merge_point",
    "parse_grid",
    "run_point",
    "run_sweep",
]
