"""Reader: a checkpoint on disk, listed without reading data and read one tensor at a time.

A checkpoint is a directory holding one ``.safetensors`` file, or shards named by
``model.safetensors.index.json``, or a single ``.safetensors`` file. Headers are parsed and checked
here (so a corrupt file is a clear error naming it); shards are memory-mapped. A tensor is either
copied out on its own (:meth:`Checkpoint.read`) or handed out as a zero-copy view of the mapping
(:meth:`Checkpoint.view`); either way its pages are released from the mapping once used, so the
process's resident memory holds the tensors in flight, not the shards it has read.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..dtypes import SAFETENSORS_DTYPES
from ..errors import CheckpointError
from . import faults
from .directio import open_direct_reader, pread_direct
from .safeload import MAX_INDEX_BYTES, load_json, open_regular, parse_json

INDEX_NAME = "model.safetensors.index.json"

# A header larger than this is certainly corrupt (real ones are a few MB at most).
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Every dimension and offset must fit an int64 (torch's and the file format's limit).
MAX_DIM = 2**63
#: :meth:`Checkpoint.warm` maps this much at a time while it reads into the page cache.
WARM_SLICE = 16 * 2**20
#: What :meth:`Checkpoint.direct_bytes` adds to a tensor's size, at most: the partial pages at
#: both ends and a page to align the buffer.
DIRECT_SLACK = 3 * mmap.PAGESIZE
# madvise(2) advice that Python's mmap module lacks: fault a range's pages in (Linux 5.14+).
_MADV_POPULATE_READ = 22 if sys.platform.startswith("linux") else None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard file, dtype string, shape and byte range in the data."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype][0]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and check a safetensors header: ``(tensors, metadata, data_start)``.

    Raises CheckpointError naming the file for every inconsistency safetensors would trip on.
    """
    fd = open_regular(path, CheckpointError)
    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: header length {header_len} exceeds the file ({size} bytes): "
                "truncated or not a safetensors file"
            )
        raw = os.pread(fd, header_len, 8)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)
    header = parse_json(raw, f"{path}: header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = _metadata(path, header.pop("__metadata__", None))
    data_start = 8 + header_len
    tensors = {name: _tensor_info(path, name, entry) for name, entry in header.items()}
    _check_layout(path, tensors, size - data_start)
    return tensors, metadata, data_start


def _metadata(path: Path, value: object) -> dict[str, str]:
    """``__metadata__`` as safetensors accepts it: absent, or an object of strings to strings."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise CheckpointError(
            f"{path}: __metadata__ must map strings to strings; not a valid safetensors file"
        )
    return value


def _tensor_info(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    valid_shape = isinstance(shape, list) and all(_is_count(d) and d < MAX_DIM for d in shape)
    valid_offsets = isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
    if not valid_shape or not valid_offsets:
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape or data_offsets")
    begin, end = offsets
    if end >= MAX_DIM:
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets past 2^63")
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype][1]
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} of shape {shape} and dtype {dtype} needs {expected} bytes "
            f"but its offsets span {end - begin}"
        )
    return TensorInfo(name, path, dtype, tuple(shape), begin, end)


def _is_count(value: object) -> bool:
    # JSON true/false parse as bool, which Python also counts as int.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Offsets must start at 0, not overlap, leave no gaps and stay inside the file."""
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            problem = "overlaps the previous tensor" if info.begin < position else "leaves a gap"
            raise CheckpointError(f"{path}: tensor {info.name!r} {problem} (offset {info.begin})")
        position = info.end
    if position > data_size:
        raise CheckpointError(
            f"{path}: tensor data ends at byte {position} but the file holds {data_size} bytes "
            "after its header: the file is truncated"
        )
    if position < data_size:
        raise CheckpointError(
            f"{path}: {data_size - position} bytes after the last tensor that no header entry "
            "describes: not a valid safetensors file"
        )


class TensorTable:
    """What every checkpoint reader shares: its tensors (``tensors``, name → :class:`TensorInfo`)
    in file order, and the check that its index file (``index_name``; ``index``, name → shard
    file name, None without one) names each tensor's shard. Readers set ``path``, ``files``,
    ``tensors`` and ``index``."""

    index_name = INDEX_NAME
    path: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]

    def _check_index(self) -> None:
        for name, file in (getattr(self, "index", None) or {}).items():
            info = self.tensors.get(name)
            if info is None or info.file.name != file:
                raise CheckpointError(
                    f"{self.path / self.index_name}: tensor {name!r} is not in its shard {file!r}"
                )

    def names(self) -> list[str]:
        """Tensor names in file order, then in the order they lie in each file."""
        order = {f: i for i, f in enumerate(self.files)}
        return sorted(
            self.tensors, key=lambda n: (order[self.tensors[n].file], self.tensors[n].begin)
        )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]


