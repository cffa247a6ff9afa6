"""A shard that shrinks while it is mapped: one ``error:`` line and exit 2, not death by SIGBUS.

Shards are read through memory mappings (the CPU merge reads them in place). If another program
truncates a shard meanwhile, the next read of a page past the new end raises SIGBUS, which no
check beforehand can rule out (the file can shrink between the check and the read) and which
Python cannot turn into an exception (its handlers run later, after the faulting instruction
would have run again). So a process-wide SIGBUS handler is installed when the first shard is
mapped: if a registered shard is now smaller than when its header was read, it removes this
process's temporary output directories (the output path itself is never touched), prints one
line naming the shard and ends the process with status 2. Any other SIGBUS (not ours) gets the
default action, as if no handler were installed.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import threading
from pathlib import Path

from .outputs import live_workspaces

#: Shards mapped now: descriptor → (path, descriptor, size when the header was read).
_SHARDS: dict[int, tuple[Path, int, int]] = {}
_LOCK = threading.Lock()
_HANDLER = None  # the installed ctypes callback, kept alive here
_EXIT_STATUS = 2


def watch(key: int, path: Path, fd: int, size: int) -> None:
    """Register a mapped shard under ``key`` (its open descriptor ``fd``, unique while open, which
    stays open while it is mapped) and install the handler."""
    _install()
    _SHARDS[key] = (path, fd, size)


def unwatch(key: int) -> None:
    """Forget a shard (before its descriptor is closed)."""
    _SHARDS.pop(key, None)


def _install() -> None:
    global _HANDLER
    with _LOCK:
        if _HANDLER is not None:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        kind = ctypes.CFUNCTYPE(None, ctypes.c_int)
        handler = kind(_on_sigbus)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.signal(signal.SIGBUS, ctypes.cast(handler, ctypes.c_void_p))
        _HANDLER = (libc, handler)


def _on_sigbus(signum: int) -> None:
    """Runs on the faulting thread; never returns for a shard of ours."""
    shrunk = next((entry for entry in list(_SHARDS.values()) if _shrank(entry)), None)
    if shrunk is None:
        # Not a shard of ours: the default action, once this handler returns and the access
        # faults again.
        libc = _HANDLER[0]
        libc.signal(signal.SIGBUS, None)
        return
    path, _, size = shrunk
    for workspace in live_workspaces():
        shutil.rmtree(workspace, ignore_errors=True)
    message = (
        f"error: {path}: shrank while being read (from {size} bytes; another program truncated "
        "or rewrote it); nothing was written: let that program finish, then run again\n"
    )
    os.write(2, message.encode("utf-8", "replace"))
    os._exit(_EXIT_STATUS)


def _shrank(entry: tuple[Path, int, int]) -> bool:
    _, fd, size = entry
    try:
        return os.fstat(fd).st_size < size
    except OSError:
        return False
