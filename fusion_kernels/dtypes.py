"""The one table of tensor dtypes: safetensors names, torch dtypes, widths, and which ones merge.

Every module that needs to know a dtype's name, width or whether the merge op computes on it reads
it from here.
"""

from __future__ import annotations

import torch

#: safetensors dtype string → (torch dtype, bytes per element).
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U64": (torch.uint64, 8),
    "U32": (torch.uint32, 4),
    "U16": (torch.uint16, 2),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}

#: The float dtypes the merge op computes on (SPEC.md "Inputs"); every other tensor is copied.
MERGE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

#: Plain names of the merge dtypes ("float32", ...), as configs and the C++ kernel spell them.
MERGE_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}

_TORCH_TO_SAFETENSORS = {torch_dtype: name for name, (torch_dtype, _) in SAFETENSORS_DTYPES.items()}

#: safetensors names of the merge dtypes.
MERGEABLE: tuple[str, ...] = tuple(_TORCH_TO_SAFETENSORS[d] for d in MERGE_DTYPES)


def safetensors_name(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype (``torch.bfloat16`` → ``"BF16"``)."""
    return _TORCH_TO_SAFETENSORS[dtype]


def dtype_from_name(name: str) -> torch.dtype | None:
    """A merge dtype from its plain name (``"bfloat16"``), or None when it is not one."""
    return next((d for d, n in MERGE_DTYPE_NAMES.items() if n == name), None)


def dtype_mismatch(
    name: str, tuned: str | torch.dtype, base: str | torch.dtype, tuned_at="", base_at=""
) -> str | None:
    """Why tensor ``name`` of dtype ``tuned`` does not merge with base's of dtype ``base`` (None:
    it does). The op computes on one dtype and casts neither side: a merge of checkpoints and
    :func:`~fusion_kernels.ops.merge_tensor` refuse a mixed pair alike. ``tuned_at``/``base_at``
    say where each lies (`` (file)``)."""
    if tuned == base:
        return None
    return (
        f"tensor {name!r}: dtype {tuned} in tuned{tuned_at} but {base} in base{base_at}; "
        "convert one so the dtypes agree"
    )
