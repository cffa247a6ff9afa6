"""How tensors travel between the shards on disk and the device that merges them (the driver's
I/O side).

``HostTransport`` (CPU merges): a tensor is read straight from disk into a reused buffer
(O_DIRECT), or in place from its memory-mapped shard when it is in the page cache already (no
copy), and its result, merged into one of a few reused buffers, is written back whole.
``StagedTransport`` (GPU merges): bytes move through a few fixed pinned staging buffers, chunk by
chunk, on their own CUDA streams, so host memory stays bounded by the staging buffers whatever the
tensor size (a 128256×8192 lm_head passes through 256 MB of staging), uploads overlap the
previous tensor's compute and downloads overlap the next one's. On CPU tensors the staged path
runs the same chunking without pinning or streams (tests use it).
"""

from __future__ import annotations

import contextlib
import math
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import ParameterError
from ..io.directio import PAGE, direct_io_enabled, page_offset
from ..io.reader import DIRECT_SLACK, Checkpoint, TensorInfo
from ..io.writer import CheckpointWriter, checksum

DEFAULT_STAGING_BYTES = 256 * 2**20
#: Read ahead up to this many output buffers' worth of later tensors (into the page cache).
BUFFERS_AHEAD = 6


class HostTransport:
    """Whole tensors in host memory (the CPU path), moved as little as possible.

    On CPU, inputs are zero-copy views of the shards' mappings (released by :meth:`release`
    once merged) and results are written into two reused output buffers, so a tensor costs no
    copy in and no fresh allocation out.

    With ``direct`` (the default where the file system allows it, :func:`make_transport`), a
    tensor not in the page cache is read with O_DIRECT into one of a few reused input buffers
    (the two tensors of a pair at once, on threads of their own): the page cache is neither
    filled nor reclaimed, and the merge never touches memory new to the CPU. The driver then
    loads the next pair only, which the budget counts.

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
        #: (:meth:`~fusion_kernels.io.reader.Checkpoint.read_direct`).
        self.direct = direct
        #: Bytes of later tasks the driver may load ahead: the page cache holds them, but a
        #: direct read holds its buffers, so then only the next task is loaded ahead.
        self.read_ahead_bytes = 0 if direct else max(keep_bytes * BUFFERS_AHEAD, 1)
        self._outputs: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)] * outputs
        self._next_output = 0
        self._unmapped: dict[int, tuple[Checkpoint, str]] = {}
        self._inputs = _InputBuffers(keep_bytes)
        # A pair's two direct reads run at once, each on its own thread.
        self._read_threads = ThreadPoolExecutor(2, "fk-direct")
        self._reads: dict[tuple[int, str], Future] = {}

    def prefetch(self, ckpt: Checkpoint, info: TensorInfo) -> None:
        """Queue the reads of a tensor about to be loaded, all at once, so that the disk reads
        both tensors of a pair in parallel (as deep a queue as a copy's): a direct read starts
        on a thread of its own, else read-ahead into the page cache."""
        if self.device.type != "cpu":
            return
        if self.direct and hasattr(ckpt, "read_direct"):
            key = (id(ckpt), info.name)
            self._reads[key] = self._read_threads.submit(self._read_direct, ckpt, info)
        elif hasattr(ckpt, "prefetch"):
            ckpt.prefetch(info.name)

    def _read_direct(self, ckpt: Checkpoint, info: TensorInfo) -> torch.Tensor | None:
        """The tensor read direct into one of the input buffers, or None (see
        :meth:`~fusion_kernels.io.reader.Checkpoint.read_direct`)."""
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
        if self.direct and hasattr(ckpt, "read_direct"):
            pending = self._reads.pop((id(ckpt), info.name), None)
            tensor = pending.result() if pending else self._read_direct(ckpt, info)
            if tensor is not None:
                return tensor
        if not hasattr(ckpt, "warm") or not ckpt.mappable(info.name):
            return ckpt.view(info.name)
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
        if not _reusable(capacity, needed, self.keep_bytes + PAGE):
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

    def computed(self):
        """No event: CPU work is complete when it returns."""
        return None

    def store(
        self, writer: CheckpointWriter, name: str, tensor: torch.Tensor, want_crc: bool, after=None
    ):
        host = tensor.cpu()
        writer.write(name, host)
        return checksum(host) if want_crc else None


def _reusable(capacity: int, needed: int, share: int) -> bool:
    """Whether a buffer of ``capacity`` bytes serves a request for ``needed``: it is large
    enough, and either within ``share`` (the budget's share with its alignment slack: kept
    whatever comes next, as the budget counts it anyway) or at most twice the size asked for
    (a larger one would stay resident through small tensors)."""
    return needed <= capacity <= max(2 * needed, share)


class _InputBuffers:
    """The buffers direct reads land in: taken by a load (on a reader thread), held while the
    tensor is in use, given back by its release (on the merging or the writer thread).

    A free buffer is reused when it is large enough and not much larger (as the outputs are).
    Buffers handed out and kept free number :attr:`IN_FLIGHT` at most (two pairs: the one
    merged and the next), more only while more are handed out at once (copies waiting for the
    writer).
    """

    IN_FLIGHT = 4

    def __init__(self, keep_bytes: int):
        self.keep_bytes = keep_bytes
        self._free: list[torch.Tensor] = []  # smallest first
        self._held: dict[tuple[int, str], torch.Tensor] = {}
        self._out = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            self._out += 1
            for index, buffer in enumerate(self._free):
                if _reusable(buffer.numel(), nbytes, self.keep_bytes + DIRECT_SLACK):
                    return self._free.pop(index)
            # None fits: free the smallest to make room for a new one.
            del self._free[: max(len(self._free) + self._out - self.IN_FLIGHT, 0)]
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._out -= 1
            self._free.append(buffer)
            self._free.sort(key=torch.Tensor.numel)
            # The largest stay: a large tensor can reuse them, a small one too.
            del self._free[: max(len(self._free) + self._out - self.IN_FLIGHT, 0)]

    def hold(self, key: tuple[int, str], buffer: torch.Tensor) -> None:
        with self._lock:
            self._held[key] = buffer

    def release(self, key: tuple[int, str]) -> bool:
        """Give back the buffer held for ``key``; False when there is none."""
        with self._lock:
            buffer = self._held.pop(key, None)
        if buffer is None:
            return False
        self.give(buffer)
        return True


def _device_guard(device: torch.device):
    """Make ``device`` current for the block (a no-op off CUDA): the reader and writer threads
    start on device 0, and CUDA allocations, streams and events follow the current device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _record(stream) -> object:
    """A fresh event recorded on ``stream`` (None without a stream).

    Fresh, because an event re-recorded before a waiter reads it makes the waiter wait for the
    later copy too. Blocking, so the host thread that synchronizes on it sleeps instead of
    spinning a core.
    """
    if stream is None:
        return None
    event = torch.cuda.Event(blocking=True)
    event.record(stream)
    return event


class _Staging:
    """A ring of staging buffers, each with the event of the last copy that used it, and the copy
    stream, created on ``device``."""

    def __init__(self, count: int, nbytes: int, device: torch.device):
        cuda = device.type == "cuda"
        try:
            self.buffers = [
                torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(count)
            ]
        except RuntimeError as exc:
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ParameterError(
                f"--staging-size: cannot allocate {count} staging buffers of {nbytes} bytes "
                f"({problem}); choose a smaller size"
            ) from None
        self.events: list[object] = [None] * count
        self.stream = torch.cuda.Stream(device=device) if cuda else None
        self.next = 0

    def take(self) -> tuple[int, torch.Tensor]:
        """The next buffer (and its index), once the copy that last used it has finished."""
        index = self.next
        self.next = (index + 1) % len(self.buffers)
        if self.events[index] is not None:
            self.events[index].synchronize()
        return index, self.buffers[index]

    def copied(self, index: int) -> object:
        """Mark the copy just enqueued on the stream as buffer ``index``'s last use."""
        self.events[index] = _record(self.stream)
        return self.events[index]


class StagedTransport:
    """Chunked copies through pinned staging buffers on dedicated copy streams.

    Stream semantics on CUDA: an upload's target is allocated on the upload stream (so the
    allocator never hands it memory the compute stream may still be reading) and, once
    :meth:`ready` hands it to the compute stream, is recorded as used there (so its memory is not
    reused before the compute is done). A download waits for the compute's event and copies on
    the download stream, contiguous copy included.

    Args:
        device: where tensors are merged.
        staging_bytes: size of each staging buffer (two for uploads, two for downloads).
    """

    def __init__(self, device: torch.device, staging_bytes: int = DEFAULT_STAGING_BYTES):
        self.device = device
        self.chunk = staging_bytes
        #: Only the next task is loaded ahead: its upload holds device memory.
        self.read_ahead_bytes = 0
        with _device_guard(device):
            self.uploads = _Staging(2, staging_bytes, device)
            # A page more, so each download can sit at its file offset's place within a page.
            self.downloads = _Staging(2, staging_bytes + PAGE, device)
        self._loaded: dict[int, object] = {}

    def load(self, ckpt: Checkpoint, info: TensorInfo) -> torch.Tensor:
        """Allocate the tensor on the device and enqueue its upload; :meth:`ready` waits for it."""
        stream = self.uploads.stream
        with _device_guard(self.device), _on(stream):
            target = torch.empty(info.nbytes, dtype=torch.uint8, device=self.device)
            for offset in range(0, info.nbytes, self.chunk):
                length = min(self.chunk, info.nbytes - offset)
                index, buffer = self.uploads.take()
                ckpt.read_into(info.name, offset, buffer[:length].numpy())
                target[offset : offset + length].copy_(buffer[:length], non_blocking=True)
                self.uploads.copied(index)
            done = _record(stream)
        tensor = target.view(info.torch_dtype).reshape(info.shape)
        if done is not None:
            self._loaded[id(tensor)] = done
        return tensor

    def prefetch(self, ckpt: Checkpoint, info: TensorInfo) -> None:
        """Nothing ahead of the load: it reads through staging in order."""

    def close(self) -> None:
        """Nothing to stop."""

    def release(self, ckpt: Checkpoint, info: TensorInfo) -> None:
        """Nothing to release: loads went through staging, which released the pages."""

    def output(self, shape: torch.Size, dtype: torch.dtype, position: int = 0) -> None:
        """None: the merge allocates its result on the device."""
        return None

    def ready(self, tensor: torch.Tensor) -> None:
        """Make the compute stream wait for ``tensor``'s upload (a no-op on CPU); call it on the
        thread that computes, before the compute."""
        event = self._loaded.pop(id(tensor), None)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            # Allocated on the upload stream, used on this one: keep the memory until it is done.
            tensor.record_stream(compute)

    def computed(self):
        """An event marking the work enqueued so far on this thread's stream (call it right after
        launching a tensor's merge, on the launching thread), or None on CPU."""
        if self.device.type != "cuda":
            return None
        return _record(torch.cuda.current_stream(self.device))

    def store(
        self, writer: CheckpointWriter, name: str, tensor: torch.Tensor, want_crc: bool, after=None
    ):
        """Download ``tensor`` chunk by chunk (once ``after`` has happened) and write each chunk
        at its offset; the copy of chunk k+1 overlaps the write of chunk k."""
        if tensor.numel() == 0:
            writer.write(name, tensor.cpu())
            return 0 if want_crc else None
        stream = self.downloads.stream
        crc, pending = 0, None
        position = writer.position(name)
        with _device_guard(self.device), _on(stream):
            if after is not None:
                stream.wait_event(after)
            # Any contiguous copy runs here too, after the compute and before the downloads.
            source = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            for offset in range(0, source.numel(), self.chunk):
                length = min(self.chunk, source.numel() - offset)
                index, buffer = self.downloads.take()
                # Where the chunk's whole pages can be written straight to disk (directio.py).
                shift = (page_offset(position + offset) - buffer.data_ptr()) % PAGE
                target = buffer[shift : shift + length]
                target.copy_(source[offset : offset + length], non_blocking=True)
                event = self.downloads.copied(index)
                if pending is not None:
                    crc = self._write_chunk(writer, name, *pending, crc, want_crc)
                pending = (offset, target, event)
            crc = self._write_chunk(writer, name, *pending, crc, want_crc)
        return crc if want_crc else None

    @staticmethod
    def _write_chunk(writer, name, offset, buffer, event, crc, want_crc) -> int:
        if event is not None:
            event.synchronize()
        chunk = buffer.numpy()
        writer.write_range(name, offset, chunk)
        return zlib.crc32(chunk, crc) if want_crc else crc


class _on:
    """``torch.cuda.stream(stream)`` when there is a stream, else nothing."""

    def __init__(self, stream):
        self.context = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self):
        if self.context is not None:
            self.context.__enter__()

    def __exit__(self, *exc):
        if self.context is not None:
            self.context.__exit__(*exc)
        return False


