"""``merge --dry-run``: the plan and the parameters, printed; nothing is written."""

from __future__ import annotations

import argparse

from ..params import TensorParams
from ..pipeline import plan_merge
from ..streaming.chunks import DEFAULT_MEMORY_BUDGET, Budget, describe_chunks


def print_dry_run(args: argparse.Namespace, params: TensorParams, rules) -> None:
    """Plan the merge the arguments describe, check the parameters against the tensors it would
    merge, and print both."""
    base, tuned, plan = plan_merge(
        args.base,
        args.tuned,
        rules,
        args.max_shard_size,
        args.map,
        args.layer_map,
        args.allow_unpaired,
    )
    base.close()
    tuned.close()
    params.check(name for name, task in plan.tasks.items() if task.action == "merge")
    print(plan.describe())
    budget = Budget(args.memory_budget or DEFAULT_MEMORY_BUDGET)
    for line in describe_chunks(budget, list(plan.tasks.values()), params):
        print(line)
    print(f"params: {params.default.as_dict()}")
    for line in describe_overrides(params):
        print(line)


def describe_overrides(params: TensorParams) -> list[str]:
    """One line per per-tensor override: a ``--set`` pattern or a mergekit filter."""
    lines = []
    for entry in params.describe():
        if "pattern" in entry:
            pattern = entry.pop("pattern")
            lines.append(f"  for /{pattern}/: {entry}")
        else:
            lines.append(
                f"  for names containing {entry['filter']!r}: {entry['parameter']} = "
                f"{entry['value']!r} (mergekit filter)"
            )
    return lines
