"""The dtype table: widths, names both ways, and which dtypes merge."""

import pytest
import torch

from fusion_kernels.dtypes import (
    MERGE_DTYPE_NAMES,
    MERGE_DTYPES,
    MERGEABLE,
    SAFETENSORS_DTYPES,
    dtype_from_name,
    safetensors_name,
)


@pytest.mark.parametrize("name", list(SAFETENSORS_DTYPES))
def test_each_width_is_torchs_and_the_name_round_trips(name):
    dtype, width = SAFETENSORS_DTYPES[name]
    assert torch.empty(0, dtype=dtype).element_size() == width
    assert safetensors_name(dtype) == name


def test_the_merge_dtypes_are_the_three_floats_in_every_spelling():
    assert (torch.float32, torch.float16, torch.bfloat16) == MERGE_DTYPES
    assert MERGEABLE == ("F32", "F16", "BF16")
    for dtype in MERGE_DTYPES:
        assert dtype_from_name(MERGE_DTYPE_NAMES[dtype]) is dtype


@pytest.mark.parametrize("name", ["float64", "int8", "BF16", "torch.bfloat16", ""])
def test_other_names_are_not_merge_dtypes(name):
    assert dtype_from_name(name) is None


def test_a_dtype_safetensors_cannot_store_has_no_name():
    with pytest.raises(KeyError):
        safetensors_name(torch.complex64)