def parse_device(text: str | torch.device) -> torch.device:
    """The device a merge runs on: ``cpu``, ``cuda`` or ``cuda:N``, checked to exist here."""
    usage = "use cpu, cuda or cuda:N"
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ParameterError(f"--device {text!r} is not a device; {usage}") from None
    if device.type not in ("cpu", "cuda"):
        raise ParameterError(f"--device {text!r} is not supported; {usage}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ParameterError(f"--device {text!r}: no CUDA device here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ParameterError(
                f"--device {text!r}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
    return device


def make_transport(device: torch.device, staging_bytes: int | None, budget: int | None = None):
    """Staged for CUDA (or when a staging size is given), whole tensors otherwise.

    ``budget``: the memory budget in bytes. The staging buffers (four) default to a quarter of
    it, at most :data:`DEFAULT_STAGING_BYTES`; the host path keeps buffers of up to a sixth of
    it (see :mod:`fusion_kernels.streaming.chunks`): with direct reads
    (``FUSION_KERNELS_DIRECT_IO=0`` turns them off) four inputs and two outputs, else three outputs.
    """
    if device.type == "cuda" or staging_bytes is not None:
        return StagedTransport(device, staging_bytes or staging_size(budget))
    keep = 0 if budget is None else budget // 6
    if direct_io_enabled():
        # The next pair is read into buffers of this process: two outputs fill the six.
        return HostTransport(device, keep, outputs=2, direct=True)
    # Three outputs: the next pair is read ahead into the page cache, not into this process,
    # so a third result may wait for the writer in its place.
    return HostTransport(device, keep, outputs=3)


def staging_size(budget: int | None) -> int:
    """Each staging buffer's default size: the four of them hold the budget's tensor data at
    most (a page at least, :data:`DEFAULT_STAGING_BYTES` at most)."""
    if budget is None:
        return DEFAULT_STAGING_BYTES
    return max(min(DEFAULT_STAGING_BYTES, budget // 4), PAGE)
