"""Writer: sharded safetensors output that appears only when complete.

Every shard's header is written up front (all sizes are known from the plan), then each tensor's
bytes go to their offset as soon as the tensor is merged, so memory holds a few tensors, never a
shard. Everything goes to a temporary sibling directory that is renamed onto the output path at
the end; on any failure it is removed and the output path is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .directio import OffsetFile
from .dtypes import SAFETENSORS_DTYPES
from .errors import CheckpointError, OutputExistsError
from .planner import MergePlan
from .reader import INDEX_NAME, Checkpoint

REPORT_NAME = "fusion_report.json"
# Files of the tuned directory that are weights (ours or another format) and are not copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_NAMES = (INDEX_NAME, "pytorch_model.bin.index.json", REPORT_NAME)


class ShardFile:
    """One output safetensors file: header written at open, tensors written at their offsets."""

    def __init__(self, path: Path, entries: Iterable[tuple[str, str, tuple[int, ...], int]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.layout: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        position = 0
        for name, dtype, shape, nbytes in entries:
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [position, position + nbytes],
            }
            self.layout[name] = (dtype, tuple(shape), position, nbytes)
            position += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        # Pad the header with spaces so tensor data starts 8-byte aligned, as safetensors does.
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.path = path
        self.pending = set(self.layout)
        self._partial: dict[str, int] = {}
        self.file: OffsetFile | None = None
        with _write_errors(path):
            self.file = OffsetFile(path)
            self.file.write_at(np.frombuffer(struct.pack("<Q", len(raw)) + raw, np.uint8), 0)
            self.file.truncate(self.data_start + position)

    @property
    def closed(self) -> bool:
        return self.file is None or self.file.fd < 0

    def position(self, name: str) -> int:
        """Where a tensor's bytes start in the file."""
        return self.data_start + self.layout[name][2]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (CPU, the planned dtype and shape) at its offset."""
        dtype, shape, begin, nbytes = self.layout[name]
        if tensor.dtype != SAFETENSORS_DTYPES[dtype][0] or tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                f"planned {dtype} {list(shape)}"
            )
        data = tensor_bytes(tensor)
        assert data.nbytes == nbytes
        with _write_errors(self.path):
            self.file.write_at(data, self.data_start + begin)
        self._written(name)

    def write_range(self, name: str, offset: int, data) -> None:
        """Write part of a tensor's bytes (a uint8 array) at ``offset`` within the tensor; the
        tensor counts as written once all its bytes have been."""
        _, _, begin, nbytes = self.layout[name]
        if offset < 0 or offset + len(data) > nbytes:
            raise ValueError(f"range [{offset}, {offset + len(data)}) outside tensor {name!r}")
        with _write_errors(self.path):
            self.file.write_at(data, self.data_start + begin + offset)
        self._partial[name] = self._partial.get(name, 0) + len(data)
        if self._partial[name] == nbytes:
            self._written(name)

    def _written(self, name: str) -> None:
        self.pending.discard(name)
        # Sync a complete shard now, while later shards are still being merged, rather than
        # all shards at the end.
        if not self.pending:
            self.close()

    def close(self, sync: bool = True) -> None:
        if self.file is not None:
            with _write_errors(self.path):
                self.file.close(sync)


def tensor_bytes(tensor: torch.Tensor):
    """The tensor's bytes as a flat uint8 numpy array (a view when it is contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def checksum(tensor: torch.Tensor) -> int:
    """crc32 of the tensor's bytes, for ``--verify``."""
    return zlib.crc32(tensor_bytes(tensor))


