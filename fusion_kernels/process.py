"""Process-level behaviour of the command-line entry points: termination and exit."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn


def interrupt_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C (KeyboardInterrupt), so ``finally`` blocks and context
    managers clean up (the writer removes its temporary directory)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_and_exit(main: Callable[[], int]) -> NoReturn:
    """Run ``main`` and end the process with its status, skipping interpreter finalization.

    Tearing down the interpreter after torch is imported takes about half a second (every module
    object is collected), longer than a small merge's whole write. Everything the command owns is
    closed and synced by the time ``main`` returns, so this runs the atexit callbacks, flushes
    logging and the standard streams, and exits without the teardown.
    """
    try:
        status = main()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        # A second Ctrl-C that landed while the first one's cleanup or message was under way:
        # the command's own handler already cleaned up what it could.
        status = 130
    # The command is done; a Ctrl-C now would only turn the exit into a traceback.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 1
    os._exit(status)
