"""Where outputs may go, and how they appear there without touching anything else.

Three rules, each kept here once:

- **Inputs are out of reach.** :func:`input_paths` lists every file an input consists of (the
  directory, its shards, index and copied files, and each symlink's target), and
  :func:`check_output_path` refuses an output that is, contains or lies inside any of them, so no
  write, rename or ``--overwrite`` removal can reach an input, however the files are linked (a
  Hugging Face cache links ``snapshots/REV/*`` to ``blobs/SHA``).
- **Only our own directories are removed.** A run works in ``.NAME.partial-PID`` beside the
  output, created with a marker file inside that names the output and the process; leftovers of
  killed runs are recognised by that exact name *and* the marker, never by a pattern alone.
- **The output appears in one atomic step.** The finished directory is renamed onto the output
  path with ``renameat2(RENAME_NOREPLACE)`` (or, with ``--overwrite``, swapped in with
  ``RENAME_EXCHANGE``), so of two runs into the same new output, one wins and the other is
  refused with nothing written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import OutputExistsError, ParameterError

#: The marker file inside every temporary directory a run creates.
MARKER_NAME = ".fusion_kernels-partial.json"
#: Inside the temporary directory: where the output is built, and where a replaced one waits.
PAYLOAD_NAME = "output"
PREVIOUS_NAME = "previous"

#: Temporary directories this process created and has not removed yet (see
#: :func:`remove_live_workspaces`).
_LIVE: set[Path] = set()

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


# --- inputs -------------------------------------------------------------------------------------


def input_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every path the given inputs consist of, each as written (absolute) and as resolved.

    A directory contributes itself and its top-level entries (shards, index, config and tokenizer
    files: what a merge reads or copies); a file contributes itself. Symlinks are followed, so a
    shard that links into a blob store contributes the blob.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        entries = [path]
        if path.is_dir():
            with contextlib.suppress(OSError):
                entries += sorted(path.iterdir())
        for entry in entries:
            found.append(_absolute(entry))
            found.append(entry.resolve())
    return list(dict.fromkeys(found))


def _absolute(path: Path) -> Path:
    """``path`` made absolute with its parent resolved but not itself (a symlink stays one)."""
    path = Path(os.path.abspath(path))
    return path.parent.resolve() / path.name if path.name else path


def check_output_path(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    flag: str = "--out",
    what: str = "the input",
) -> None:
    """Refuse an output that is, contains or lies inside any input path; its nearest existing
    directory must be writable. Raises :class:`ParameterError` naming both paths (``flag``: the
    option that gave the output; ``what``: what the inputs are)."""
    out = Path(out)
    targets = {_absolute(out), out.resolve()}
    for path in input_paths(inputs):
        for target in targets:
            if target == path or path in target.parents or target in path.parents:
                raise ParameterError(
                    f"{flag} {out} overlaps {what} {path}; write to a separate directory"
                )
    check_writable(out, flag)


def check_writable(out: Path, flag: str = "--out") -> None:
    """The output is a directory or does not exist yet, and it (if it exists) and the directory
    that receives it (the nearest existing ancestor) are writable."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise ParameterError(f"{flag} {out} is an existing file; choose a directory")
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ParameterError(f"{flag} {out}: cannot write under {probe}, a file")
    for directory in (probe, out) if out.exists() else (probe,):
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ParameterError(f"{flag} {out}: {directory} is not writable")


def check_target(out: Path, overwrite: bool, flag: str, marker: str, kind: str) -> None:
    """An output directory (given as ``flag``) may be written: it does not exist, or
    ``overwrite`` is given and it is an earlier ``kind`` output, one holding the file ``marker``
    every such output has (:func:`check_replaceable`). Checked again, atomically, when the
    finished output is renamed into place."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise OutputExistsError(
            f"{out}: output already exists; pass --overwrite or choose another {flag}"
        )
    check_replaceable(out, flag, marker, kind)


def check_replaceable(out: Path, flag: str, marker: str, kind: str) -> None:
    """``--overwrite`` replaces only an empty directory or an earlier output of the command (a
    real directory holding its ``marker`` file): anything else, a model, a home directory or one
    that holds the working directory, is not this tool's to remove."""
    real_dir = not out.is_symlink() and out.is_dir()
    if real_dir and ((out / marker).is_file() or not any(out.iterdir())):
        return
    raise OutputExistsError(
        f"{out}: exists and is not an earlier {kind} output (no {marker}); "
        f"--overwrite replaces only those: remove it yourself or choose another {flag}"
    )


# --- our temporary directories --------------------------------------------------------------------


def create_workspace(out: Path) -> Path:
    """Create ``.NAME.partial-PID`` beside ``out`` with its marker, and the (empty) directory in
    it where the output is built; returns the workspace."""
    workspace = _workspace_path(out, os.getpid())
    if os.path.lexists(workspace):
        _remove_if_ours(workspace, out, os.getpid())
    workspace.mkdir()
    _LIVE.add(workspace)
    marker = {"output": out.name, "pid": os.getpid()}
    (workspace / MARKER_NAME).write_text(json.dumps(marker) + "\n")
    (workspace / PAYLOAD_NAME).mkdir()
    return workspace


