"""The one interface every input checkpoint has, whatever its kind.

:class:`Checkpoint` is what the planner, the transports and the chunked merges read through:
safetensors (:class:`~fusion_kernels.io.reader.SafetensorsCheckpoint`), ``.bin``
(:class:`~fusion_kernels.io.binreader.BinCheckpoint`) and ``MODEL+ADAPTER``
(:class:`~fusion_kernels.io.lora.LoraCheckpoint`); Hub snapshots open as one of the first two.
A kind implements how a tensor is read; what all kinds share lives here once, defaults
included: a kind without a faster way to read (direct reads, read-ahead, views of a mapping)
inherits a method that says so (None, or nothing to do), and the caller takes the plain path.
"""

from __future__ import annotations

import math
import mmap
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import SAFETENSORS_DTYPES
from ..errors import CheckpointError
from .pagecache import WARM_SLICE
from .safeload import MAX_INDEX_BYTES, load_json

#: What :meth:`Checkpoint.direct_bytes` adds to a tensor's size, at most: the partial pages at
#: both ends and a page to align the buffer.
DIRECT_SLACK = 3 * mmap.PAGESIZE


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


class Checkpoint(ABC):
    """A checkpoint on disk: its tensors listed (``tensors``, name → :class:`TensorInfo`, in
    file order) without reading data, and read one tensor at a time.

    Attributes every kind sets: ``path`` (what was opened), ``directory`` (the folder holding
    it), ``files`` (its weight files), ``metadata``, ``index`` (name → shard file name from its
    index file, None without one), ``reference`` (the text that named it, default its path),
    ``roots`` (every local path it reads, which an output may not overlap) and ``adapter_dir``
    (the LoRA adapter merged in as it is read, None for a plain model).

    Args:
        path: the checkpoint's file or directory; it must exist.
        reference: the text that named it (a Hub id, ``MODEL+ADAPTER``), default ``path``.
        roots: the local paths it reads, default ``[path]``.
    """

    #: The index file naming each tensor's shard, for messages.
    index_name = ""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        reference: str | None = None,
        roots: list[Path] | None = None,
    ):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self.directory = self.path if self.path.is_dir() else self.path.parent
        self.reference = str(self.path) if reference is None else reference
        self.roots: list[Path] = [self.path] if roots is None else list(roots)
        self.adapter_dir: Path | None = None
        self.files: list[Path] = []
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.index: dict[str, str] | None = None
        self._open()

    def _open(self) -> None:  # noqa: B027 (optional hook: a view over another one lists nothing)
        """List the checkpoint's tensors, the last step of ``__init__``: kinds that read files
        override it (errors raise :class:`CheckpointError`)."""

    # Listing ----------------------------------------------------------------------------------

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

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in all."""
        return sum(t.nbytes for t in self.tensors.values())

    # Reading: what each kind implements -------------------------------------------------------

    @abstractmethod
    def view(self, name: str, populate: bool = True) -> torch.Tensor:
        """The tensor without a copy where the kind can (a view of a mapped file, its pages
        mapped in now with ``populate``; else as they are read, or by :meth:`populate`), else
        in memory of its own. Call :meth:`release` once done with it."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """The tensor copied into memory of its own."""

    def read_into(self, name: str, offset: int, out) -> None:
        """Copy bytes ``[offset, offset + len(out))`` of a tensor into ``out`` (a uint8 numpy
        array, e.g. a pinned staging buffer), releasing the pages read."""
        if offset < 0 or offset + len(out) > self.tensors[name].nbytes:
            raise ValueError(f"range [{offset}, {offset + len(out)}) outside tensor {name!r}")
        self._read_range(name, offset, out)

    @abstractmethod
    def _read_range(self, name: str, offset: int, out) -> None:
        """:meth:`read_into` once the range is checked to lie inside the tensor."""

    @abstractmethod
    def close(self) -> None:
        """Let go of the files (a view still in use keeps its mapping until it is gone)."""

    # Reading: faster ways, where a kind has them ----------------------------------------------

    def mappable(self, name: str) -> bool:
        """Whether :meth:`view` is the file's bytes mapped in place rather than a copy (so
        :meth:`populate`, :meth:`warm` and :meth:`release` act on it). Default: never."""
        return False

    def populate(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Map bytes ``[begin, end)`` of a mapped tensor's pages in now, reading them from disk if
        needed; the GIL is released meanwhile. Default: nothing is mapped, nothing to do."""
        return None

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop a mapped tensor's pages (bytes ``[begin, end)``; default all) from this process
        (they stay in the page cache). Default: nothing is mapped, nothing to do."""
        return None

    def prefetch(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Start reading bytes ``[begin, end)`` of a tensor into the page cache and return at
        once. Default: no read-ahead."""
        return None

    def warm(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Read bytes ``[begin, end)`` of a tensor into the page cache, waiting for them, without
        keeping them mapped in this process: :meth:`populate` then maps them in milliseconds.

        A slice at a time is mapped in and dropped again, so this holds at most a slice."""
        end = self.tensors[name].nbytes if end is None else end
        for first in range(begin, end, WARM_SLICE):
            stop = min(first + WARM_SLICE, end)
            self.populate(name, first, stop)
            self.release(name, first, stop)

    def direct_bytes(self, name: str) -> int | None:
        """The buffer :meth:`read_direct` needs for a tensor (at most :data:`DIRECT_SLACK` more
        than the tensor); None where the kind has no direct reads (the default)."""
        return None

    def read_direct(self, name: str, buffer: torch.Tensor) -> torch.Tensor | None:
        """The tensor read from disk into ``buffer`` bypassing the page cache (a view of it), or
        None where it is not read that way: read it with :meth:`view`. Default: None."""
        return None

    def row_origin(self, name: str) -> tuple[Checkpoint, TensorInfo] | None:
        """``(checkpoint, TensorInfo)`` holding the tensor's rows, for a merge that reads it in
        chunks of rows; None where it can only be read whole. Default: its own rows."""
        return self, self.tensors[name]

    # What the kinds with index files share ----------------------------------------------------

    def _index_shards(self, index: Path, suffix: str) -> list[Path]:
        """The shard files ``index`` names (setting :attr:`index`), each checked to be a file of
        this directory with a ``suffix`` name that exists."""
        document = load_json(index, MAX_INDEX_BYTES, CheckpointError)
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{index}: not a valid index file (needs a weight_map of tensor names to files)"
            )
        self.index = weight_map
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if Path(f).name != f or f in ("", ".", "..")]
        if outside:
            raise CheckpointError(f"{index}: shard {outside[0]!r} is not a file name here")
        # Its output shard keeps the name, which could otherwise be one the writer creates
        # beside the shards (config.json, the report) or copies from the tuned directory.
        foreign = [f for f in files if not f.endswith(suffix)]
        if foreign:
            raise CheckpointError(
                f"{index}: shard {foreign[0]!r} is not a {suffix} file name; rename the shard "
                "and its index entries"
            )
        missing = [f for f in files if not os.path.lexists(self.path / f)]
        if missing:
            raise CheckpointError(f"{index}: names shard {missing[0]!r}, which does not exist")
        return [self.path / f for f in files]

    def _check_index(self) -> None:
        """Every tensor the index names is in the shard it names."""
        for name, file in (self.index or {}).items():
            info = self.tensors.get(name)
            if info is None or info.file.name != file:
                raise CheckpointError(
                    f"{self.path / self.index_name}: tensor {name!r} is not in its shard {file!r}"
                )
