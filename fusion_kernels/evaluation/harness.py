"""What the built-in scorers share: which ``--eval`` specs are theirs, the device they run on,
how ``--eval-arg`` items reach them, and how a harness's results become ``{"TASK/METRIC": value}``
plus the mean that names an ability (``LA`` for lm-eval's tasks, ``VA`` for lmms-eval's).

Both harnesses write results alike: ``results[TASK]["METRIC,FILTER"]``, the task's config under
``configs[TASK]`` (its ``metric_list``) and ``higher_is_better[TASK][METRIC]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from ..errors import FusionError, ParameterError
from ..params import convert_field

#: The built-in scorers, by the prefix of their ``--eval`` spec (``lm-eval:TASK,...``).
BUILTIN = ("lm-eval", "lmms-eval")


def builtin_of(spec: str) -> str | None:
    """The built-in scorer an ``--eval`` spec names (``lm-eval``, ``lmms-eval``), else None."""
    name, sep, _ = spec.partition(":")
    return name if sep and name in BUILTIN else None


def default_device(sweep_device: str | None) -> str:
    """Where a built-in scorer runs the model when ``--eval-arg device=`` does not say: the
    sweep's ``--device`` when given, else CUDA when this machine has it, else the CPU."""
    if sweep_device:
        return sweep_device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def route_eval_args(
    items: Sequence[str], takes: Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, ...]]:
    """``--eval-arg`` items for each built-in scorer in use (``takes``: scorer -> its keys).

    ``KEY=VALUE`` goes to every scorer in use that takes KEY; ``lm-eval:KEY=VALUE`` and
    ``lmms-eval:KEY=VALUE`` to that scorer alone. An item no scorer in use takes raises
    :class:`ParameterError` naming it."""
    if items and not takes:
        raise ParameterError(
            f"--eval-arg {items[0]!r} sets a built-in scorer's option; it needs "
            "--eval lm-eval:TASK or --eval lmms-eval:TASK"
        )
    routed: dict[str, list[str]] = {name: [] for name in takes}
    for item in items:
        head, sep, rest = item.partition(":")
        if sep and head in BUILTIN:
            if head not in takes:
                raise ParameterError(f"--eval-arg {item!r} is for {head}; add --eval {head}:TASK")
            routed[head].append(rest)
            continue
        key = item.partition("=")[0].strip().replace("-", "_")
        users = [name for name, keys in takes.items() if key in keys]
        if "=" in item and not users:
            known = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in takes.items())
            raise ParameterError(f"--eval-arg {item!r}: unknown key {key!r}; use one of {known}")
        for name in users or list(takes):  # no '=': each scorer says what an item looks like
            routed[name].append(item)
    return {name: tuple(found) for name, found in routed.items()}


def main_metrics(
    output: Mapping[str, Any], tasks: Sequence[str], average: str, harness: str
) -> dict[str, float]:
    """Each task's main metric from a harness's results (its config's first metric, under its
    first filter; a group's first aggregated metric), then ``average``, their mean, when every
    main metric is higher-is-better (a mean of accuracies and perplexities means nothing)."""
    scores: dict[str, float] = {}
    higher = []
    for task in tasks:
        row = output.get("results", {}).get(task)
        if row is None:
            raise FusionError(f"{harness} returned no result for task {task!r}")
        metric, key = _main_key(output, task, row, harness)
        value = row[key]
        if not isinstance(value, int | float) or math.isnan(value):
            raise FusionError(f"{harness} task {task!r}: {key} is {value!r}, not a number")
        scores[f"{task}/{metric}"] = float(value)
        higher.append((output.get("higher_is_better") or {}).get(task, {}).get(metric, True))
    if all(higher):
        scores[average] = math.fsum(scores.values()) / len(scores)
    return scores


def _main_key(
    output: Mapping[str, Any], task: str, row: Mapping[str, Any], harness: str
) -> tuple[str, str]:
    keys = [k for k in row if "," in k and "_stderr," not in k]
    metric_list = (output.get("configs") or {}).get(task, {}).get("metric_list") or []
    for entry in metric_list[:1]:
        name = entry.get("metric") if isinstance(entry, dict) else None
        found = [k for k in keys if k.split(",", 1)[0] == name]
        if found:
            return str(name), found[0]
    if not keys:
        raise FusionError(f"{harness} task {task!r} returned no metric: {sorted(row)}")
    return keys[0].split(",", 1)[0], keys[0]


