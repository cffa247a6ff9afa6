"""Page-cache control for memory-mapped inputs: fault a range in, drop it, ask what is cached.

The readers map their files and hand out tensors that are views of the mapping; these helpers
decide when the pages of such a view are in this process (``populate``), read ahead into the page
cache only (``advise`` with ``MADV_WILLNEED``), or dropped from the process again while they stay
cached (``release``). madvise and mincore go through ctypes, which releases the GIL for the call:
``mmap.madvise`` holds it while the kernel reads from disk, stalling the merge and the writer.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

#: :meth:`~fusion_kernels.io.checkpoint.Checkpoint.warm` maps this much at a time while it reads
#: into the page cache.
WARM_SLICE = 16 * 2**20
# madvise(2) advice that Python's mmap module lacks: fault a range's pages in (Linux 5.14+).
_MADV_POPULATE_READ = 22 if sys.platform.startswith("linux") else None
# Python's mmap objects lack madvise where the platform has none (Windows).
_MMAP_MADVISE = hasattr(mmap.mmap, "madvise")


def _libc() -> ctypes.CDLL | None:
    """The C library's madvise and mincore, where there is a C library to call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.madvise.restype = ctypes.c_int
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        libc.mincore.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def advise(address: int, length: int, advice: int) -> bool:
    """madvise(2) the whole pages covering ``[address, address + length)`` of a mapping this
    process made, through ctypes (the GIL is released meanwhile); False where that failed or
    there is no C library to call."""
    if _LIBC is None or length <= 0:
        return False
    begin = address - address % mmap.PAGESIZE
    return _LIBC.madvise(ctypes.c_void_p(begin), address + length - begin, advice) == 0


def populate_range(address: int, length: int) -> None:
    """Fault a mapped range's pages in now (read-ahead where the kernel lacks
    MADV_POPULATE_READ), so the calling thread waits for the disk, not the merge."""
    if _MADV_POPULATE_READ is None or not advise(address, length, _MADV_POPULATE_READ):
        advise(address, length, mmap.MADV_WILLNEED)


def populate(address: int, mapped: mmap.mmap, start: int, length: int) -> None:
    """Map bytes ``[start, start + length)`` of ``mapped`` (at ``address``) in now, reading them
    from disk if needed, so that the thread that calls this does the faulting, not the merge
    that reads the view later."""
    if not _MMAP_MADVISE:
        return
    begin, span = whole_pages(mapped, start, length)
    advice = _MADV_POPULATE_READ
    populated = (
        advice is not None
        and _LIBC is not None
        and _LIBC.madvise(ctypes.c_void_p(address + begin), span, advice) == 0
    )
    if populated:
        return
    # Kernels before Linux 5.14 lack it (EINVAL); read-ahead is the next best thing.
    mapped.madvise(mmap.MADV_WILLNEED, begin, span)


def release(mapped: mmap.mmap, start: int, length: int) -> None:
    """Drop a read range's pages from this process (they stay in the page cache)."""
    if _MMAP_MADVISE:
        mapped.madvise(mmap.MADV_DONTNEED, *whole_pages(mapped, start, length))


def resident_share(address: int, mapped: mmap.mmap, start: int, length: int) -> float:
    """The share of a mapped byte range's pages in the page cache (0 where unknown)."""
    begin, span = whole_pages(mapped, start, length)
    vector = np.zeros(-(-span // mmap.PAGESIZE), dtype=np.uint8)
    if _LIBC is None or not vector.size:
        return 0.0
    pointer = ctypes.c_void_p(address + begin)
    if _LIBC.mincore(pointer, span, vector.ctypes.data_as(ctypes.c_void_p)) != 0:
        return 0.0
    return float(np.count_nonzero(vector & 1)) / vector.size


def whole_pages(mapped: mmap.mmap, start: int, length: int) -> tuple[int, int]:
    """(offset, length) of the whole pages covering a byte range, for madvise."""
    begin = start - start % mmap.PAGESIZE
    return begin, min(len(mapped) - begin, start + length - begin)
