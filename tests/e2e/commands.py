"""The package's commands run in a child process, and what a refused one prints: shared by the
guarantee tests."""

import subprocess
import sys


def cli(tool: str, *args) -> list[str]:
    """``python -m fusion_kernels.TOOL ARGS``, each argument as a string."""
    return [sys.executable, "-m", f"fusion_kernels.{tool}", *map(str, args)]


def merge(*args) -> list[str]:
    return cli("merge", *args, "--quiet")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


def one_error_line(done: subprocess.CompletedProcess | str, fragment: str = "") -> str:
    """The stderr of a refused command: one ``error:`` line (after any warnings), no traceback."""
    err = done if isinstance(done, str) else done.stderr
    lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and fragment in lines[0], err
    return lines[0]


def refused(done: subprocess.CompletedProcess, fragment: str = "") -> str:
    """:func:`one_error_line` of a command that exited with status 2."""
    assert done.returncode == 2, done.stderr
    return one_error_line(done, fragment)


def partials(directory) -> list[str]:
    """The names of a merge's unfinished outputs left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)
