"""Command line: ``python -m fusion_kernels.merge --base DIR --tuned DIR --out DIR [options]``.

Exit status: 0 done, 2 bad input (one line on stderr naming the file/tensor and the fix),
130 interrupted. ``--demo [DIR]`` generates a small base/tuned pair and merges it.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import NoReturn

from .errors import FusionError, ParameterError
from .io.outputs import check_output_path
from .neurons import NeuronRules, parse_rule
from .ops import registered_backends
from .params import (
    DEFAULT_METHOD,
    PRESETS,
    RESCALE_MODES,
    RESTORE_MODES,
    SELECT_MODES,
    SUPPRESS_METHODS,
    TensorParams,
    params_for,
    parse_override,
)
from .pipeline import merge_checkpoints, plan_merge
from .plan.planner import parse_size
from .process import run_cli
from .streaming.chunks import return_freed_memory_promptly

DEMO_DIR = "fusion_demo"


def _size(text: str) -> int:
    """:func:`parse_size` for argparse, which prints this message rather than a generic one."""
    try:
        return parse_size(text)
    except ParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fusion_kernels.merge",
        description="Merge a fine-tuned model back with its base (Neuron-Fusion and friends).",
    )
    io = parser.add_argument_group("checkpoints")
    io.add_argument(
        "--base", help="base model: a directory or weights file, or a Hub id ORG/NAME[@REV]"
    )
    io.add_argument(
        "--tuned",
        help="fine-tuned model: a directory, weights file or Hub id, or MODEL+LORA_ADAPTER",
    )
    io.add_argument("--out", type=Path, help="output directory (appears only when complete)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    io.add_argument(
        "--max-shard-size",
        type=_size,
        metavar="SIZE",
        help="regroup output shards (e.g. 5GB); default: tuned's shard layout",
    )
    io.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="TUNED_PREFIX=BASE_PREFIX",
        help="rename tuned tensors to base names (repeatable); default: detected",
    )
    io.add_argument(
        "--layer-map",
        metavar="0,new,1-2|identity",
        help="base layer of each tuned language-model layer, in order ('new': no base "
        "counterpart, copied); default: from tuned's config (Mllama), else the identity",
    )
    io.add_argument(
        "--allow-unpaired",
        action="store_true",
        help="merge even when base and tuned do not pair one to one: skip base-only tensors, "
        "copy unpaired tuned ones (recorded in the report); default: refuse",
    )
    io.add_argument(
        "--config",
        type=Path,
        metavar="CONFIG.yml",
        help="a mergekit YAML file: base, tuned model and method come from it "
        "(task_arithmetic, ties, breadcrumbs, dare_linear, della_linear, neuron_fusion, ...)",
    )
    io.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    io.add_argument(
        "--no-model-card",
        dest="model_card",
        action="store_false",
        help="do not write OUT/README.md (the merged model's card)",
    )
    io.add_argument(
        "--text-model-out",
        type=Path,
        metavar="DIR",
        help="also write the merged language model alone, as the base names it, to DIR",
    )
    io.add_argument(
        "--demo",
        nargs="?",
        const=DEMO_DIR,
        metavar="DIR",
        help=f"generate a small Llama-layout pair in DIR (default ./{DEMO_DIR}) and merge it",
    )

    method = parser.add_argument_group("method (a preset; explicit flags override it)")
    method.add_argument(
        "--method",
        choices=list(PRESETS),
        help=f"preset (default {DEFAULT_METHOD})",
    )
    method.add_argument("--suppress", choices=SUPPRESS_METHODS, help="locate function Sub()")
    method.add_argument("--density", type=float, help="K: fraction of entries kept (0.2)")
    method.add_argument(
        "--gamma", type=float, help="breadcrumbs: fraction of largest dropped (0.01)"
    )
    method.add_argument("--epsilon", type=float, help="della: probability spread (0.15)")
    method.add_argument(
        "--rescale", choices=RESCALE_MODES, help="random/della: kept-entry scaling (l1)"
    )
    method.add_argument("--weight", type=float, help="α: scale of the suppressed delta (1.0)")
    method.add_argument(
        "--restore", choices=RESTORE_MODES, help="Neuron-Restore: replace or rescale"
    )
    method.add_argument("--top-neurons", type=float, help="M: fraction of neurons restored (0.3)")
    method.add_argument("--seed", type=int, help="seed for random, della and tie-breaking (0)")
    method.add_argument(
        "--neuron-rule",
        action="append",
        default=[],
        metavar="REGEX=row|col|none",
        help="neuron axis for names matching REGEX (repeatable; before the defaults)",
    )
    method.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="REGEX:key=value[,key=value]",
        help="parameters for tensors matching REGEX, e.g. 'self_attn:density=0.3' (repeatable; "
        "the first match wins)",
    )
    method.add_argument(
        "--allow-nonfinite",
        action="store_true",
        default=None,
        help="copy tensors whose delta is NaN/Inf from tuned instead of failing",
    )

    run = parser.add_argument_group("execution")
    run.add_argument(
        "--backend",
        choices=["auto", *registered_backends()],
        default=None,
        help="kernel backend (default auto, or $FUSION_KERNELS_BACKEND)",
    )
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    run.add_argument("--select", choices=SELECT_MODES, help="exact (default) or approx selection")
    run.add_argument(
        "--staging-size",
        type=_size,
        metavar="SIZE",
        help="pinned staging buffers that tensors stream through to a GPU (default 256MiB, at "
        "most a quarter of --memory-budget)",
    )
    run.add_argument(
        "--memory-budget",
        type=parse_size,
        metavar="SIZE",
        help="most bytes of tensor data held at once; larger tensors stream through the cpp "
        "backend in chunks (default 672MiB)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--plots",
        action="store_true",
        help="after the merge, write OUT/fusion_plots/index.html (locate plots + merge per layer)",
    )
    run.add_argument(
        "--verify",
        action="store_true",
        help="re-read the output and check every tensor's name, shape, dtype and checksum",
    )
    return parser


def _params(args: argparse.Namespace):
    return params_for(
        args.method or DEFAULT_METHOD,
        suppress=args.suppress,
        density=args.density,
        gamma=args.gamma,
        epsilon=args.epsilon,
        rescale=args.rescale,
        weight=args.weight,
        restore=args.restore,
        top_neurons=args.top_neurons,
        seed=args.seed,
        select=args.select,
        allow_nonfinite=args.allow_nonfinite,
    )


_METHOD_FLAGS = (
    "suppress",
    "density",
    "gamma",
    "epsilon",
    "rescale",
    "weight",
    "restore",
    "top_neurons",
)


def _from_config(args: argparse.Namespace) -> tuple[TensorParams, NeuronRules]:
    """Models, parameters and neuron rules from a mergekit YAML file (``--config``)."""
    from .io.sources import open_checkpoint
    from .mergekit.config import load_merge_config

    given = [f"--{n.replace('_', '-')}" for n in _METHOD_FLAGS if getattr(args, n) is not None]
    given += ["--method"] * (args.method is not None)
    given += ["--set"] * bool(args.set) + [f"--{n}" for n in ("base", "tuned") if getattr(args, n)]
    if given or args.demo is not None:
        raise FusionError(
            f"--config sets the models and the method; drop {', '.join(given) or '--demo'}"
        )
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


def run(args: argparse.Namespace) -> int:
    if args.config is not None:
        params, rules = _from_config(args)
    else:
        params = TensorParams(_params(args), [parse_override(text) for text in args.set])
        rules = NeuronRules([parse_rule(r) for r in args.neuron_rule])
    if args.demo is not None:
        return _run_demo(Path(args.demo), args, params, rules)
    missing = [f"--{n}" for n in ("base", "tuned", "out") if getattr(args, n) is None]
    if args.dry_run and "--out" in missing:
        missing.remove("--out")
    if missing:
        raise FusionError(f"missing {', '.join(missing)} (or use --demo)")
    if args.dry_run:
        _, _, plan = plan_merge(
            args.base,
            args.tuned,
            rules,
            args.max_shard_size,
            args.map,
            args.layer_map,
            args.allow_unpaired,
        )
        params.check(name for name, task in plan.tasks.items() if task.action == "merge")
        print(plan.describe())
        print(f"params: {params.default.as_dict()}")
        for entry in params.describe():
            if "pattern" in entry:
                pattern = entry.pop("pattern")
                print(f"  for /{pattern}/: {entry}")
            else:
                print(
                    f"  for names containing {entry['filter']!r}: {entry['parameter']} = "
                    f"{entry['value']!r} (mergekit filter)"
                )
        return 0
    if args.text_model_out is not None:
        _check_text_out(args)
    report = merge_checkpoints(
        args.base,
        args.tuned,
        args.out,
        params,
        rules=rules,
        backend=args.backend,
        device=args.device,
        max_shard_size=args.max_shard_size,
        name_map=args.map,
        layer_map=args.layer_map,
        allow_unpaired=args.allow_unpaired,
        overwrite=args.overwrite,
        progress=not args.quiet,
        verify=args.verify,
        staging_bytes=args.staging_size,
        memory_budget=args.memory_budget,
        model_card=args.model_card,
    )
    print(summary(report, args.out))
    if args.text_model_out is not None:
        from .textexport import export_text_model

        export_text_model(
            args.base,
            args.out,
            args.text_model_out,
            name_map=args.map,
            layer_map=args.layer_map,
            allow_unpaired=args.allow_unpaired,
            overwrite=args.overwrite,
        )
        print(f"text model: {args.text_model_out}")
    if args.plots:
        _write_plots(args, rules, report, args.out)
    return 0


def _check_text_out(args: argparse.Namespace) -> None:
    """Refuse a --text-model-out that exists or overlaps an input or --out, before any work."""
    from .io.sources import open_checkpoint
    from .io.writer import check_target

    flag = "--text-model-out"
    check_output_path(args.text_model_out, [args.out], flag, "--out")
    roots = []
    for reference in (args.base, args.tuned):
        ckpt = open_checkpoint(reference)
        roots += ckpt.roots
        ckpt.close()
    check_output_path(args.text_model_out, roots, flag)
    check_target(Path(os.path.abspath(args.text_model_out)), args.overwrite, flag)


def _write_plots(args, rules, report, out: Path) -> None:
    from .locate import locate_from_args, write_outputs

    located = locate_from_args(args, rules)
    pngs = write_outputs(located, out / "fusion_plots", merge_report=report)
    print(f"plots: {len(pngs)} in {out / 'fusion_plots' / 'index.html'}")


def summary(report: dict, out: Path) -> str:
    """One paragraph on what a finished merge did."""
    t = report["totals"]
    rate = t["bytes"] / max(t["seconds"], 1e-9) / 1e9
    kept = 100.0 * t["kept"] / max(t["numel_merged"], 1)
    lines = [
        f"merged {t['merged']} tensors, copied {t['copied']} ({t['bytes'] / 1e9:.3f} GB) in "
        f"{t['seconds']:.2f} s ({rate:.2f} GB/s) with backend "
        f"{', '.join(report['backends']) or '-'}",
        f"kept {t['kept']} of {t['numel_merged']} merged entries ({kept:.1f} %), restored "
        f"{t['restored_neurons']} neurons ({t['fallbacks']} rescale fallbacks to replace)",
    ]
    if t["copied_nonfinite"]:
        lines.append(f"copied unchanged (non-finite delta): {', '.join(t['copied_nonfinite'])}")
    if report.get("verified"):
        lines.append("verified: every tensor re-read and matched its checksum")
    if t["skipped_base_only"]:
        lines.append(f"skipped (only in base): {len(t['skipped_base_only'])} tensors")
    lines.append(f"output: {out}")
    return "\n".join(lines)


def _run_demo(root: Path, args, params, rules) -> int:
    from .demo import check_demo_dir, generate_pair, planted_restored

    check_demo_dir(root)
    start = time.perf_counter()
    base, tuned = generate_pair(root)
    print(
        f"generated a Llama-layout base/tuned pair in {root} ({time.perf_counter() - start:.1f} s)"
    )
    out = root / "merged"
    report = merge_checkpoints(
        base,
        tuned,
        out,
        params,
        rules=rules,
        backend=args.backend,
        device=args.device,
        overwrite=True,
        progress=not args.quiet,
    )
    print(summary(report, out))
    if params.default.restore == "replace":
        found, total = planted_restored(tuned, out)
        print(f"planted large-change neurons restored bit-identical to tuned: {found} of {total}")
    return 0


def command(argv: list[str] | None = None) -> int:
    """The merge command; raises :class:`FusionError` on bad input (see :func:`run_cli`)."""
    # Past a file-size limit, let the write fail with EFBIG (a clear error) instead of dying.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return run(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Entry point from Python; returns the exit status (0, 2 bad input, 130 interrupted)."""
    return run_cli(command, argv, exit=False)


def cli() -> NoReturn:
    """Console-script entry point: :func:`command` under :func:`run_cli`, then a fast exit."""
    return_freed_memory_promptly()
    run_cli(command)


if __name__ == "__main__":
    cli()