def _workspace_path(out: Path, pid: int) -> Path:
    return out.parent / f".{out.name}.partial-{pid}"


def remove_stale_workspaces(out: Path) -> None:
    """Clean up after runs into ``out`` that were killed: each ``.NAME.partial-PID`` whose marker
    proves it ours and whose process is gone is removed; one that holds the previous output (a
    run killed between moving it aside and moving the new one in) gives it back first."""
    prefix = f".{out.name}.partial-"
    try:
        names = [e.name for e in os.scandir(out.parent)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix) :] if name.startswith(prefix) else ""
        if not pid.isdigit() or _alive(int(pid)):
            continue
        _remove_if_ours(out.parent / name, out, int(pid))


def _remove_if_ours(workspace: Path, out: Path, pid: int) -> None:
    if not _is_ours(workspace, out, pid):
        return
    previous = workspace / PREVIOUS_NAME
    if previous.is_dir() and not os.path.lexists(out):
        with contextlib.suppress(OSError):
            rename_noreplace(previous, out)
    remove_tree(workspace)


def _is_ours(workspace: Path, out: Path, pid: int) -> bool:
    """A real directory (not a link) holding a regular marker file that names ``out`` and
    ``pid``."""
    try:
        if not stat.S_ISDIR(os.lstat(workspace).st_mode):
            return False
        marker = workspace / MARKER_NAME
        if not stat.S_ISREG(os.lstat(marker).st_mode) or marker.stat().st_size > 4096:
            return False
        content = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content == {"output": out.name, "pid": pid}


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_tree(path: Path) -> None:
    """Remove a directory tree of ours, without being cut short by a second Ctrl-C."""
    with uninterruptible():
        shutil.rmtree(path, ignore_errors=True)
    _LIVE.discard(path)


def live_workspaces() -> list[Path]:
    """The temporary directories this process created and has not removed yet."""
    return list(_LIVE)


def remove_live_workspaces() -> None:
    """Remove every temporary directory this process still has: run when a command ends, so
    that a Ctrl-C landing where no handler of the writer can catch it (between two calls, as a
    ``with`` block is left) leaves nothing behind either."""
    for workspace in live_workspaces():
        remove_tree(workspace)


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM for the block (cleanup that must finish once begun: the process
    is already exiting, or the output is already in place). Only the main thread can set
    handlers, and only it runs them; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler is not None:
            signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for a short block (creating a directory and its marker) and raise
    KeyboardInterrupt after it if one came, so the block is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler not in (None, signal.SIG_IGN):
            signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler not in (None, signal.SIG_IGN):
                signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


# --- the atomic step ------------------------------------------------------------------------------


def _renameat2(source: Path, target: Path, flags: int) -> None:
    """``renameat2(2)``; raises OSError (ENOSYS or EINVAL where it is unsupported)."""
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    result = function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def _unsupported(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename ``source`` onto ``target`` only if ``target`` does not exist, atomically.

    Where renameat2 is missing, ``mkdir`` claims the name (atomic too: it fails if the name
    exists) and a plain rename then replaces that empty directory. Raises FileExistsError.
    """
    try:
        _renameat2(source, target, _RENAME_NOREPLACE)
        return
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        if not _unsupported(exc):
            raise
    os.mkdir(target)  # raises FileExistsError when another run got there first
    os.rename(source, target)


def move_into_place(
    workspace: Path,
    out: Path,
    overwrite: bool,
    flag: str = "--out",
    replaceable: Callable[[Path], None] | None = None,
) -> None:
    """Make ``workspace/output`` the output ``out`` in one step; a replaced output (with
    ``overwrite``) ends up inside the workspace, which the caller then removes.

    ``replaceable(out)`` raises if what is at ``out`` now may not be replaced: checked again here,
    since something else may have appeared there while the output was built."""
    payload = workspace / PAYLOAD_NAME
    while True:
        try:
            rename_noreplace(payload, out)
            return
        except FileExistsError:
            if not overwrite:
                raise OutputExistsError(
                    f"{out}: output appeared while this merge ran (another run?); nothing was "
                    f"written: pass --overwrite or choose another {flag}"
                ) from None
        if not out.is_dir() or out.is_symlink():
            raise ParameterError(f"{flag} {out} is not a directory; --overwrite replaces only one")
        if replaceable is not None:
            replaceable(out)
        try:
            _renameat2(payload, out, _RENAME_EXCHANGE)
            return
        except FileNotFoundError:
            continue  # the old output went away meanwhile: try the plain rename again
        except OSError as exc:
            if not _unsupported(exc):
                raise
        # No exchange here: move the old output into the workspace, then the new one in. A run
        # killed in between leaves the old one in the workspace, and the next run restores it.
        try:
            os.rename(out, workspace / PREVIOUS_NAME)
        except FileNotFoundError:
            continue
