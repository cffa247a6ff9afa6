"""How tensors travel between the shards on disk and the device that merges them: the one
interface the driver moves tensors through.

:class:`~fusion_kernels.streaming.host.HostTransport` serves CPU merges (whole tensors in host
memory, read direct into reused buffers or mapped in place);
:class:`~fusion_kernels.streaming.staged.StagedTransport` serves GPU merges (chunks through
pinned staging buffers on copy streams). :func:`make_transport` picks one.

The driver's calls, per task: :meth:`~Transport.prefetch` then :meth:`~Transport.load` for each
input (on the reader thread), :meth:`~Transport.ready` for each loaded tensor and
:meth:`~Transport.output` for the result buffer (on the merging thread, before the merge),
:meth:`~Transport.computed` right after launching it, :meth:`~Transport.release` once the inputs
are no longer read, :meth:`~Transport.store` (on the writer thread); :meth:`~Transport.close` after
the last load.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..io.checkpoint import Checkpoint, TensorInfo
from ..io.writer import CheckpointWriter


class Transport(ABC):
    """Moves tensors from checkpoints to :attr:`device` and results to the writer.

    Attributes every transport sets: ``device`` (where tensors are merged), ``outputs`` (output
    buffers in its ring: up to ``outputs - 1`` results may wait for the writer while the next is
    computed), ``read_ahead_bytes`` (bytes of later tasks the driver may load ahead; 0: only the
    next task) and ``streams_chunks`` (whether a tensor over the memory budget may stream through
    its output buffers in chunks, see :mod:`~fusion_kernels.streaming.chunks`).
    """

    device: torch.device
    outputs: int = 2
    read_ahead_bytes: int = 0
    streams_chunks: bool = False

    @abstractmethod
    def load(self, ckpt: Checkpoint, info: TensorInfo) -> torch.Tensor:
        """The tensor, on its way to the device (:meth:`ready` says when it is there)."""

    @abstractmethod
    def store(
        self, writer: CheckpointWriter, name: str, tensor: torch.Tensor, want_crc: bool, after=None
    ) -> int | None:
        """Write a result (once ``after``, an event from :meth:`computed`, has happened); its
        crc32 when ``want_crc``, else None."""

    def prefetch(self, ckpt: Checkpoint, info: TensorInfo) -> None:
        """Start the reads of a tensor about to be loaded. Default: none ahead of the load."""
        return None

    def ready(self, tensor: torch.Tensor) -> None:
        """Make a loaded tensor usable by the merge (call it on the merging thread, before the
        merge). Default: it is already."""
        return None

    def output(
        self, shape: torch.Size, dtype: torch.dtype, position: int = 0
    ) -> torch.Tensor | None:
        """A buffer to merge a result into, its place in the output file ``position``; None
        (the default): the merge allocates its result."""
        return None

    def computed(self) -> object | None:
        """An event marking the work launched so far on this thread (call it right after
        launching a merge); None (the default) where work is complete when it returns."""
        return None

    def release(self, ckpt: Checkpoint, info: TensorInfo) -> None:
        """A loaded tensor is no longer read: its memory may be reused. Default: nothing held."""
        return None

    def close(self) -> None:
        """Stop what the transport runs (after the last load). Default: nothing to stop."""
        return None
