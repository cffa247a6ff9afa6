"""``python -m fusion_kernels.sweep --base B --tuned T --out O --grid GRID --eval SCORER``.

Exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from .. import options
from ..process import run_cli
from .results import KEEP_MODES
from .run import run_sweep

INTERRUPTED = "interrupted: the points done so far are in results.csv"


def build_parser() -> argparse.ArgumentParser:
    parser = options.Parser(
        prog="python -m fusion_kernels.sweep",
        description="Merge at every point of a grid, evaluate each merged model, keep the best.",
    )
    options.add_models(parser, required=True)
    options.add_output(
        parser,
        "sweep directory: new, or one to resume (a sweep that has no point done yet may be "
        "rerun with other options)",
        overwrite=None,
        required=True,
    )
    _add_grid_and_scoring(parser)
    _add_executor(parser.add_argument_group("where points run"))
    _add_merge_options(parser.add_argument_group("merging each point (as for merge)"))
    return parser


def _add_grid_and_scoring(parser) -> None:
    parser.add_argument(
        "--grid",
        required=True,
        help="'name=v1,v2;name=...', names: method and merge parameters "
        "(e.g. 'method=ties,neu-p-ties;density=0.1,0.2;top_neurons=0.1,0.3')",
    )
    parser.add_argument(
        "--eval",
        required=True,
        action="append",
        metavar="MODULE:FUNCTION|lm-eval:TASK[,TASK]|lmms-eval:TASK[,TASK]|paper",
        help="model directory -> {metric: number} "
        "(e.g. fusion_kernels.experiments.miniature:evaluate); lm-eval:TASKS, the built-in "
        "lm-evaluation-harness scorer (their mean: LA); lmms-eval:TASKS, the merged multimodal "
        "model scored by lmms-eval's command line (their mean: VA); paper, both on the paper's "
        "benchmarks (LA: race, commonsense_qa, piqa, openbookqa, gsm8k, arc_easy, arc_challenge; "
        "VA: mme, mmmu_val, scienceqa_img, gqa, mmbench_cn_dev, mmbench_en_dev); repeat to "
        "combine scorers",
    )
    parser.add_argument(
        "--eval-arg",
        action="append",
        default=[],
        metavar="[lm-eval:|lmms-eval:]KEY=VALUE",
        help="a built-in scorer's option (repeatable), for every one that takes KEY, or with a "
        "prefix for that one alone. lm-eval: limit, batch_size, max_batch_size, device, "
        "include_path, include_defaults, num_fewshot, apply_chat_template, model_args, average; "
        "lmms-eval: limit, batch_size, device, include_path, model, model_args, force_simple, "
        "python (another environment's), average. device defaults to --device, else cuda when "
        "present, else cpu",
    )
    parser.add_argument(
        "--objective",
        metavar="METRIC,METRIC|MODULE:FUNCTION",
        help="OA, what picks the best: the mean of the named metrics, or your function of them "
        "(default: the mean of LA and VA when both are returned)",
    )
    parser.add_argument(
        "--tradeoff",
        metavar="X,Y",
        help="metrics of the trade-off scatter (default: LA,VA)",
    )
    parser.add_argument(
        "--score-inputs",
        action="store_true",
        help="also score base and tuned, drawn as reference points (once per --out)",
    )
    parser.add_argument(
        "--keep",
        choices=KEEP_MODES,
        default="best",
        help="merged models left in OUT/models: the best point's (default), all, none",
    )
    parser.add_argument(
        "--metric", help="metric that picks the best (default: OA if there is one, else the first)"
    )
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument(
        "--maximize",
        dest="maximize",
        action="store_true",
        default=True,
        help="the best point has the largest --metric (default)",
    )
    direction.add_argument(
        "--minimize",
        dest="maximize",
        action="store_false",
        help="the best point has the smallest --metric",
    )


def _add_executor(parser) -> None:
    parser.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: one point at a time in this process (default); ray: Ray Tune trials",
    )
    parser.add_argument(
        "--ray-address", help="Ray cluster to join (default: start a local instance)"
    )
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="ray: CPUs per point")
    parser.add_argument("--gpus-per-trial", type=float, default=0, help="ray: GPUs per point")


def _add_merge_options(group) -> None:
    options.add_overrides(group)
    options.add_neuron_rules(group)
    options.add_pairing(group)
    options.add_execution(group, device_default=None)
    options.add_sizes(group, staging=False)
    options.add_model_card(group)


def command(argv: list[str] | None = None) -> int:
    """The sweep command; raises :class:`FusionError` on bad input (see :func:`run_cli`)."""
    args = build_parser().parse_args(argv)
    run_sweep(
        args.base,
        args.tuned,
        args.out,
        args.grid,
        args.eval,
        eval_args=args.eval_arg,
        objective=args.objective,
        tradeoff=args.tradeoff,
        score_inputs=args.score_inputs,
        keep=args.keep,
        metric=args.metric,
        maximize=args.maximize,
        executor=args.executor,
        ray_address=args.ray_address,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        backend=args.backend,
        device=args.device,
        overrides=args.set,
        neuron_rules=args.neuron_rule,
        name_map=args.map,
        layer_map=args.layer_map,
        allow_unpaired=args.allow_unpaired,
        memory_budget=args.memory_budget,
        max_shard_size=args.max_shard_size,
        model_card=args.model_card,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point from Python; returns the exit status (0, 2 bad input, 130 interrupted)."""
    return run_cli(command, argv, interrupted=INTERRUPTED, exit=False)


def cli() -> NoReturn:
    """Console-script entry point: :func:`command` under :func:`run_cli`, then a fast exit."""
    run_cli(command, interrupted=INTERRUPTED)
