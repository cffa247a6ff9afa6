"""The built-in visual-ability scorer: ``--eval lmms-eval:TASK[,TASK...]`` scores a merged
multimodal model itself (not its text export) with lmms-eval, through lmms-eval's own command
line (``python -m lmms_eval``), and returns each task's main metric, ``{"TASK/METRIC": value}``,
plus ``VA``, their mean, as the paper averages its visual benchmarks.

lmms-eval is optional and often wants other package versions than the rest of a project, so it
runs as a separate process: in this Python, or in another environment's
(``--eval-arg lmms-eval:python=PATH``). Its results are read from the results file it writes into
a temporary directory; a run that writes none failed, and the error names lmms-eval's own error
line. Nothing is written into the model scored. Options: see :data:`EVAL_ARGS`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from ..errors import FusionError, ParameterError
from ..io.safeload import MAX_INDEX_BYTES, load_json
from ..params import convert_field
from . import harness
from .harness import default_device, main_metrics

PREFIX = "lmms-eval:"
VA_NAME = "VA"

#: lmms-eval's model for each multimodal family (``model_type`` of config.json) it can load.
FAMILIES = {
    "llava": "llava_hf",
    "llava_next": "llava_hf",
    "llava_onevision": "llava_hf",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "idefics2": "idefics2",
    "mllama": "llama_vision",
    "gemma3": "gemma3",
}

#: ``--eval-arg`` keys (``lmms-eval:KEY=VALUE`` for this scorer alone): what each sets.
EVAL_ARGS = {
    "limit": "examples per task: a count, or a fraction below 1 (default: all)",
    "batch_size": "an integer (default 1)",
    "device": "torch device the model runs on, e.g. cpu, cuda:0 (default: the sweep's "
    "--device, else cuda when present, else cpu)",
    "include_path": "a directory of task configs: local tasks (once)",
    "model": f"lmms-eval's model (default: by the model's family: {', '.join(FAMILIES)})",
    "model_args": "more arguments of lmms-eval's model, e.g. dtype=bfloat16",
    "force_simple": "false: use lmms-eval's chat model where it has one (default true: its simple "
    "model, whose prompts need no chat template that places images)",
    "python": "the Python that runs lmms-eval (default: this one), e.g. another venv's",
    "average": f"the column that averages the tasks' main metrics (default {VA_NAME})",
}

#: Terminal colour codes, which lmms-eval's log lines carry.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: Lists lmms-eval's task names as JSON: argv = include_path ("" for none).
_LIST_TASKS = (
    "import json, sys\n"
    "from lmms_eval.tasks import TaskManager\n"
    "manager = TaskManager('ERROR', include_path=sys.argv[1] or None)\n"
    "print(json.dumps(sorted(manager.all_tasks)))\n"
)


@dataclass(frozen=True)
class LmmsEvalOptions:
    """The options ``--eval-arg`` sets (defaults: lmms-eval's, batch size 1, simple models)."""

    limit: int | float | None = None
    batch_size: int = 1
    device: str | None = None
    include_path: str | None = None
    model: str | None = None
    model_args: str = ""
    force_simple: bool = True
    python: str = field(default_factory=lambda: sys.executable)
    average: str = VA_NAME


#: Whether an ``--eval`` spec names this scorer.
is_lmms_eval = partial(harness.is_scorer_spec, prefix=PREFIX)
#: The task names of ``lmms-eval:TASK[,TASK...]``, in order, each once.
parse_tasks = partial(harness.parse_tasks, prefix=PREFIX)


def parse_eval_args(items: list[str] | tuple[str, ...]) -> LmmsEvalOptions:
    """``KEY=VALUE`` items (see :data:`EVAL_ARGS`) as options; bad ones raise
    :class:`ParameterError` naming the item and what it may be."""
    options = LmmsEvalOptions()
    for item in items:
        key, converted = harness.parse_eval_arg(item, EVAL_ARGS, _convert, PREFIX)
        if key == "include_path" and options.include_path is not None:
            raise ParameterError("--eval-arg lmms-eval:include_path: lmms-eval takes one")
        options = replace(options, **{key: converted})
    return options


def _convert(key: str, value: str) -> Any:
    if key == "limit":
        return harness.convert_limit(key, value)
    if key == "batch_size":
        return harness.positive_int(key, value)
    if key == "force_simple":
        return convert_field(key, value, bool)
    if key == "python" and os.sep not in value:
        found = shutil.which(value)
        if found is None:
            raise ValueError(f"no {value} on PATH")
        return found
    if key in ("include_path", "python"):
        return harness.existing_path(value, resolve=False)
    if key == "model_args":
        return harness.extra_model_args(value)
    return value


@lru_cache(maxsize=4)
def known_tasks(python: str, include_path: str | None) -> frozenset[str]:
    """lmms-eval's task names, as ``python`` indexes them (once per process)."""
    done = subprocess.run(
        [python, "-c", _LIST_TASKS, include_path or ""], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise FusionError(
            f"--eval lmms-eval:... cannot run lmms-eval with {python} "
            f"({last_line(done.stderr) or 'exit status ' + str(done.returncode)}): install it "
            "there (pip install lmms-eval) or name the Python that has it with "
            "--eval-arg lmms-eval:python=PATH"
        )
    return frozenset(json.loads(done.stdout.strip().splitlines()[-1]))


def model_family(model_dir: str | Path) -> str:
    """The ``model_type`` of ``model_dir/config.json`` ("" when it has none)."""
    config = load_json(Path(model_dir) / "config.json", MAX_INDEX_BYTES)
    return str(config.get("model_type", "")) if isinstance(config, dict) else ""


class LmmsEvalScorer(harness.BuiltinScorer[LmmsEvalOptions]):
    """``model_dir -> {"TASK/METRIC": value, ..., "VA": mean}`` with lmms-eval's command line."""

    prefix = PREFIX
    options_type = LmmsEvalOptions

    def check(self) -> None:
        """Fail before any merge when lmms-eval cannot run or a task is unknown to it."""
        known = known_tasks(self.options.python, self.options.include_path)
        where = self.options.include_path or "lmms-eval's own tasks"
        harness.check_known_tasks(self.spec, self.tasks, known, "lmms-eval", where, PREFIX)

    def model_name(self, model_dir: str | Path) -> str:
        """lmms-eval's model for ``model_dir``: ``--eval-arg lmms-eval:model=``, else by family;
        a family lmms-eval cannot load raises :class:`ParameterError` naming those it can."""
        if self.options.model:
            return self.options.model
        family = model_family(model_dir)
        if family not in FAMILIES:
            raise ParameterError(
                f"--eval {self.spec}: lmms-eval loads no {family or 'unnamed'} model "
                f"({Path(model_dir) / 'config.json'}); it scores multimodal families "
                f"{', '.join(FAMILIES)}, or name its model with --eval-arg lmms-eval:model=NAME"
            )
        return FAMILIES[family]

    def command(self, model_dir: str | Path, output: Path) -> list[str]:
        """lmms-eval's command line for ``model_dir``, results into ``output``."""
        opts = self.options
        device = opts.device or default_device(self.sweep_device)
        model_args = f"pretrained={Path(model_dir).absolute()},device={device},device_map={device}"
        argv = [opts.python, "-m", "lmms_eval", "--model", self.model_name(model_dir)]
        argv += ["--model_args", ",".join(filter(None, [model_args, opts.model_args]))]
        argv += ["--tasks", ",".join(self.tasks), "--batch_size", str(opts.batch_size)]
        argv += ["--output_path", str(output)]  # the device goes in model_args alone
        if opts.include_path:
            argv += ["--include_path", opts.include_path]
        if opts.limit is not None:
            argv += ["--limit", str(opts.limit)]
        return argv + (["--force_simple"] if opts.force_simple else [])

    def __call__(self, model_dir: str) -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="lmms-eval-") as scratch:
            output = Path(scratch) / "results"
            log = Path(scratch) / "lmms-eval.log"
            with log.open("w") as sink:
                done = subprocess.run(
                    self.command(model_dir, output), stdout=sink, stderr=subprocess.STDOUT,
                    cwd=scratch,
                )  # fmt: skip
            found = sorted(output.rglob("*_results.json"))
            if not found:
                raise FusionError(
                    f"lmms-eval wrote no results for {model_dir} (exit status "
                    f"{done.returncode}): {error_line(log.read_text(errors='replace'))}"
                )
            results = load_json(found[-1], MAX_INDEX_BYTES)
        return main_metrics(results, self.tasks, self.options.average, "lmms-eval")


def error_line(log: str) -> str:
    """lmms-eval's own error line in its output, on one line (its last line when none)."""
    lines = [_ANSI.sub("", line).strip() for line in log.splitlines()]
    lines = [line for line in lines if line]
    for marker in ("Error during evaluation", "| ERROR", "Error"):
        found = [line for line in lines if marker in line]
        if found:
            line = found[-1]
            return line[line.find(" - ") + 3 :] if " - " in line else line
    return lines[-1] if lines else "no output"


def last_line(text: str) -> str:
    """The last non-empty line of ``text``, stripped ("" for none)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
