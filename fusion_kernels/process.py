"""Process-level behaviour of every command-line entry point: logging, termination and exit.

Each command (merge, locate, sweep, the mergekit launcher) is a function ``command(argv) -> int``
that may raise; :func:`run_cli` turns it into a process with the project's exit contract:

- 0 (or the command's own status) when it returns;
- 2 and one line ``error: ...`` on stderr for a :class:`FusionError` (bad input; never a
  traceback);
- 130 and one line on stderr for Ctrl-C or SIGTERM, which both unwind as ``KeyboardInterrupt`` so
  ``finally`` blocks and context managers clean up (the writer removes its temporary directory,
  so nothing half-written is left).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable

from .errors import FusionError
from .io.outputs import remove_live_workspaces

#: Exit status of an interrupted command (128 + SIGINT, what shells report for Ctrl-C).
INTERRUPTED = 130
#: Exit status of a command given bad input.
BAD_INPUT = 2

Command = Callable[[list[str] | None], int]

#: glibc's ``mallopt`` parameters (malloc.h).
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def return_freed_memory_promptly() -> None:
    """Make this process's C allocator (glibc) give freed blocks of 1 MiB or more back at
    once, and serve all threads from two heaps at most.

    By default glibc raises its threshold for separate mappings as large blocks come and go
    and keeps freed memory in a heap per thread: tens of MB held past the budget. Process-wide,
    so for processes this package owns (the command line), not a library's caller.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 2**20)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        return  # not glibc: its own policy stands


def interrupt_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C (KeyboardInterrupt), so ``finally`` blocks and context
    managers clean up. A no-op outside the main thread, where no handler can be installed."""
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_cli(
    command: Command,
    argv: list[str] | None = None,
    *,
    interrupted: str = "interrupted: no output written",
    exit: bool = True,
) -> int:
    """Run ``command(argv)`` under the exit contract above.

    With ``exit=True`` (console scripts and ``python -m``) the process ends with the status,
    skipping interpreter finalization: tearing down the interpreter after torch is imported takes
    about half a second (every module object is collected), longer than a small merge's whole
    write. Everything the command owns is closed and synced by the time it returns, so this runs
    the atexit callbacks, flushes logging and the standard streams, and exits without the
    teardown. With ``exit=False`` (a command's ``main`` called from Python) it returns the status.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    interrupt_on_sigterm()
    try:
        status = _run(command, argv, interrupted, exit)
    except KeyboardInterrupt:
        # A second Ctrl-C that landed while the first one's cleanup or message was under way:
        # the command's own handlers already cleaned up what they could.
        status = INTERRUPTED
    # What a Ctrl-C kept the writer from removing (it can land between two calls, where no
    # handler of the writer runs); on success there is nothing left to remove.
    while True:
        try:
            remove_live_workspaces()
            break
        except KeyboardInterrupt:
            status = INTERRUPTED
    if exit:
        # The command is done; a Ctrl-C now would only turn the exit into a traceback.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        _exit_now(status)
    return status


def _run(command: Command, argv: list[str] | None, interrupted: str, exit: bool) -> int:
    """The command's status, or the contract's for what it raised (one line on stderr)."""
    try:
        return command(argv)
    except FusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return INTERRUPTED
    except SystemExit as exc:
        if not exit:
            raise
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def _exit_now(status: int):
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 1
    os._exit(status)