class Checkpoint(TensorTable):
    """A safetensors checkpoint: names, shapes and dtypes from headers; data read on demand.

    Args:
        path: a directory (one ``.safetensors`` file, or shards named by an index file)
            or a single ``.safetensors`` file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self.directory = self.path if self.path.is_dir() else self.path.parent
        self.files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        #: Each shard's size when its header was read; a shard that shrinks later is refused
        #: before its mapping is touched (a read past a file's end kills the process: SIGBUS).
        self._sizes: dict[Path, int] = {}
        self.metadata: dict[str, str] = {}
        self._data_start: dict[Path, int] = {}
        for file in self.files:
            tensors, metadata, self._data_start[file] = read_header(file)
            self._sizes[file] = self._data_start[file] + sum(t.nbytes for t in tensors.values())
            for name in tensors.keys() & self.tensors.keys():
                raise CheckpointError(
                    f"{file}: tensor {name!r} also appears in {self.tensors[name].file}"
                )
            self.tensors.update(tensors)
            self.metadata = self.metadata or metadata
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

    def _shard_files(self) -> list[Path]:
        if not self.path.is_dir():
            if self.path.suffix != ".safetensors":
                raise CheckpointError(f"{self.path}: not a .safetensors file")
            return [self.path]
        index = self.path / INDEX_NAME
        if index.exists():
            self.index = self._load_index(index)
            files = sorted(set(self.index.values()))
            outside = [f for f in files if Path(f).name != f or f in ("", ".", "..")]
            if outside:
                raise CheckpointError(f"{index}: shard {outside[0]!r} is not a file name here")
            # Any other name could collide with a file the writer creates beside the shards
            # (config.json, the report) or one it copies from the tuned directory.
            foreign = [f for f in files if not f.endswith(".safetensors")]
            if foreign:
                raise CheckpointError(
                    f"{index}: shard {foreign[0]!r} is not a .safetensors file name; rename "
                    "the shard and its index entries"
                )
            missing = [f for f in files if not (self.path / f).exists()]
            if missing:
                raise CheckpointError(f"{index}: names shard {missing[0]!r}, which does not exist")
            return [self.path / f for f in files]
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

    def _load_index(self, index: Path) -> dict[str, str]:
        document = load_json(index, MAX_INDEX_BYTES, CheckpointError)
        try:
            weight_map = document["weight_map"]
        except (KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{index}: not a valid index file (no {exc})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        return weight_map

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
                _populate(self._addresses[info.file], mapped, start, info.nbytes)
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
        begin, span = _pages(self._maps[file], start, length)
        vector = np.zeros(-(-span // mmap.PAGESIZE), dtype=np.uint8)
        if _LIBC is None or not vector.size:
            return 0.0
        address = ctypes.c_void_p(self._addresses[file] + begin)
        if _LIBC.mincore(address, span, vector.ctypes.data_as(ctypes.c_void_p)) != 0:
            return 0.0
        return float(np.count_nonzero(vector & 1)) / vector.size

    def populate(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Map bytes ``[begin, end)`` of a viewed tensor's pages in now, reading them from disk
        if needed; the GIL is released meanwhile, so other threads run."""
        info = self.tensors[name]
        mapped = self._maps.get(info.file)
        end = info.nbytes if end is None else end
        if mapped is not None and end > begin:
            start = self._offset(info) + begin
            _populate(self._addresses[info.file], mapped, start, end - begin)

    def prefetch(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Start reading bytes ``[begin, end)`` of a tensor into the page cache and return at
        once (the reads run while the caller does other work; :meth:`populate` waits for them)."""
        info = self.tensors[name]
        end = info.nbytes if end is None else end
        if end > begin:
            self._mapping(info.file)
            start = self._offset(info) + begin
            advise(self._addresses[info.file] + start, end - begin, mmap.MADV_WILLNEED)

    def warm(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Read bytes ``[begin, end)`` of a tensor into the page cache, waiting for them, without
        keeping them mapped in this process: :meth:`populate` then maps them in milliseconds.

        A slice at a time is mapped and unmapped again, so this holds at most a slice."""
        end = self.tensors[name].nbytes if end is None else end
        for first in range(begin, end, WARM_SLICE):
            stop = min(first + WARM_SLICE, end)
            self.populate(name, first, stop)
            self.release(name, first, stop)

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop a tensor's pages (bytes ``[begin, end)`` of it; default all) from this
        process's mapping (they stay in the page cache)."""
        info = self.tensors[name]
        mapped = self._maps.get(info.file)
        end = info.nbytes if end is None else end
        if mapped is not None and end > begin:
            _release(mapped, self._offset(info) + begin, end - begin)

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
        _release(mapped, start, info.nbytes)
        return tensor

    def read_into(self, name: str, offset: int, out) -> None:
        """Copy bytes ``[offset, offset + len(out))`` of a tensor into ``out`` (a uint8 numpy
        array, e.g. a pinned staging buffer), releasing the pages read."""
        info = self.tensors[name]
        length = len(out)
        if offset < 0 or offset + length > info.nbytes:
            raise ValueError(f"range [{offset}, {offset + length}) outside tensor {name!r}")
        start = self._offset(info) + offset
        try:
            mapped = self._mapping(info.file)
            out[:] = np.frombuffer(mapped, dtype=np.uint8, count=length, offset=start)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({exc})") from None
        _release(mapped, start, length)

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

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _populate(address: int, mapped: mmap.mmap, start: int, length: int) -> None:
    """Map a range's pages in now (reading them from disk if needed), so that the thread that
    calls this does the faulting, not the merge that reads the view later.

    Through ctypes, which releases the GIL for the call: ``mmap.madvise`` holds it while the
    kernel reads from disk, stalling the merge and the writer for that long.
    """
    if not hasattr(mapped, "madvise"):
        return
    begin, span = _pages(mapped, start, length)
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


def _release(mapped: mmap.mmap, start: int, length: int) -> None:
    """Drop a read range's pages from this process (they stay in the page cache)."""
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_DONTNEED, *_pages(mapped, start, length))


def _pages(mapped: mmap.mmap, start: int, length: int) -> tuple[int, int]:
    """(offset, length) of the whole pages covering a byte range, for madvise."""
    begin = start - start % mmap.PAGESIZE
    return begin, min(len(mapped) - begin, start + length - begin)
