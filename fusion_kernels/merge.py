"""Command line: ``python -m fusion_kernels.merge --base DIR --tuned DIR --out DIR [options]``.

Exit status: 0 done, 2 bad input (one line on stderr naming the file/tensor and the fix),
130 interrupted. ``--demo [DIR]`` generates a small base/tuned pair and merges it. The parser is
:mod:`fusion_kernels.cli.merge_parser`; parameters from the flags or ``--config`` come from
:mod:`fusion_kernels.cli.merge_params`.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import NoReturn

from .cli.dry_run import print_dry_run
from .cli.merge_params import merge_params
from .cli.merge_parser import build_parser
from .errors import FusionError
from .io.outputs import check_target
from .io.writer import MERGE_KIND, REPORT_NAME
from .pipeline import merge_checkpoints
from .process import return_freed_memory_promptly, run_cli
from .sizes import format_size

__all__ = ["build_parser", "cli", "command", "main", "run", "summary"]


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed merge command line; returns the exit status."""
    params, rules = merge_params(args)
    if args.demo is not None:
        return _run_demo(Path(args.demo), args, params, rules)
    missing = [f"--{n}" for n in ("base", "tuned", "out") if getattr(args, n) is None]
    if args.dry_run and "--out" in missing:
        missing.remove("--out")
    if missing:
        raise FusionError(f"missing {', '.join(missing)} (or use --demo)")
    if args.dry_run:
        print_dry_run(args, params, rules)
        return 0
    if args.text_model_out is not None:
        from .textexport import check_text_model_out

        check_text_model_out(args.text_model_out, [args.base, args.tuned], args.out, args.overwrite)
    report = _merge(args, params, rules)
    print(summary(report, args.out))
    if args.text_model_out is not None:
        _export_text_model(args)
    if args.plots:
        _write_plots(args, rules, report, args.out)
    return 0


def _merge(args: argparse.Namespace, params, rules) -> dict:
    return merge_checkpoints(
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


def _export_text_model(args: argparse.Namespace) -> None:
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


def _write_plots(args, rules, report, out: Path) -> None:
    from .locate import locate_from_args, write_outputs

    located = locate_from_args(args, rules)
    pngs = write_outputs(located, out / "fusion_plots", merge_report=report)
    print(f"plots: {len(pngs)} in {out / 'fusion_plots' / 'index.html'}")


def summary(report: dict, out: Path) -> str:
    """One paragraph on what a finished merge did."""
    t = report["totals"]
    rate = format_size(t["bytes"] / max(t["seconds"], 1e-3), "/s")
    seconds = f"{t['seconds']:{'.3g' if t['seconds'] < 100 else '.0f'}} s"
    kept = 100.0 * t["kept"] / max(t["numel_merged"], 1)
    lines = [
        f"merged {t['merged']} tensors, copied {t['copied']}: {format_size(t['bytes'])} in "
        f"{seconds} ({rate}) with backend {', '.join(report['backends']) or '-'}",
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
    out = root / "merged"
    # Like --out: an earlier demo's merge is replaced only when asked to.
    check_target(out, args.overwrite, "--demo", REPORT_NAME, MERGE_KIND)
    start = time.perf_counter()
    base, tuned = generate_pair(root)
    print(
        f"generated a Llama-layout base/tuned pair in {root} ({time.perf_counter() - start:.1f} s)"
    )
    report = merge_checkpoints(
        base,
        tuned,
        out,
        params,
        rules=rules,
        backend=args.backend,
        device=args.device,
        overwrite=args.overwrite,
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
