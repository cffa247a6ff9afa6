"""Safetensors checkpoints: listed from their headers without reading data, read one tensor at a
time from the memory-mapped shards.

A checkpoint is a directory holding one ``.safetensors`` file, or shards named by
``model.safetensors.index.json``, or a single ``.safetensors`` file. Headers are parsed and checked
first (:mod:`.safetensors_header`); shards are memory-mapped. A tensor is either copied out on its
own (:meth:`SafetensorsCheckpoint.read`), handed out as a zero-copy view of the mapping
(:meth:`SafetensorsCheckpoint.view`) or read with O_DIRECT into a buffer the caller reuses
(:meth:`SafetensorsCheckpoint.read_direct`); either way its pages are released from the mapping once
used, so the process's resident memory holds the tensors in flight, not the shards it has read.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..dtypes import SAFETENSORS_DTYPES
from ..errors import CheckpointError
from . import faults, pagecache
from .checkpoint import Checkpoint, TensorInfo
from .directio import open_direct_reader, pread_direct
from .safeload import open_regular
from .safetensors_header import INDEX_NAME, read_header


class SafetensorsCheckpoint(Checkpoint):
    """A safetensors checkpoint: names, shapes and dtypes from headers; data read on demand.

    Args:
        path: a directory (one ``.safetensors`` file, or shards named by an index file)
            or a single ``.safetensors`` file.
        reference, roots: see :class:`~fusion_kernels.io.checkpoint.Checkpoint`.
    """

    index_name = INDEX_NAME

    def _open(self) -> None:
        """Parse each shard's header and list its tensors; shards are mapped when first read."""
        self.files = self._shard_files()
        #: Each shard's size when its header was read; a shard that shrinks later is refused
        #: before its mapping is touched (a read past a file's end kills the process: SIGBUS).
        self._sizes: dict[Path, int] = {}
        self._data_start: dict[Path, int] = {}
        for file in self.files:
            self._add(file)
        self._check_index()
        if not self.tensors:
            # A merge of nothing would succeed with an output holding no weights.
            raise CheckpointError(f"{self.path}: holds no tensors; point at a model checkpoint")
        self._maps: dict[Path, mmap.mmap] = {}
        self._handles: dict[Path, BinaryIO] = {}
        self._addresses: dict[Path, int] = {}
        #: Each mapped shard's O_DIRECT descriptor (-1: none), for :meth:`read_direct`.
        self._direct: dict[Path, int] = {}
        # Two reader threads may map the same shard first (a chunked tensor's and the
        # read-ahead): it must be mapped and watched once.
        self._mapping_lock = threading.Lock()

    def _add(self, file: Path) -> None:
        """One shard's header: its tensors, metadata, data offset and size."""
        tensors, metadata, self._data_start[file] = read_header(file)
        self._sizes[file] = self._data_start[file] + sum(t.nbytes for t in tensors.values())
        for name in tensors.keys() & self.tensors.keys():
            raise CheckpointError(
                f"{file}: tensor {name!r} also appears in {self.tensors[name].file}"
            )
        self.tensors.update(tensors)
        self.metadata = self.metadata or metadata

    def _shard_files(self) -> list[Path]:
        if not self.path.is_dir():
            if self.path.suffix != ".safetensors":
                raise CheckpointError(f"{self.path}: not a .safetensors file")
            return [self.path]
        index = self.path / INDEX_NAME
        if index.exists():
            return self._index_shards(index, ".safetensors")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{self.path}: no .safetensors checkpoint here (expected model.safetensors or "
                f"shards with {INDEX_NAME})"
            )
        if len(files) > 1:
            raise CheckpointError(
                f"{self.path}: {len(files)} .safetensors files but no {INDEX_NAME} to say "
                "which belong to the model"
            )
        return files

    def view(self, name: str, populate: bool = True) -> torch.Tensor:
        """One tensor as a view of the memory-mapped shard, with its pages mapped in now
        (``populate``; else as they are read, or by :meth:`populate`).

        No bytes are copied: the CPU merge reads straight from the page cache. The mapping is
        private, so writing to the view never reaches the file. Call :meth:`release` when done
        with it to drop its pages from this process (the view stays readable; it maps them
        again). A tensor whose bytes are not aligned to its dtype is copied instead.
        """
        info = self.tensors[name]
        if not self.mappable(name):
            return self.read(name)
        start = self._offset(info)
        try:
            mapped = self._mapping(info.file)
            if populate:
                pagecache.populate(self._addresses[info.file], mapped, start, info.nbytes)
            # Through numpy: its array holds the mapping's buffer export for as long as the
            # tensor lives, so the mapping cannot be closed under it (torch.frombuffer does not).
            raw = np.frombuffer(mapped, dtype=np.uint8, count=info.nbytes, offset=start)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({exc})") from None
        return torch.from_numpy(raw).view(info.torch_dtype).view(info.shape)

    def mappable(self, name: str) -> bool:
        """Whether :meth:`view` maps the tensor (its bytes are aligned to its dtype), rather
        than copying it."""
        info = self.tensors[name]
        start = self._offset(info)
        return info.nbytes > 0 and start % SAFETENSORS_DTYPES[info.dtype][1] == 0

    def _offset(self, info: TensorInfo) -> int:
        """Where a tensor's bytes start in its shard file."""
        return self._data_start[info.file] + info.begin

    def _whole_pages(self, info: TensorInfo) -> tuple[int, int]:
        """``(file offset, length)`` of the whole pages holding a tensor's bytes."""
        start = self._offset(info)
        first = start - start % mmap.PAGESIZE
        return first, -(-(start + info.nbytes - first) // mmap.PAGESIZE) * mmap.PAGESIZE

    def direct_bytes(self, name: str) -> int:
        """The buffer size :meth:`read_direct` needs for a tensor: its whole pages, plus a page
        of room to align the buffer (under :data:`DIRECT_SLACK` more than the tensor)."""
        return self._whole_pages(self.tensors[name])[1] + mmap.PAGESIZE

    def read_direct(self, name: str, buffer: torch.Tensor) -> torch.Tensor | None:
        """The tensor read from disk into ``buffer`` (uint8, :meth:`direct_bytes` long at least)
        with O_DIRECT, bypassing the page cache; a view of ``buffer``. None where the file
        system refuses direct reads, the tensor's bytes are not aligned to its dtype, or half
        of its pages or more are in the page cache already (reading them from there costs
        less than the disk): read it with :meth:`view` instead."""
        info = self.tensors[name]
        if not self.mappable(name):
            return None
        self._mapping(info.file)  # opens the shard and checks its size
        direct = self._direct.get(info.file, -1)
        start = self._offset(info)
        if direct < 0 or self._resident_share(info.file, start, info.nbytes) >= 0.5:
            return None
        first, length = self._whole_pages(info)
        shift = -buffer.data_ptr() % mmap.PAGESIZE
        try:
            count = pread_direct(direct, buffer[shift : shift + length].numpy(), first)
        except OSError as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({exc})") from None
        if count < start + info.nbytes - first:
            self._check_size(info.file)
            raise CheckpointError(f"{info.file}: tensor {name!r} ends past the end of the file")
        offset = shift + start - first
        raw = buffer[offset : offset + info.nbytes]
        return raw.view(info.torch_dtype).view(info.shape)

    def _resident_share(self, file: Path, start: int, length: int) -> float:
        """The share of a mapped byte range's pages in the page cache (0 where unknown)."""
        return pagecache.resident_share(self._addresses[file], self._maps[file], start, length)

    def populate(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Map bytes ``[begin, end)`` of a viewed tensor's pages in now, reading them from disk
        if needed; the GIL is released meanwhile, so other threads run."""
        info = self.tensors[name]
        mapped = self._maps.get(info.file)
        end = info.nbytes if end is None else end
        if mapped is not None and end > begin:
            start = self._offset(info) + begin
            pagecache.populate(self._addresses[info.file], mapped, start, end - begin)

    def prefetch(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Start reading bytes ``[begin, end)`` of a tensor into the page cache and return at
        once (the reads run while the caller does other work; :meth:`populate` waits for them)."""
        info = self.tensors[name]
        end = info.nbytes if end is None else end
        if end > begin:
            self._mapping(info.file)
            start = self._offset(info) + begin
            pagecache.advise(self._addresses[info.file] + start, end - begin, mmap.MADV_WILLNEED)

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop a tensor's pages (bytes ``[begin, end)`` of it; default all) from this
        process's mapping (they stay in the page cache)."""
        info = self.tensors[name]
        mapped = self._maps.get(info.file)
        end = info.nbytes if end is None else end
        if mapped is not None and end > begin:
            pagecache.release(mapped, self._offset(info) + begin, end - begin)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, copied out of the memory-mapped shard into its own CPU memory."""
        info = self.tensors[name]
        tensor = torch.empty(info.shape, dtype=info.torch_dtype)
        if info.nbytes == 0:
            return tensor
        start = self._offset(info)
        try:
            mapped = self._mapping(info.file)
            source = np.frombuffer(mapped, dtype=np.uint8, count=info.nbytes, offset=start)
            tensor.view(-1).view(torch.uint8).numpy()[:] = source
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({exc})") from None
        del source
        pagecache.release(mapped, start, info.nbytes)
        return tensor

    def _read_range(self, name: str, offset: int, out) -> None:
        info = self.tensors[name]
        length = len(out)
        start = self._offset(info) + offset
        try:
            mapped = self._mapping(info.file)
            out[:] = np.frombuffer(mapped, dtype=np.uint8, count=length, offset=start)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({exc})") from None
        pagecache.release(mapped, start, length)

    def _mapping(self, file: Path) -> mmap.mmap:
        """The shard's mapping, after checking that the file still has its size.

        The descriptor stays open so the check looks at the mapped file itself, even if the path
        has since been replaced. A shard that shrinks after the check (a read past its new end
        raises SIGBUS) is left to :mod:`.faults`, which watches every mapped shard.
        """
        with self._mapping_lock:
            return self._map_shard(file)

    def _map_shard(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            handle = os.fdopen(open_regular(file, CheckpointError), "rb")
            self._handles[file] = handle
            self._check_size(file)
            faults.watch(handle.fileno(), file, handle.fileno(), self._sizes[file])
            # Private and writable: views of it are ordinary tensors, and nothing reaches the file.
            self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            self._direct[file] = open_direct_reader(handle.fileno())
            # Its address, for madvise through ctypes; the numpy export ends right away.
            self._addresses[file] = np.frombuffer(
                self._maps[file], dtype=np.uint8, count=1
            ).ctypes.data
        else:
            self._check_size(file)
        return self._maps[file]

    def _check_size(self, file: Path) -> None:
        size = os.fstat(self._handles[file].fileno()).st_size
        if size != self._sizes[file]:
            raise CheckpointError(
                f"{file}: changed size while being read ({self._sizes[file]} -> {size} bytes); "
                "another program is writing it: let it finish, then run again"
            )

    def close(self) -> None:
        """Unmap the shards (reading again maps them anew). A shard that views from
        :meth:`view` still use is unmapped when the last of them is gone."""
        for mapped in self._maps.values():
            with contextlib.suppress(BufferError):
                mapped.close()
        self._maps.clear()
        for handle in self._handles.values():
            faults.unwatch(handle.fileno())
            handle.close()
        self._handles.clear()
        for descriptor in self._direct.values():
            if descriptor >= 0:
                os.close(descriptor)
        self._direct.clear()
        self._addresses.clear()
