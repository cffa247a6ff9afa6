"""The GPU path: bytes move through a few fixed pinned staging buffers, chunk by chunk, on their
own CUDA streams, so host memory stays bounded by the staging buffers whatever the tensor size (a
128256×8192 lm_head passes through 256 MB of staging), uploads overlap the previous tensor's
compute and downloads overlap the next one's. On CPU tensors the same chunking runs without
pinning or streams (tests use it).
"""

from __future__ import annotations

import contextlib
import zlib

import torch

from ..errors import ParameterError
from ..io.checkpoint import Checkpoint, TensorInfo
from ..io.directio import PAGE, page_offset
from ..io.writer import CheckpointWriter
from .transport import Transport

DEFAULT_STAGING_BYTES = 256 * 2**20


def staging_size(budget: int | None) -> int:
    """Each staging buffer's default size: the four of them hold the budget's tensor data at
    most (a page at least, :data:`DEFAULT_STAGING_BYTES` at most)."""
    if budget is None:
        return DEFAULT_STAGING_BYTES
    return max(min(DEFAULT_STAGING_BYTES, budget // 4), PAGE)


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


class StagedTransport(Transport):
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
        #: The merge allocates its results (:meth:`output` gives None): one waits for the
        #: writer while the next is computed.
        self.outputs = 2
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

    def ready(self, tensor: torch.Tensor) -> None:
        """Make the compute stream wait for ``tensor``'s upload (a no-op on CPU); call it on the
        thread that computes, before the compute."""
        event = self._loaded.pop(id(tensor), None)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            # Allocated on the upload stream, used on this one: keep the memory until it is done.
            tensor.record_stream(compute)

    def computed(self) -> object | None:
        """An event marking the work enqueued so far on this thread's stream (call it right after
        launching a tensor's merge, on the launching thread), or None on CPU."""
        if self.device.type != "cuda":
            return None
        return _record(torch.cuda.current_stream(self.device))

    def store(
        self, writer: CheckpointWriter, name: str, tensor: torch.Tensor, want_crc: bool, after=None
    ) -> int | None:
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
