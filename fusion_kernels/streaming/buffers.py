"""The reused buffers of the host path: when a buffer serves a request, and the buffers direct
reads land in, whose number stays bounded by the memory budget's count.
"""

from __future__ import annotations

import threading

import torch

from ..io.checkpoint import DIRECT_SLACK


def reusable(capacity: int, needed: int, share: int) -> bool:
    """Whether a buffer of ``capacity`` bytes serves a request for ``needed``: it is large
    enough, and either within ``share`` (the budget's share with its alignment slack: kept
    whatever comes next, as the budget counts it anyway) or at most twice the size asked for
    (a larger one would stay resident through small tensors)."""
    return needed <= capacity <= max(2 * needed, share)


class InputBuffers:
    """The buffers direct reads land in: taken by a load (on a reader thread), held while the
    tensor is in use, given back by its release (on the merging or the writer thread).

    A free buffer is reused when it is large enough and not much larger (as the outputs are).
    Buffers handed out and kept free number :attr:`IN_FLIGHT` at most (two pairs: the one
    merged and the next), more only while more are handed out at once (copies waiting for the
    writer). A tensor mapped in place instead (it was in the page cache) counts as a buffer
    handed out: its pages are in this process as a buffer's would be.
    """

    IN_FLIGHT = 4

    def __init__(self, keep_bytes: int):
        self.keep_bytes = keep_bytes
        self._free: list[torch.Tensor] = []  # smallest first
        # None: a tensor mapped in place holds the place.
        self._held: dict[tuple[int, str], torch.Tensor | None] = {}
        self._out = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            self._out += 1
            for index, buffer in enumerate(self._free):
                if reusable(buffer.numel(), nbytes, self.keep_bytes + DIRECT_SLACK):
                    return self._free.pop(index)
            # None fits: free the smallest to make room for a new one.
            self._trim()
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._out -= 1
            self._free.append(buffer)
            self._free.sort(key=torch.Tensor.numel)
            self._trim()

    def _trim(self) -> None:
        """Free the smallest free buffers beyond the count (the largest stay: a large tensor
        can reuse them, a small one too); call it holding the lock."""
        del self._free[: max(len(self._free) + self._out - self.IN_FLIGHT, 0)]

    def hold(self, key: tuple[int, str], buffer: torch.Tensor | None) -> None:
        """Hold ``buffer`` (from :meth:`take`) for the tensor ``key`` until :meth:`release`;
        None: the tensor is mapped in place, and takes a buffer's place meanwhile."""
        with self._lock:
            self._held[key] = buffer
            if buffer is None:
                self._out += 1
                self._trim()

    def release(self, key: tuple[int, str]) -> bool:
        """Give back the place held for ``key``: True when a buffer held the tensor; False
        when it is mapped in place (its pages are the caller's to drop) or nothing was held."""
        with self._lock:
            if key not in self._held:
                return False
            buffer = self._held.pop(key)
            if buffer is None:
                self._out -= 1
                return False
        self.give(buffer)
        return True

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers kept, free and held."""
        with self._lock:
            held = [b for b in self._held.values() if b is not None]
            return sum(b.numel() for b in [*self._free, *held])
