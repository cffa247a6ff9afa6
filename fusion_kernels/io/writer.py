"""Writer: sharded safetensors output that appears only when complete.

Every shard's header is written up front (all sizes are known from the plan), then each tensor's
bytes go to their offset as soon as the tensor is merged, so memory holds a few tensors, never a
shard. Everything goes to a temporary sibling directory that is renamed onto the output path at
the end; on any failure it is removed and the output path is left as it was.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dtypes import SAFETENSORS_DTYPES
from ..errors import CheckpointError
from .directio import OffsetFile
from .outputs import (
    PAYLOAD_NAME,
    check_replaceable,
    check_target,
    create_workspace,
    held_interrupts,
    move_into_place,
    remove_stale_workspaces,
    remove_tree,
    uninterruptible,
)
from .reader import SafetensorsCheckpoint
from .safeload import describe_mode
from .safetensors_header import INDEX_NAME
from .verify import VERIFY_CHUNK_BYTES, stored_checksum
from .writeplan import WritePlan

REPORT_NAME = "fusion_report.json"
#: What an output holding REPORT_NAME is called in messages.
MERGE_KIND = "merge"
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

    Use as a context manager (entering it creates the temporary directory; leaving it with an
    exception removes it). Call :meth:`commit` once every tensor is written.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        plan: WritePlan,
        overwrite: bool = False,
        flag: str = "--out",
    ):
        """``flag``: the option that named ``out_dir``, for messages."""
        # abspath, not Path.absolute: '..' and '.' must name the directory, not a link to it.
        self.out_dir = Path(os.path.abspath(out_dir))
        self.overwrite, self.flag = overwrite, flag
        check_target(self.out_dir, overwrite, flag, REPORT_NAME, MERGE_KIND)
        with _write_errors(self.out_dir.parent):
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_workspaces(self.out_dir)
        free = shutil.disk_usage(self.out_dir.parent).free
        if free < plan.nbytes:
            raise CheckpointError(
                f"{self.out_dir.parent}: {free / 1e9:.2f} GB free but the merge writes "
                f"{plan.nbytes / 1e9:.2f} GB; free disk space or choose another --out"
            )
        self.plan = plan
        self.shards: dict[str, ShardFile] = {}
        self.workspace: Path | None = None

    def __enter__(self) -> CheckpointWriter:
        """Create the workspace and the shard files. Here, not in ``__init__``: a Ctrl-C between
        the constructor's return and the ``with`` taking hold would skip :meth:`__exit__` and
        leave the workspace behind; one that lands in this method is handled in it."""
        plan = self.plan
        try:
            # A Ctrl-C is held while the workspace and its marker are created, so that whatever
            # exists is recorded here for abort() to remove.
            with held_interrupts(), _write_errors(self.out_dir.parent):
                self.workspace = create_workspace(self.out_dir)
            #: Where the output is built; it becomes ``out_dir`` in one rename at the end.
            self.tmp_dir = self.workspace / PAYLOAD_NAME
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
        verify_chunk_bytes: int = VERIFY_CHUNK_BYTES,
    ) -> Path:
        """Close shards, write the index, copied files and report, then rename into place.

        ``extra_files`` (file name → text) are written instead of the copies of that name.
        With ``checksums`` (name → crc32 of the bytes computed), the written files are re-opened
        and every tensor's name, dtype, shape and checksum checked first, ``verify_chunk_bytes``
        (a share of the memory budget) at a time.
        """
        unwritten = sorted(n for f in set(self.shards.values()) for n in f.pending)
        if unwritten:
            raise CheckpointError(f"internal error: tensors never written: {unwritten[:5]}")
        for file in set(self.shards.values()):
            file.close()
        # As transformers: one file needs no index, unless it is named as one shard of several
        # (``model-00001-of-00001.safetensors``), which loaders find only through an index.
        if len(self.plan.shards) > 1 or "-of-" in self.plan.shards[0].filename:
            weight_map = {n: s.filename for s in self.plan.shards for n in s.names}
            index = {"metadata": {"total_size": self.plan.nbytes}, "weight_map": weight_map}
            self._write_json(INDEX_NAME, index)
        if checksums is not None:
            self._verify(checksums, verify_chunk_bytes)
        with _write_errors(self.tmp_dir):
            if copy_from is not None:
                for path in non_weight_files(copy_from):
                    if path.name not in (extra_files or {}):
                        self._copy(path)
            for filename, text in (extra_files or {}).items():
                self._write_text(filename, text)
            self._write_json(REPORT_NAME, report)
            self._rename_into_place()
        return self.out_dir

    def _verify(self, checksums: dict[str, int], chunk_bytes: int) -> None:
        written = SafetensorsCheckpoint(self.tmp_dir)
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
                if stored_checksum(written, name, chunk_bytes) != checksums[name]:
                    raise CheckpointError(
                        f"--verify: {info.file}: tensor {name!r} reads back with other bytes "
                        "than were computed"
                    )
        finally:
            written.close()

    def _copy(self, path: Path) -> None:
        """Copy one of tuned's non-weight files, never over a file this merge wrote."""
        target = self.tmp_dir / path.name
        if os.path.lexists(target):
            raise CheckpointError(
                f"{path}: has the name of a file the merge writes ({path.name}); rename it"
            )
        shutil.copy2(path, target)

    def _write_json(self, filename: str, payload: dict[str, Any]) -> None:
        self._write_text(filename, json.dumps(payload, indent=2) + "\n")

    def _write_text(self, filename: str, text: str) -> None:
        """A new file of the output; never over one already there (a shard or a copy)."""
        target = self.tmp_dir / filename
        with _write_errors(target), open(target, "x", encoding="utf-8") as fh:
            fh.write(text)

    def _rename_into_place(self) -> None:
        # Once begun, the swap and the removal of what it leaves finish, Ctrl-C or not.
        with uninterruptible():
            move_into_place(
                self.workspace,
                self.out_dir,
                self.overwrite,
                self.flag,
                functools.partial(
                    check_replaceable, flag=self.flag, marker=REPORT_NAME, kind=MERGE_KIND
                ),
            )
            # What is left is ours: the marker, and with --overwrite the replaced output.
            remove_tree(self.workspace)

    def abort(self) -> None:
        """Drop everything written so far; the output path is untouched."""
        while True:
            try:
                with uninterruptible():
                    for file in set(self.shards.values()):
                        file.close(sync=False)
                    if self.workspace is not None:
                        remove_tree(self.workspace)
                return
            except KeyboardInterrupt:
                # A second Ctrl-C that landed before the handlers were set aside: start over.
                continue


def check_side_files(directory: Path, replaced: tuple[str, ...] = ()) -> None:
    """Refuse a top-level entry of a tuned model directory that is neither a file nor a folder
    (a named pipe, a socket, a device, a broken link), before anything is written: the output
    would silently lack it, and a ``config.json`` missing makes the merged model unloadable.
    ``replaced``: names the merge writes itself (the model card), which are not copied."""
    for path in _side_entries(directory):
        if path.name in replaced:
            continue
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise CheckpointError(
                f"{path}: cannot be read ({exc.strerror or exc}); the merge copies tuned's side "
                "files (config, tokenizer) to the output: fix the link or remove it"
            ) from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise CheckpointError(
                f"{path}: not a regular file ({describe_mode(mode)}); the merge copies tuned's "
                "side files (config, tokenizer) to the output: put the file itself there"
            )


def non_weight_files(directory: Path) -> list[Path]:
    """Top-level files of a model directory that are not weights: config, tokenizer, processor..."""
    return [p for p in _side_entries(directory) if p.is_file()]


def _side_entries(directory: Path) -> list[Path]:
    """Top-level entries of a model directory not named as weights, sorted."""
    return sorted(
        p
        for p in directory.iterdir()
        if not p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _WEIGHT_NAMES
    )