class _write_errors:
    """Turn OSError (disk full, file too large, no permission) into a CheckpointError."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, OSError):
            raise CheckpointError(
                f"{self.path}: cannot write ({exc.strerror or exc}); free disk space or choose "
                "another --out"
            ) from None
        return False


class CheckpointWriter:
    """Writes a planned checkpoint into ``out_dir`` atomically.

    Use as a context manager: leaving it with an exception removes the temporary directory.
    Call :meth:`commit` once every tensor is written.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: MergePlan, overwrite: bool = False):
        self.out_dir = Path(out_dir).absolute()
        if self.out_dir.exists() and not overwrite:
            raise OutputExistsError(
                f"{self.out_dir}: output already exists; pass --overwrite or choose another --out"
            )
        with _write_errors(self.out_dir.parent):
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.out_dir)
        free = shutil.disk_usage(self.out_dir.parent).free
        if free < plan.nbytes:
            raise CheckpointError(
                f"{self.out_dir.parent}: {free / 1e9:.2f} GB free but the merge writes "
                f"{plan.nbytes / 1e9:.2f} GB; free disk space or choose another --out"
            )
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        with _write_errors(self.tmp_dir):
            self.tmp_dir.mkdir()
        self.plan = plan
        self.shards: dict[str, ShardFile] = {}
        try:
            for shard in plan.shards:
                entries = [
                    (
                        n,
                        plan.tasks[n].tuned.dtype,
                        plan.tasks[n].tuned.shape,
                        plan.tasks[n].tuned.nbytes,
                    )
                    for n in shard.names
                ]
                file = ShardFile(self.tmp_dir / shard.filename, entries)
                for name in shard.names:
                    self.shards[name] = file
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def position(self, name: str) -> int:
        """Where a tensor's bytes start in its shard file."""
        return self.shards[name].position(name)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.shards[name].write(name, tensor)

    def write_range(self, name: str, offset: int, data) -> None:
        self.shards[name].write_range(name, offset, data)

    def commit(
        self,
        copy_from: Path | None,
        report: dict[str, Any],
        checksums: dict[str, int] | None = None,
        extra_files: dict[str, str] | None = None,
    ) -> Path:
        """Close shards, write the index, copied files and report, then rename into place.

        ``extra_files`` (file name → text) are written after the copies, replacing any of them.
        With ``checksums`` (name → crc32 of the bytes computed), the written files are re-opened
        and every tensor's name, dtype, shape and checksum checked first.
        """
        unwritten = sorted(n for f in set(self.shards.values()) for n in f.pending)
        if unwritten:
            raise CheckpointError(f"internal error: tensors never written: {unwritten[:5]}")
        for file in set(self.shards.values()):
            file.close()
        if len(self.plan.shards) > 1:
            weight_map = {n: s.filename for s in self.plan.shards for n in s.names}
            index = {"metadata": {"total_size": self.plan.nbytes}, "weight_map": weight_map}
            self._write_json(INDEX_NAME, index)
        if checksums is not None:
            self._verify(checksums)
        with _write_errors(self.tmp_dir):
            if copy_from is not None:
                for path in non_weight_files(copy_from):
                    shutil.copy2(path, self.tmp_dir / path.name)
            for filename, text in (extra_files or {}).items():
                (self.tmp_dir / filename).unlink(missing_ok=True)
                (self.tmp_dir / filename).write_text(text, encoding="utf-8")
            self._write_json(REPORT_NAME, report)
            self._rename_into_place()
        return self.out_dir

    def _verify(self, checksums: dict[str, int]) -> None:
        written = Checkpoint(self.tmp_dir)
        try:
            if set(written.tensors) != set(self.plan.tasks):
                missing = sorted(set(self.plan.tasks) ^ set(written.tensors))
                raise CheckpointError(f"--verify: tensor names differ from the plan: {missing[:5]}")
            for name, task in self.plan.tasks.items():
                info = written.info(name)
                if (info.dtype, info.shape) != (task.tuned.dtype, task.tuned.shape):
                    raise CheckpointError(
                        f"--verify: {info.file}: tensor {name!r} is {info.dtype} "
                        f"{list(info.shape)}, expected {task.tuned.dtype} {list(task.tuned.shape)}"
                    )
                if checksum(written.read(name)) != checksums[name]:
                    raise CheckpointError(
                        f"--verify: {info.file}: tensor {name!r} reads back with other bytes "
                        "than were computed"
                    )
        finally:
            written.close()

    def _write_json(self, filename: str, payload: dict[str, Any]) -> None:
        with _write_errors(self.tmp_dir / filename):
            (self.tmp_dir / filename).write_text(json.dumps(payload, indent=2) + "\n")

    def _rename_into_place(self) -> None:
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            os.rename(self.out_dir, old)
        os.rename(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Drop everything written so far; the output path is untouched."""
        for file in set(self.shards.values()):
            file.close(sync=False)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def non_weight_files(directory: Path) -> list[Path]:
    """Top-level files of a model directory that are not weights: config, tokenizer, processor..."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _WEIGHT_NAMES
    )


def remove_stale_partials(out_dir: Path) -> None:
    """Remove temporary siblings of ``out_dir`` left by runs that were killed."""
    for pattern in (f".{out_dir.name}.partial-*", f".{out_dir.name}.old-*"):
        for path in out_dir.parent.glob(pattern):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            # A run killed between its two renames left the previous output only here.
            if ".old-" in path.name and not out_dir.exists():
                os.rename(path, out_dir)
            else:
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
