"""mergekit with fusion_kernels inside: ``python -m fusion_kernels.mergekit CONFIG.yml OUT [...]``.

Installs the ``neuron_fusion`` merge method (:mod:`.method`) and the accelerated sparsify
(:mod:`.sparsify`), then runs mergekit's own ``mergekit-yaml`` entry
point with the remaining arguments, so every mergekit option and YAML feature works as usual.

Options of the launcher itself (removed before mergekit sees the arguments):
  --no-accelerate      keep mergekit's own sparsify; only register ``neuron_fusion``
  --fk-backend NAME    our backend: auto, torch, cpp, triton (default: $FUSION_KERNELS_BACKEND/auto)

mergekit's ``--random-seed N`` also seeds our counter-based draws and tie-breaks (default 0).
Exit status: mergekit's; 2 for a fusion_kernels error (one line on stderr); 130 interrupted.
"""

from __future__ import annotations

import sys

from ..errors import FusionError
from ..process import run_cli

PROG = "python -m fusion_kernels.mergekit"
LAUNCHER_HELP = """fusion_kernels launcher options (the rest are mergekit-yaml's):
  --no-accelerate    keep mergekit's own sparsify; only register the neuron_fusion method
  --fk-backend NAME  fusion_kernels backend: auto, torch, cpp, triton
  --random-seed N    also seeds fusion_kernels' counter-based draws and tie-breaks (default 0)
"""


def _take_option(argv: list[str], flag: str, *, remove: bool) -> str | None:
    """The value of ``flag VALUE`` or ``flag=VALUE`` in argv (the last one wins), or None."""
    value = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == flag and i + 1 < len(argv):
            value, width = argv[i + 1], 2
        elif arg.startswith(flag + "="):
            value, width = arg.split("=", 1)[1], 1
        else:
            i += 1
            continue
        if remove:
            del argv[i : i + width]
        else:
            i += width
    return value


def split_arguments(argv: list[str]) -> tuple[list[str], dict]:
    """mergekit's arguments and our ``install()`` keywords (``accelerate``, ``seed``,
    ``backend``) from the launcher's command line."""
    rest = [a for a in argv if a != "--no-accelerate"]
    backend = _take_option(rest, "--fk-backend", remove=True)
    seed = _take_option(rest, "--random-seed", remove=False)
    try:
        seed_value = int(seed) if seed is not None else 0
    except ValueError:
        raise FusionError(f"--random-seed must be an integer, got {seed!r}") from None
    options = {"accelerate": "--no-accelerate" not in argv, "seed": seed_value, "backend": backend}
    return rest, options


def check_paths(command, argv: list[str]) -> None:
    """Before mergekit runs: the config must be a bounded, alias-free YAML file, and OUT_PATH
    must stay clear of it and of every local model it names."""
    from pathlib import Path

    from ..io.outputs import check_output_path
    from ..io.safeload import load_yaml
    from .config import referenced_paths

    context = command.make_context(PROG, list(argv), resilient_parsing=True)
    config, out = context.params.get("config_file"), context.params.get("out_path")
    if config is None or out is None:
        return  # mergekit reports the missing argument
    data = load_yaml(Path(config))
    check_output_path(out, [config, *referenced_paths(data)])


def command(argv: list[str] | None = None) -> int:
    """Install our method and sparsify, run ``mergekit-yaml`` on ``argv``; return its status.

    Raises :class:`FusionError` for our errors (see :func:`run_cli`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, options = split_arguments(argv)
    from .sparsify import install

    install(**options)
    import click
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    if "--help" in rest:
        print(LAUNCHER_HELP)
    else:
        check_paths(mergekit_yaml, rest)

    try:
        status = mergekit_yaml.main(args=rest, prog_name=PROG, standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        print("Aborted!", file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point from Python; returns the exit status."""
    return run_cli(command, argv, interrupted="interrupted", exit=False)
