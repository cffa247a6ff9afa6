"""The merge command's parser: the shared options (:mod:`.options`) and merge's own."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import options
from ..params import (
    DEFAULT_METHOD,
    PRESETS,
    RESCALE_MODES,
    RESTORE_MODES,
    SELECT_MODES,
    SUPPRESS_METHODS,
)

DEMO_DIR = "fusion_demo"
#: Flags of the method group that give a preset's parameters (``--config`` refuses them).
METHOD_FLAGS = (
    "suppress",
    "density",
    "gamma",
    "epsilon",
    "rescale",
    "weight",
    "restore",
    "top_neurons",
)


def build_parser() -> argparse.ArgumentParser:
    parser = options.Parser(
        prog="python -m fusion_kernels.merge",
        description="Merge a fine-tuned model back with its base (Neuron-Fusion and friends).",
    )
    _add_checkpoints(parser.add_argument_group("checkpoints"))
    _add_method(parser.add_argument_group("method (a preset; explicit flags override it)"))
    _add_execution(parser.add_argument_group("execution"))
    return parser


def _add_checkpoints(group) -> None:
    options.add_models(group, required=False)
    options.add_output(
        group, "output directory (appears only when complete)", overwrite="an earlier merge output"
    )
    options.add_pairing(group)
    group.add_argument(
        "--config",
        type=Path,
        metavar="CONFIG.yml",
        help="a mergekit YAML file: base, tuned model and method come from it "
        "(task_arithmetic, ties, breadcrumbs, dare_linear, della_linear, neuron_fusion, ...)",
    )
    group.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    options.add_model_card(group)
    group.add_argument(
        "--text-model-out",
        type=Path,
        metavar="DIR",
        help="also write the merged language model alone, as the base names it, to DIR",
    )
    group.add_argument(
        "--demo",
        nargs="?",
        const=DEMO_DIR,
        metavar="DIR",
        help=f"generate a small Llama-layout pair in DIR (default ./{DEMO_DIR}) and merge it "
        "into DIR/merged (an earlier demo's is replaced only with --overwrite)",
    )


def _add_method(group) -> None:
    group.add_argument("--method", choices=list(PRESETS), help=f"preset (default {DEFAULT_METHOD})")
    group.add_argument("--suppress", choices=SUPPRESS_METHODS, help="locate function Sub()")
    group.add_argument("--density", type=float, help="K: fraction of entries kept (0.2)")
    group.add_argument(
        "--gamma", type=float, help="breadcrumbs: fraction of largest dropped (0.01)"
    )
    group.add_argument("--epsilon", type=float, help="della: probability spread (0.15)")
    group.add_argument(
        "--rescale",
        choices=RESCALE_MODES,
        help="random/della: kept-entry scaling (default l1 for random and della, none otherwise)",
    )
    group.add_argument("--weight", type=float, help="α: scale of the suppressed delta (1.0)")
    group.add_argument(
        "--restore", choices=RESTORE_MODES, help="Neuron-Restore: replace or rescale"
    )
    group.add_argument("--top-neurons", type=float, help="M: fraction of neurons restored (0.3)")
    group.add_argument("--seed", type=int, help="seed for random, della and tie-breaking (0)")
    options.add_neuron_rules(group)
    options.add_overrides(group)
    group.add_argument(
        "--allow-nonfinite",
        action="store_true",
        default=None,
        help="copy tensors whose delta is NaN/Inf from tuned instead of failing",
    )


def _add_execution(group) -> None:
    options.add_execution(group)
    group.add_argument("--select", choices=SELECT_MODES, help="exact (default) or approx selection")
    options.add_sizes(group)
    options.add_quiet(group)
    group.add_argument(
        "--plots",
        action="store_true",
        help="after the merge, write OUT/fusion_plots/index.html (locate plots + merge per layer)",
    )
    group.add_argument(
        "--verify",
        action="store_true",
        help="re-read the output and check every tensor's name, shape, dtype and checksum",
    )
