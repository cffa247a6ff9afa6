"""The parameters and neuron rules of a merge, from the method flags or from ``--config`` (a
mergekit YAML file, translated into the same objects)."""

from __future__ import annotations

import argparse

from ..errors import FusionError
from ..io.outputs import check_output_path
from ..neurons import NeuronRules, parse_rule
from ..params import DEFAULT_METHOD, TensorParams, params_for, parse_override
from .merge_parser import METHOD_FLAGS


def merge_params(args: argparse.Namespace) -> tuple[TensorParams, NeuronRules]:
    """Parameters and neuron rules the command line asks for (``--config`` or the flags)."""
    if args.config is not None:
        return params_from_config(args)
    default = params_for(
        args.method or DEFAULT_METHOD,
        **{name: getattr(args, name) for name in METHOD_FLAGS},
        seed=args.seed,
        select=args.select,
        allow_nonfinite=args.allow_nonfinite,
    )
    params = TensorParams(default, [parse_override(text) for text in args.set])
    return params, NeuronRules([parse_rule(r) for r in args.neuron_rule])


def params_from_config(args: argparse.Namespace) -> tuple[TensorParams, NeuronRules]:
    """Models, parameters and neuron rules from ``--config``; sets ``args.base`` and
    ``args.tuned``. The flags the file replaces are refused rather than silently dropped."""
    from ..io.sources import open_checkpoint
    from ..mergekit.config import load_merge_config

    _refuse_flags_the_config_sets(args)
    if args.out is not None:
        # The config is an input too: --overwrite must not be able to remove it.
        check_output_path(args.out, [args.config])
    cfg = load_merge_config(args.config)
    tuned = open_checkpoint(cfg.tuned)
    try:
        cfg.check_dtypes(tuned.info(name).torch_dtype for name in tuned.names())
    finally:
        tuned.close()
    args.base, args.tuned = str(cfg.base), str(cfg.tuned)
    extra = {"seed": args.seed, "select": args.select, "allow_nonfinite": args.allow_nonfinite}
    default = cfg.params.default.replace(**{k: v for k, v in extra.items() if v is not None})
    rules = [*(parse_rule(r) for r in args.neuron_rule), *cfg.rules.rules]
    return cfg.params.with_default(default), NeuronRules(rules, use_defaults=False)


def _refuse_flags_the_config_sets(args: argparse.Namespace) -> None:
    given = [f"--{n.replace('_', '-')}" for n in METHOD_FLAGS if getattr(args, n) is not None]
    given += ["--method"] * (args.method is not None)
    given += ["--set"] * bool(args.set) + [f"--{n}" for n in ("base", "tuned") if getattr(args, n)]
    if given or args.demo is not None:
        raise FusionError(
            f"--config sets the models and the method; drop {', '.join(given) or '--demo'}"
        )
