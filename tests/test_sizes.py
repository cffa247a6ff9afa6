"""Sizes as options take them: decimal and binary units, a byte count, and what is refused."""

import pytest

from fusion_kernels.errors import ParameterError
from fusion_kernels.sizes import parse_size


@pytest.mark.parametrize(
    "text,size",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 5 * 10**8),
        ("2GiB", 2 * 2**30),
        ("123", 123),
        (" 1.5 kib ", 1536),
        ("8B", 8),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "must look like 5GB, 500MB, 2GiB or a byte count"),
        ("5XB", "must look like"),
        ("-1GB", "must look like"),
        ("0", "must be positive"),
        ("0.1B", "must be positive"),
        ("8EiB", "must look like"),
        ("10000000TB", "too large; at most 8EiB"),
    ],
)
def test_parse_size_rejects_nonsense(text, message):
    with pytest.raises(ParameterError, match=message):
        parse_size(text)
