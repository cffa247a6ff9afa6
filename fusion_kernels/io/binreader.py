"""Reader of PyTorch ``.bin`` checkpoints behind the same interface as the safetensors reader.

A checkpoint is ``pytorch_model.bin``, or shards named by ``pytorch_model.bin.index.json``, or a
single ``.bin`` file. Each file is opened with ``torch.load(weights_only=True, mmap=True)``: the
restricted unpickler builds tensors, containers and plain values only, so a pickle that would call
anything else is refused before any of it runs, and tensor data stays in the memory-mapped file
until a tensor is read. What is loaded must be a flat mapping of tensor names to tensors.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from ..dtypes import SAFETENSORS_DTYPES, safetensors_name
from ..errors import CheckpointError
from . import faults
from .checkpoint import Checkpoint, TensorInfo
from .pagecache import advise, populate_range
from .safeload import open_regular

BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


def is_bin_checkpoint(path: Path) -> bool:
    """True when ``path`` is a ``.bin`` file or a directory holding a ``.bin`` checkpoint."""
    # exists, not is_file: a FIFO or directory by that name is refused when opened, by name.
    if not path.is_dir():
        return path.suffix == ".bin"
    return (path / BIN_INDEX_NAME).exists() or (path / BIN_NAME).exists()


def load_state(file: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A ``.bin`` file's tensors, memory-mapped, and whether they are (a legacy-format file is
    read into memory instead); refuses anything but names mapped to tensors. The file must be a
    regular file (check it with :func:`open_regular` first: a FIFO would block the load forever)."""
    mapped = True
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise CheckpointError(f"{file}: cannot load ({_first_line(exc)})") from None
        # Files written by torch.save's legacy (pre-zip) format cannot be mapped.
        state, mapped = _load_unmapped(file), False
    except Exception as exc:  # the restricted unpickler raises many types: all mean refused
        raise CheckpointError(_refusal(file, exc)) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{file}: holds {type(state).__name__} with non-tensor entries, not a plain state "
            "dict of tensor names to tensors; save the model's state_dict() (or safetensors)"
        )
    return state, mapped


def _load_unmapped(file: Path) -> object:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(_refusal(file, exc)) from None


def _refusal(file: Path, exc: Exception) -> str:
    return (
        f"{file}: refused without running it: not a plain tensor pickle ({_first_line(exc)}); "
        "convert it to safetensors with a tool you trust"
    )


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _check_dense(file: Path, name: str, tensor: torch.Tensor) -> None:
    """Refuse a tensor without plain dense data: a meta tensor holds no values, a sparse (or
    other non-strided) one is no byte array a weight can be read from."""
    if tensor.is_meta:
        raise CheckpointError(
            f"{file}: tensor {name!r} is a meta tensor (a shape with no values); save the "
            "checkpoint from a model whose weights are loaded"
        )
    if tensor.layout != torch.strided:
        raise CheckpointError(
            f"{file}: tensor {name!r} has layout {tensor.layout}, not dense; save it with "
            ".to_dense() first"
        )


class BinCheckpoint(Checkpoint):
    """A ``.bin`` checkpoint behind the :class:`~fusion_kernels.io.checkpoint.Checkpoint`
    interface.

    ``TensorInfo.begin``/``end`` are positions in the order tensors were saved (the bytes live
    inside the zip archive); reads go through the mapped tensors, never through offsets.
    """

    index_name = BIN_INDEX_NAME

    def _open(self) -> None:
        """Load each file's state (memory-mapped where torch can) and list its tensors."""
        self.files = self._shard_files()
        self._state: dict[str, torch.Tensor] = {}
        self._watched: list[int] = []
        self._mapped_files: set[Path] = set()
        try:
            for file in self.files:
                self._watch(file)
                state, mapped = load_state(file)
                if mapped:
                    self._mapped_files.add(file)
                self._add(file, state)
        except BaseException:
            self.close()
            raise
        self._check_index()

    def _shard_files(self) -> list[Path]:
        if not self.path.is_dir():
            return [self.path]
        index = self.path / BIN_INDEX_NAME
        if index.exists():
            return self._index_shards(index, ".bin")
        if not (self.path / BIN_NAME).exists():
            raise CheckpointError(f"{self.path}: no {BIN_NAME} or {BIN_INDEX_NAME} here")
        return [self.path / BIN_NAME]

    def _add(self, file: Path, state: dict[str, torch.Tensor]) -> None:
        position = 0
        for name, tensor in state.items():
            if name in self.tensors:
                raise CheckpointError(
                    f"{file}: tensor {name!r} also appears in {self.tensors[name].file}"
                )
            if tensor.dtype not in {d for d, _ in SAFETENSORS_DTYPES.values()}:
                raise CheckpointError(f"{file}: tensor {name!r}: unsupported dtype {tensor.dtype}")
            _check_dense(file, name, tensor)
            nbytes = tensor.numel() * tensor.element_size()
            dtype, shape = safetensors_name(tensor.dtype), tuple(tensor.shape)
            self.tensors[name] = TensorInfo(name, file, dtype, shape, position, position + nbytes)
            self._state[name] = tensor
            position += nbytes

    def view(self, name: str, populate: bool = True) -> torch.Tensor:
        """The tensor in the mapped file (contiguous; a strided one is copied), its pages
        mapped in now (``populate``; else as they are read, or by :meth:`populate`)."""
        tensor = self._state[name]
        if not tensor.is_contiguous():
            return tensor.contiguous()
        if populate:
            self.populate(name)
        return tensor

    def mappable(self, name: str) -> bool:
        """Whether :meth:`view` is the mapped file's bytes, not a copy."""
        return self.tensors[name].file in self._mapped_files and self._state[name].is_contiguous()

    def populate(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Map bytes ``[begin, end)`` of a mapped tensor's pages in now (the GIL is released)."""
        if self.mappable(name):
            end = self.tensors[name].nbytes if end is None else end
            populate_range(self._state[name].data_ptr() + begin, end - begin)

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop a mapped tensor's pages (bytes ``[begin, end)``; default all) from this process.

        The mapping is private and never written, so the pages are clean copies of the file: a
        later read maps them in again. Tensors read into memory (legacy files, strided
        tensors) are left alone: dropping their pages would zero them.
        """
        if self.mappable(name):
            end = self.tensors[name].nbytes if end is None else end
            advise(self._state[name].data_ptr() + begin, end - begin, mmap.MADV_DONTNEED)

    def read(self, name: str) -> torch.Tensor:
        """The tensor copied into its own memory."""
        return self._state[name].clone(memory_format=torch.contiguous_format)

    def _read_range(self, name: str, offset: int, out) -> None:
        flat = self.view(name, populate=False).reshape(-1).view(torch.uint8)
        out[:] = flat[offset : offset + len(out)].numpy()
        self.release(name, offset, offset + len(out))

    def _watch(self, file: Path) -> None:
        """Refuse a file that is not regular, and hand it to :mod:`.faults` for as long as it is
        mapped: a shard that shrinks under its mapping is one error line, not death by SIGBUS."""
        fd = open_regular(file, CheckpointError)
        self._watched.append(fd)
        faults.watch(fd, file, fd, os.fstat(fd).st_size)

    def close(self) -> None:
        """Stop watching the files; the mappings go with the tensors."""
        for fd in self._watched:
            faults.unwatch(fd)
            os.close(fd)
        self._watched.clear()
