"""The CPU path: whole tensors in host memory, moved as little as possible.

A tensor is read straight from disk into a reused buffer (O_DIRECT), or in place from its
memory-mapped shard when it is in the page cache already (no copy), and its result, merged into
one of a few reused buffers, is written back whole.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..io.checkpoint import Checkpoint, TensorInfo
from ..io.directio import PAGE, page_offset
from ..io.writer import CheckpointWriter, checksum
from .buffers import InputBuffers, reusable
from .transport import Transport

#: Read ahead up to this many output buffers' worth of later tensors (into the page cache).
BUFFERS_AHEAD = 6


class HostTransport(Transport):
    """Whole tensors in host memory (the CPU path), moved as little as possible.

    On CPU, inputs are zero-copy views of the shards' mappings (released by :meth:`release`
    once merged) and results are written into two reused output buffers, so a tensor costs no
    copy in and no fresh allocation out.

    With ``direct`` (the default where the file system allows it, :func:`make_transport`), a
    tensor not in the page cache is read with O_DIRECT into one of a few reused input buffers
    (the two tensors of a pair at once, on threads of their own): the page cache is neither
    filled nor reclaimed, and the merge never touches memory new to the CPU. The driver then
    loads the next pair only, which the budget counts. A tensor found in the page cache is
    mapped in place instead (no copy), and holds one of the input buffers' places meanwhile
    (:class:`~fusion_kernels.streaming.buffers.InputBuffers`), so what is mapped in place and
    what sits in buffers stays within the budget's count together, warm inputs or cold.

    Otherwise a load (on the reader thread) reads the tensor from disk into the page cache
    only, and :meth:`ready` (on the merging thread, once the tensor before it is released) maps
    it in, which costs a few milliseconds from the cache: tensors read ahead are not in this
    process's memory, so the driver may read ahead up to :attr:`read_ahead_bytes` and keep the
    disk busy while the merge and the writes run.
    """

    def __init__(
        self, device: torch.device, keep_bytes: int = 0, outputs: int = 2, direct: bool = False
    ):
        self.device = device
        self.keep_bytes = keep_bytes
        #: Output buffers in the ring: up to ``outputs - 1`` results may wait for the writer.
        self.outputs = outputs
        #: Read tensors with O_DIRECT into reused buffers where the checkpoint can
        #: (:meth:`~fusion_kernels.io.checkpoint.Checkpoint.read_direct`).
        self.direct = direct
        #: Bytes of later tasks the driver may load ahead: the page cache holds them, but a
        #: direct read holds its buffers, so then only the next task is loaded ahead.
        self.read_ahead_bytes = 0 if direct else max(keep_bytes * BUFFERS_AHEAD, 1)
        self._outputs: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)] * outputs
        self._next_output = 0
        self._unmapped: dict[int, tuple[Checkpoint, str]] = {}
        self._inputs = InputBuffers(keep_bytes)
        # A pair's two direct reads run at once, each on its own thread.
        self._read_threads = ThreadPoolExecutor(2, "fk-direct")
        self._reads: dict[tuple[int, str], Future] = {}

    #: Tensors over the memory budget stream in chunks through the output buffers.
    streams_chunks = True

    def prefetch(self, ckpt: Checkpoint, info: TensorInfo) -> None:
        """Queue the reads of a tensor about to be loaded, all at once, so that the disk reads
        both tensors of a pair in parallel (as deep a queue as a copy's): a direct read starts
        on a thread of its own, else read-ahead into the page cache."""
        if self.device.type != "cpu":
            return
        if self._reads_direct(ckpt, info):
            key = (id(ckpt), info.name)
            self._reads[key] = self._read_threads.submit(self._read_direct, ckpt, info)
        else:
            ckpt.prefetch(info.name)

    def _reads_direct(self, ckpt: Checkpoint, info: TensorInfo) -> bool:
        """Whether a load tries a direct read first."""
        return self.direct and ckpt.direct_bytes(info.name) is not None

    def _read_direct(self, ckpt: Checkpoint, info: TensorInfo) -> torch.Tensor | None:
        """The tensor read direct into one of the input buffers, or None (see
        :meth:`~fusion_kernels.io.checkpoint.Checkpoint.read_direct`)."""
        buffer = self._inputs.take(ckpt.direct_bytes(info.name))
        try:
            tensor = ckpt.read_direct(info.name, buffer)
        except BaseException:
            self._inputs.give(buffer)
            raise
        if tensor is None:
            self._inputs.give(buffer)
        else:
            self._inputs.hold((id(ckpt), info.name), buffer)
        return tensor

    def close(self) -> None:
        """Stop the direct-read threads (after the last load)."""
        self._read_threads.shutdown(wait=True)

    def load(self, ckpt: Checkpoint, info: TensorInfo) -> torch.Tensor:
        """The tensor: read direct into an input buffer, or into the page cache but not
        mapped in (see :meth:`ready`)."""
        if self.device.type != "cpu":
            return ckpt.read(info.name).to(self.device)
        if self._reads_direct(ckpt, info):
            pending = self._reads.pop((id(ckpt), info.name), None)
            tensor = pending.result() if pending else self._read_direct(ckpt, info)
            if tensor is not None:
                return tensor
        if not ckpt.mappable(info.name):
            return ckpt.view(info.name)
        if self.direct:
            # Mapped in place, it takes the place of the buffer it would have been read into.
            self._inputs.hold((id(ckpt), info.name), None)
        ckpt.warm(info.name)
        tensor = ckpt.view(info.name, populate=False)
        self._unmapped[id(tensor)] = (ckpt, info.name)
        return tensor

    def release(self, ckpt: Checkpoint, info: TensorInfo) -> None:
        """The loaded tensor is no longer needed: its buffer may be reused, or its pages are
        dropped from this process."""
        if self.device.type == "cpu" and not self._inputs.release((id(ckpt), info.name)):
            ckpt.release(info.name)

    def output(
        self, shape: torch.Size, dtype: torch.dtype, position: int = 0
    ) -> torch.Tensor | None:
        """A tensor to merge into, from the ring of :attr:`outputs` buffers (None off the CPU).

        Each call hands out the buffer that the call ``outputs`` calls ago did, so the caller
        must have finished storing that result first: the driver stores earlier results while
        it computes the next. A buffer is reused whenever it is large enough, so its pages
        stay mapped (faulting fresh pages in costs more than the merge's writes to them): one
        within the memory budget's share (``keep_bytes``, and the page of slack for the
        alignment below) is kept whatever comes next, as the budget counts it anyway; only one
        larger than that and more than twice the size asked for is replaced, so a tensor over
        the budget does not stay resident through small ones. The tensor starts at the same
        offset within a page as ``position``, where it goes in its output file, so the writer
        can send its whole pages straight to disk (directio.py).
        """
        if self.device.type != "cpu":
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        needed = nbytes + PAGE
        index = self._next_output
        self._next_output = (index + 1) % self.outputs
        capacity = self._outputs[index].numel()
        if not reusable(capacity, needed, self.keep_bytes + PAGE):
            # Free the old buffer before allocating its successor, not after.
            self._outputs[index] = torch.empty(0, dtype=torch.uint8)
            self._outputs[index] = torch.empty(needed, dtype=torch.uint8)
        buffer = self._outputs[index]
        start = (page_offset(position) - buffer.data_ptr()) % PAGE
        # A view as ``dtype`` must start at a multiple of its width.
        start = start if start % dtype.itemsize == 0 else 0
        return buffer[start : start + nbytes].view(dtype).view(shape)

    def ready(self, tensor: torch.Tensor) -> None:
        """Map a loaded tensor's pages in, from the page cache (call it on the merging thread,
        before the merge), so the merge does not fault them in page by page."""
        ckpt, name = self._unmapped.pop(id(tensor), (None, None))
        if ckpt is not None:
            ckpt.populate(name)

    def store(
        self, writer: CheckpointWriter, name: str, tensor: torch.Tensor, want_crc: bool, after=None
    ) -> int | None:
        """Write a result whole (CPU work is complete when it returns: no event to wait for)."""
        host = tensor.cpu()
        writer.write(name, host)
        return checksum(host) if want_crc else None
