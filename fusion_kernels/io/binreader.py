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
from .reader import TensorInfo, TensorTable, advise, populate_range
from .safeload import MAX_INDEX_BYTES, load_json, open_regular

BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


def is_bin_checkpoint(path: Path) -> bool:
    """True when ``path`` is a ``.bin`` file or a directory holding a ``.bin`` checkpoint."""
    # exists, not is_file: a FIFO or directory by that name is refused when opened, by name.
    if not path.is_dir():
        return path.suffix == ".bin"
    return (path / BIN_INDEX_NAME).exists() or (path / BIN_NAME).exists()


def output_shard_name(filename: str) -> str:
    """The safetensors file a merge writes for an input shard: ``pytorch_model-00001-of-00002.bin``
    → ``model-00001-of-00002.safetensors``; a ``.safetensors`` name stays as it is."""
    if not filename.endswith(".bin"):
        return filename
    stem = filename.removesuffix(".bin")
    return (
        "model" + stem.removeprefix("pytorch_model") if stem.startswith("pytorch_model") else stem
    ) + ".safetensors"


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


class BinCheckpoint(TensorTable):
    """A ``.bin`` checkpoint with the :class:`~fusion_kernels.io.reader.Checkpoint` interface.

    ``TensorInfo.begin``/``end`` are positions in the order tensors were saved (the bytes live
    inside the zip archive); reads go through the mapped tensors, never through offsets.
    """

    index_name = BIN_INDEX_NAME

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self.directory = self.path if self.path.is_dir() else self.path.parent
        self.files = self._shard_files()
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
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
        if not index.exists():
            if not (self.path / BIN_NAME).exists():
                raise CheckpointError(f"{self.path}: no {BIN_NAME} or {BIN_INDEX_NAME} here")
            return [self.path / BIN_NAME]
        document = load_json(index, MAX_INDEX_BYTES, CheckpointError)
        self.index = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(self.index, dict) or not all(
            isinstance(v, str) for v in self.index.values()
        ):
            raise CheckpointError(
                f"{index}: not a valid index file (needs a weight_map of tensor names to files)"
            )
        files = sorted(set(self.index.values()))
        for name in files:
            if Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard {name!r} is not a file name here")
            # Its output shard keeps any other name, which could be one the writer creates
            # (config.json, the report) or copies from the tuned directory.
            if not name.endswith(".bin"):
                raise CheckpointError(
                    f"{index}: shard {name!r} is not a .bin file name; rename the shard and its "
                    "index entries"
                )
            if not os.path.lexists(self.path / name):
                raise CheckpointError(f"{index}: names shard {name!r}, which does not exist")
        return [self.path / name for name in files]

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

    def read_into(self, name: str, offset: int, out) -> None:
        """Copy bytes ``[offset, offset + len(out))`` of a tensor into a uint8 numpy array (e.g.
        a staging buffer), releasing the mapped pages read."""
        info = self.tensors[name]
        if offset < 0 or offset + len(out) > info.nbytes:
            raise ValueError(f"range [{offset}, {offset + len(out)}) outside tensor {name!r}")
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

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
