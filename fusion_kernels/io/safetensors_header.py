"""The safetensors file format: a little-endian u64 header length, a JSON header naming each
tensor's dtype, shape and byte range, then the tensors' bytes.

:func:`read_header` parses and checks a header, so that a corrupt or truncated file is one clear
error naming it, before anything is mapped.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

from ..dtypes import SAFETENSORS_DTYPES
from ..errors import CheckpointError
from .checkpoint import TensorInfo
from .safeload import open_regular, parse_json

#: The index file of a sharded safetensors checkpoint.
INDEX_NAME = "model.safetensors.index.json"
# A header larger than this is certainly corrupt (real ones are a few MB at most).
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Every dimension and offset must fit an int64 (torch's and the file format's limit).
MAX_DIM = 2**63


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
