"""Output files written at offsets, whole pages straight from memory to disk where possible.

Writing through the page cache costs more CPU than the merge itself: every page of the output
is allocated and filled in the cache, then flushed again by ``fsync``. With ``O_DIRECT`` the
disk reads the pages from our buffer instead. That needs the memory address, the file offset
and the length to be multiples of the page size, so a range is split: its whole pages, when
they lie at the same offset within a page in memory as in the file, go direct; the partial
first and last pages (shared with the neighbouring tensors or the header) go through the page
cache. Every page of the file is written one way only, so the two never see each other's data
half-written, and ``fsync`` makes both durable.

The CPU path allocates its output buffers so that results land at the right offset within a
page (:func:`page_offset`). Filesystems without ``O_DIRECT`` (and ``FUSION_KERNELS_DIRECT_IO=0``)
get buffered writes throughout.

Inputs are read the same way (:func:`pread_direct`): a tensor's whole pages straight into a
buffer the merge reuses, so the page cache is neither filled nor scanned to make room, and the
CPU does not touch memory new to it (under some hypervisors the first touch of a page the disk
just filled costs microseconds: seconds for a model).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from pathlib import Path

import numpy as np

log = logging.getLogger("fusion_kernels")

#: Alignment of direct writes: memory address, file offset and length.
PAGE = mmap.PAGESIZE
ENV_DIRECT_IO = "FUSION_KERNELS_DIRECT_IO"


def page_offset(position: int) -> int:
    """Where within a page data must start in memory to be written direct at ``position``."""
    return position % PAGE


class OffsetFile:
    """A new file (truncated if it exists) written with :meth:`write_at`.

    ``direct_bytes`` counts the bytes that bypassed the page cache.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct_fd = _open_direct(path)
        self.direct_bytes = 0

    def write_at(self, data: np.ndarray, position: int) -> None:
        """Write a contiguous uint8 array at ``position``."""
        view = memoryview(data).cast("B")
        start, stop = self._direct_span(data.ctypes.data, position, len(view))
        if start < stop and self._write_direct(view[start:stop], position + start):
            _pwrite_all(self.fd, view[:start], position)
            _pwrite_all(self.fd, view[stop:], position + stop)
        else:
            _pwrite_all(self.fd, view, position)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def close(self, sync: bool = True) -> None:
        """Close the file, after ``fsync`` (direct writes included) when ``sync``."""
        if self.fd < 0:
            return
        try:
            if sync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
            self._close_direct()

    def _direct_span(self, address: int, position: int, length: int) -> tuple[int, int]:
        """The range ``[start, stop)`` of the data to write direct (empty when none)."""
        if self.direct_fd < 0 or (address - position) % PAGE:
            return 0, 0
        start = -position % PAGE
        whole_pages = max(length - start, 0) // PAGE
        return start, start + whole_pages * PAGE

    def _write_direct(self, view: memoryview, position: int) -> bool:
        """Write page-aligned data direct; False (and buffered writes from now on) when the
        filesystem refuses it."""
        try:
            _pwrite_all(self.direct_fd, view, position)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.debug(
                "%s: direct writes refused (%s); writing through the page cache", self.path, exc
            )
            self._close_direct()
            return False
        self.direct_bytes += len(view)
        return True

    def _close_direct(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1


def direct_io_enabled() -> bool:
    """Whether direct I/O may be tried (``FUSION_KERNELS_DIRECT_IO=0`` turns it off)."""
    return bool(getattr(os, "O_DIRECT", 0)) and os.environ.get(ENV_DIRECT_IO, "1") != "0"


def open_direct_reader(fd: int) -> int:
    """A descriptor of the file open as ``fd`` (the same file, even if its path has been
    replaced since), for reading with O_DIRECT; -1 where direct reads are off or refused."""
    return _open_direct(Path(f"/proc/self/fd/{fd}"), os.O_RDONLY)


def pread_direct(fd: int, target: np.ndarray, position: int) -> int:
    """Read into ``target`` (uint8, page-aligned address and length) from ``position`` (a
    multiple of the page size) with a direct descriptor; returns the bytes read, fewer only at
    the end of the file."""
    view = memoryview(target).cast("B")
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], position + done)
        if count == 0:
            break
        done += count
        if done % PAGE:  # the end of the file
            break
    return done


def _open_direct(path: Path, access: int = os.O_WRONLY) -> int:
    """A second descriptor of ``path`` with O_DIRECT (``access``: its read/write mode), or -1
    where there is none."""
    if not direct_io_enabled():
        return -1
    try:
        return os.open(path, access | os.O_DIRECT)
    except OSError:
        return -1


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
