"""``--verify``'s read-back: a stored tensor's crc32 within a bounded amount of memory."""

from __future__ import annotations

import mmap
import zlib

import numpy as np

from .checkpoint import Checkpoint

#: The most bytes ``--verify`` reads back at a time: its buffer and the pages mapped to fill it
#: both count, and larger reads are no faster.
VERIFY_CHUNK_BYTES = 16 * 2**20


def stored_checksum(checkpoint: Checkpoint, name: str, chunk_bytes: int) -> int:
    """:func:`~.writer.checksum` of a stored tensor, read into one buffer of ``chunk_bytes``
    (a page at least, at most VERIFY_CHUNK_BYTES), releasing the pages read: memory stays at one
    chunk however large the tensor."""
    nbytes = checkpoint.info(name).nbytes
    chunk = min(max(chunk_bytes, mmap.PAGESIZE), VERIFY_CHUNK_BYTES)
    buffer = np.empty(max(1, min(chunk, nbytes)), dtype=np.uint8)
    crc = 0
    for offset in range(0, nbytes, len(buffer)):
        part = buffer[: min(len(buffer), nbytes - offset)]
        checkpoint.read_into(name, offset, part)
        crc = zlib.crc32(part, crc)
    return crc