def is_scorer_spec(spec: str, prefix: str) -> bool:
    """Whether an ``--eval`` spec names the built-in scorer whose specs start with ``prefix``."""
    return spec.startswith(prefix)


def parse_tasks(spec: str, prefix: str) -> tuple[str, ...]:
    """The task names of ``PREFIXTASK[,TASK...]`` (``prefix``: ``lm-eval:``, ``lmms-eval:``), in
    order, each once."""
    tasks = tuple(t.strip() for t in spec.removeprefix(prefix).split(","))
    if not all(tasks):
        raise ParameterError(f"--eval {spec!r} must look like {prefix}TASK[,TASK...]")
    if len(set(tasks)) != len(tasks):
        raise ParameterError(f"--eval {spec!r} names a task twice")
    return tasks


def parse_eval_arg(
    item: str, keys: Collection[str], convert: Callable[[str, str], Any], scope: str = ""
) -> tuple[str, Any]:
    """One ``KEY=VALUE`` item as ``(key, converted value)``; ``keys``: the scorer's keys,
    ``convert(key, value)`` reads a value (a ValueError names what is wrong), ``scope``: the
    scorer prefix the item carried on the command line (``lmms-eval:``), for messages. A bad item
    raises :class:`ParameterError` naming it and what it may be."""
    shown = f"{scope}{item!r}"
    key, eq, value = item.partition("=")
    key, value = key.strip().replace("-", "_"), value.strip()
    if not eq or not value:
        raise ParameterError(f"--eval-arg {shown} must look like KEY=VALUE")
    if key not in keys:
        raise ParameterError(
            f"--eval-arg {shown}: unknown key {key!r}; use one of {', '.join(keys)}"
        )
    try:
        return key, convert(key, value)
    except ValueError as exc:
        raise ParameterError(f"--eval-arg {shown}: {exc}") from None


def convert_limit(key: str, value: str) -> int | float:
    """``limit=``: a count of examples per task, or a fraction of them below 1."""
    number = convert_field(key, value, float)
    if not 0 < number < math.inf:
        raise ValueError("limit must be > 0")
    return int(number) if number >= 1 and number == int(number) else number


def positive_int(key: str, value: str, zero: bool = False) -> int:
    """An integer option that must be > 0 (``zero``: >= 0)."""
    number = convert_field(key, value, int)
    if number < (0 if zero else 1):
        raise ValueError(f"{key} must be {'>= 0' if zero else '> 0'}")
    return number


def existing_path(value: str, resolve: bool = True) -> str:
    """A path option's value, absolute (``resolve``: links resolved too); it must exist."""
    path = Path(value).expanduser()
    path = path.resolve() if resolve else path.absolute()
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    return str(path)


def extra_model_args(value: str) -> str:
    """``model_args=``: more arguments of the harness's model; the merged model is its own."""
    if "pretrained=" in value:
        raise ValueError("pretrained is the merged model; leave it out")
    return value


def check_known_tasks(
    spec: str, tasks: Sequence[str], known: Collection[str], harness: str, where: str, scope: str
) -> None:
    """Raise :class:`ParameterError` when ``harness`` knows none of some ``tasks`` (searched
    ``where``); ``scope``: the ``--eval-arg`` prefix of the scorer's options (``lmms-eval:``)."""
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ParameterError(
            f"--eval {spec}: {harness} knows no task {', '.join(map(repr, unknown))} "
            f"(searched {where}); check the name or add --eval-arg {scope}include_path=DIR"
        )


Options = TypeVar("Options")


class BuiltinScorer(Generic[Options]):
    """What a built-in scorer holds: its ``--eval`` spec, the spec's tasks, its options (each
    scorer's own class, :attr:`options_type`) and the sweep's ``--device`` (None: not given), the
    default of its ``device`` option."""

    #: The prefix of the scorer's ``--eval`` specs (``lm-eval:``).
    prefix: ClassVar[str] = ""
    #: The class of its options; called with no arguments for the defaults.
    options_type: ClassVar[Callable[[], Any]]

    def __init__(self, spec: str, options: Options | None = None, sweep_device: str | None = None):
        self.spec = spec
        self.tasks = parse_tasks(spec, self.prefix)
        self.options: Options = options or self.options_type()
        self.sweep_device = sweep_device
