"""The built-in language-ability scorer: ``--eval lm-eval:TASK[,TASK...]`` scores a merged model
with lm-evaluation-harness (``lm_eval.simple_evaluate``, model ``hf``) and returns each task's main
metric, ``{"TASK/METRIC": value}``, plus ``LA``, their mean, as the paper averages its language
benchmarks (only when every main metric is higher-is-better: a mean of accuracies and
perplexities means nothing). The model runs on ``--eval-arg device=``, else the sweep's device
(see :func:`fusion_kernels.evaluation.harness.default_device`).

The harness's options come from repeatable ``--eval-arg KEY=VALUE`` (see :data:`EVAL_ARGS`).
lm-eval is optional (``pip install 'fusion_kernels[eval]'``) and imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from ..errors import FusionError
from ..io.safeload import MAX_INDEX_BYTES, load_json
from ..params import convert_field
from . import harness
from .harness import default_device

PREFIX = "lm-eval:"
LA_NAME = "LA"
#: The subdirectory of a merged model that holds its text-only language model, when written.
TEXT_EXPORT_NAME = "text_model"

#: ``--eval-arg`` keys: what each sets in the harness.
EVAL_ARGS = {
    "limit": "examples per task: a count, or a fraction below 1 (default: all)",
    "batch_size": "an integer, or auto / auto:N (default 1)",
    "max_batch_size": "ceiling for batch_size=auto",
    "device": "torch device the harness runs the model on, e.g. cpu, cuda:0 (default: the "
    "sweep's --device, else cuda when present, else cpu)",
    "include_path": "a directory or YAML file of task configs (repeatable): local tasks",
    "include_defaults": "false: index only include_path's tasks, not the harness's own (faster)",
    "num_fewshot": "few-shot examples per prompt (default: each task's own)",
    "apply_chat_template": "true: wrap prompts in the model's chat template",
    "model_args": "more arguments of the hf model, e.g. dtype=bfloat16,trust_remote_code=True",
    "average": f"the column that averages the tasks' main metrics (default {LA_NAME})",
}


@dataclass(frozen=True)
class LmEvalOptions:
    """The harness options ``--eval-arg`` sets (defaults: the harness's, batch size 1)."""

    limit: int | float | None = None
    batch_size: int | str = 1
    max_batch_size: int | None = None
    device: str | None = None
    include_path: tuple[str, ...] = ()
    include_defaults: bool = True
    num_fewshot: int | None = None
    apply_chat_template: bool = False
    model_args: str = ""
    average: str = LA_NAME
    #: Where they came from, for messages.
    given: tuple[str, ...] = field(default=(), compare=False)


#: Whether an ``--eval`` spec names the built-in scorer.
is_lm_eval = partial(harness.is_scorer_spec, prefix=PREFIX)
#: The task names of ``lm-eval:TASK[,TASK...]``, in order, each once.
parse_tasks = partial(harness.parse_tasks, prefix=PREFIX)


def parse_eval_args(items: list[str] | tuple[str, ...]) -> LmEvalOptions:
    """``KEY=VALUE`` items (see :data:`EVAL_ARGS`) as options; bad ones raise
    :class:`ParameterError` naming the item and what it may be."""
    options = LmEvalOptions(given=tuple(items))
    for item in items:
        key, converted = harness.parse_eval_arg(item, EVAL_ARGS, _convert)
        if key == "include_path":
            converted = (*options.include_path, converted)
        options = replace(options, **{key: converted})
    return options


def _convert(key: str, value: str) -> Any:
    """One option's value. Numbers and booleans are read as ``--set`` and ``--grid`` read theirs,
    by :func:`fusion_kernels.params.convert_field` (its :class:`ParameterError` is a ValueError)."""
    if key == "limit":
        return harness.convert_limit(key, value)
    if key == "batch_size":
        if value == "auto" or value.startswith("auto:"):
            return value
        return harness.positive_int(key, value)
    if key in ("max_batch_size", "num_fewshot"):
        return harness.positive_int(key, value, zero=key == "num_fewshot")
    if key in ("include_defaults", "apply_chat_template"):
        return convert_field(key, value, bool)
    if key == "include_path":
        return harness.existing_path(value)
    if key == "model_args":
        return harness.extra_model_args(value)
    return value


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise FusionError(
            f"--eval lm-eval:... needs lm-evaluation-harness ({exc}): "
            "pip install 'fusion_kernels[eval]'"
        ) from None
    return lm_eval, TaskManager


@lru_cache(maxsize=4)
def task_manager(include_path: tuple[str, ...], include_defaults: bool):
    """The harness's task index: built once per process (indexing its own tasks takes seconds)."""
    _, manager_cls = _import_lm_eval()
    return manager_cls(include_path=list(include_path) or None, include_defaults=include_defaults)


class LmEvalScorer(harness.BuiltinScorer[LmEvalOptions]):
    """``model_dir -> {"TASK/METRIC": value, ..., "LA": mean}`` with lm-evaluation-harness."""

    prefix = PREFIX
    options_type = LmEvalOptions

    def check(self) -> None:
        """Fail before any merge when lm-eval is missing or a task is unknown to it."""
        manager = task_manager(self.options.include_path, self.options.include_defaults)
        where = ", ".join(self.options.include_path) or "the harness's own tasks"
        harness.check_known_tasks(self.spec, self.tasks, manager.all_tasks, "lm-eval", where, "")

    def harness_arguments(self, model_dir: str | Path) -> dict[str, Any]:
        """The keyword arguments of ``lm_eval.simple_evaluate`` for ``model_dir``."""
        from lm_eval.utils import simple_parse_args_string

        opts = self.options
        model_args = {**simple_parse_args_string(opts.model_args)}
        model_args["pretrained"] = str(language_model_dir(model_dir))
        return {
            "model": "hf",
            "model_args": model_args,
            "tasks": list(self.tasks),
            "num_fewshot": opts.num_fewshot,
            "batch_size": opts.batch_size,
            "max_batch_size": opts.max_batch_size,
            "device": opts.device or default_device(self.sweep_device),
            "limit": opts.limit,
            "apply_chat_template": opts.apply_chat_template,
            "task_manager": task_manager(opts.include_path, opts.include_defaults),
            # Samples and bootstrapped stderrs are not returned: skip their cost.
            "log_samples": False,
            "bootstrap_iters": 0,
        }

    def __call__(self, model_dir: str) -> dict[str, float]:
        lm_eval, _ = _import_lm_eval()
        output = lm_eval.simple_evaluate(**self.harness_arguments(model_dir))
        if output is None:  # a non-zero rank of a distributed run
            raise FusionError(f"--eval {self.spec}: the harness returned no results")
        return main_metrics(output, self.tasks, self.options.average)


def main_metrics(
    output: dict[str, Any], tasks: tuple[str, ...], average: str = LA_NAME
) -> dict[str, float]:
    """Each task's main metric from a ``simple_evaluate`` output, then ``average`` (``LA``),
    their mean (see :func:`fusion_kernels.evaluation.harness.main_metrics`)."""
    return harness.main_metrics(output, tasks, average, "lm-eval")


def is_multimodal(model_dir: str | Path) -> bool:
    """Whether ``model_dir/config.json`` describes a multimodal model (a ``text_config`` or a
    ``vision_config``): one lm-eval's ``hf`` model cannot load as a language model."""
    try:
        config = load_json(Path(model_dir) / "config.json", MAX_INDEX_BYTES)
    except FusionError as exc:
        raise FusionError(f"{exc}: lm-eval needs a readable config.json") from None
    return isinstance(config, dict) and ("text_config" in config or "vision_config" in config)


def language_model_dir(model_dir: str | Path) -> Path:
    """The directory the harness loads: the model itself when it is a language model, else the
    text-only export (``--text-model-out``) the sweep writes in :data:`TEXT_EXPORT_NAME`/."""
    path = Path(model_dir)
    if not is_multimodal(path):
        return path
    text_dir = path / TEXT_EXPORT_NAME
    if (text_dir / "config.json").exists():
        return text_dir
    raise FusionError(
        f"{path} is a multimodal model; lm-eval scores its language model from a text-only "
        f"export in {TEXT_EXPORT_NAME}/ beside its weights, which this model lacks (merge it with "
        f"--text-model-out {path / TEXT_EXPORT_NAME})"
    )
