"""The options merge, locate and sweep share, each declared, validated and worded once.

A command builds its parser with :class:`Parser` (a bad option is one ``error: ...`` line, exit
status 2, like every other bad input) and adds the groups it takes with the ``add_*`` functions
here; what an option means is then the same wherever it appears.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .errors import FusionError, ParameterError
from .ops import registered_backends
from .sizes import parse_size

BASE_HELP = "base model: a directory or weights file, or a Hub id ORG/NAME[@REV]"
TUNED_HELP = "fine-tuned model: a directory, weights file or Hub id, or MODEL+LORA_ADAPTER"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are :class:`ParameterError`: the command prints them as
    its one ``error: ...`` line (see :func:`fusion_kernels.process.run_cli`) instead of a usage
    block."""

    def error(self, message: str) -> NoReturn:
        raise ParameterError(f"{message} (see {self.prog} --help)")


def checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its :class:`FusionError` message becomes the option's."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except FusionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


size = checked(parse_size)


def add_models(group, *, required: bool) -> None:
    """``--base`` and ``--tuned``: every form a checkpoint reference takes."""
    group.add_argument("--base", required=required, help=BASE_HELP)
    group.add_argument("--tuned", required=required, help=TUNED_HELP)


def add_output(group, help: str, *, overwrite: str | None, required: bool = False) -> None:
    """``--out DIR`` and, where the command replaces an earlier output of its own, ``--overwrite``
    (``overwrite``: what may be replaced)."""
    group.add_argument("--out", type=Path, metavar="DIR", required=required, help=help)
    if overwrite is not None:
        group.add_argument(
            "--overwrite",
            action="store_true",
            help=f"replace an existing --out that is {overwrite}; nothing else is replaced",
        )


def add_pairing(group) -> None:
    """``--map``, ``--layer-map`` and ``--allow-unpaired``: how tuned tensors find base ones."""
    group.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="TUNED_PREFIX=BASE_PREFIX",
        help="rename tuned tensors to base names (repeatable); default: detected",
    )
    group.add_argument(
        "--layer-map",
        metavar="0,new,1-2|identity",
        help="base layer of each tuned language-model layer, in order ('new': no base "
        "counterpart, copied); default: from tuned's config (Mllama), else the identity",
    )
    group.add_argument(
        "--allow-unpaired",
        action="store_true",
        help="go on when base and tuned do not pair one to one: skip base-only tensors, "
        "copy unpaired tuned ones (recorded in the report); default: refuse",
    )


def add_neuron_rules(group) -> None:
    """``--neuron-rule``: which axis of a tensor is its neurons."""
    group.add_argument(
        "--neuron-rule",
        action="append",
        default=[],
        metavar="REGEX=row|col|none",
        help="neuron axis for names matching REGEX (repeatable; before the defaults)",
    )


def add_overrides(group) -> None:
    """``--set``: parameters for the tensors a pattern matches."""
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="REGEX:key=value[,key=value]",
        help="parameters for tensors matching REGEX, e.g. 'self_attn:density=0.3' (repeatable; "
        "the first match wins)",
    )


def add_execution(group, *, device_default: str | None = "cpu") -> None:
    """``--backend`` (any registered one, or auto) and ``--device``."""
    group.add_argument(
        "--backend",
        choices=["auto", *registered_backends()],
        default=None,
        help="kernel backend (default auto, or $FUSION_KERNELS_BACKEND)",
    )
    default = f"default {device_default}"
    if device_default is None:  # the sweep's: it follows the trial's resources
        default = "default cpu; cuda with --gpus-per-trial"
    group.add_argument("--device", default=device_default, help=f"cpu, cuda or cuda:N ({default})")


def add_sizes(group, *, staging: bool = True) -> None:
    """``--memory-budget``, ``--max-shard-size`` and (``staging``) ``--staging-size``; each
    takes 5GB, 500MB, 2GiB or a byte count."""
    group.add_argument(
        "--memory-budget",
        type=size,
        metavar="SIZE",
        help="most bytes of tensor data held at once; larger tensors stream through the cpp "
        "backend in chunks (default 672MiB)",
    )
    group.add_argument(
        "--max-shard-size",
        type=size,
        metavar="SIZE",
        help="regroup output shards of at most SIZE (e.g. 5GB) with an index; a model that fits "
        "in one is one model.safetensors, without index (as transformers saves it); default: "
        "tuned's shard layout",
    )
    if staging:
        group.add_argument(
            "--staging-size",
            type=size,
            metavar="SIZE",
            help="pinned staging buffers that tensors stream through to a GPU (default 256MiB, "
            "at most a quarter of --memory-budget)",
        )


def add_model_card(group) -> None:
    """``--no-model-card``."""
    group.add_argument(
        "--no-model-card",
        dest="model_card",
        action="store_false",
        help="do not write README.md (the merged model's card) into a merged model",
    )


def add_quiet(group) -> None:
    """``--quiet``."""
    group.add_argument("--quiet", action="store_true", help="no progress bar")
