"""The counter-based hash: fixed vectors, and the torch version against an independent numpy one."""

import zlib

import numpy as np
import pytest
import torch

from fusion_kernels.hashing import (
    STREAM_DROP,
    STREAM_TIE,
    entry_hash,
    entry_hash_int,
    mix32,
    mix32_int,
    tensor_seed,
)

# Computed once from SPEC's formula; any change to the hash breaks reproducibility of masks.
MIX32_VECTORS = {
    0x0: 0x0,
    0x1: 0x688990C0,
    0x2: 0xD1132181,
    0xDEADBEEF: 0xE628C683,
    0xFFFFFFFF: 0x6768824A,
}
NAME = "model.layers.0.mlp.up_proj.weight"
ENTRY_VECTORS = [  # (i, h_TIE(i), h_DROP(i)) for seed 42 and NAME
    (0, 0x13BC7E4A, 0xC1751853),
    (1, 0x74776D78, 0xAF978CE4),
    (12345, 0xE49DDFBF, 0xB33543DA),
    (2**32 + 5, 0xDA44D181, 0x81B68467),
]


def numpy_mix32(x: np.ndarray) -> np.ndarray:
    """SPEC's mix32 in numpy uint32, whose multiplication wraps mod 2^32 by definition."""
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


@pytest.mark.parametrize("x,expected", MIX32_VECTORS.items())
def test_mix32_fixed_vectors(x, expected):
    assert mix32_int(x) == expected
    assert mix32(torch.tensor([x], dtype=torch.int64)).item() == expected


def test_mix32_matches_numpy_on_random_values():
    values = np.random.default_rng(0).integers(0, 2**32, size=100_000, dtype=np.uint64)
    ours = mix32(torch.from_numpy(values.astype(np.int64))).numpy()
    np.testing.assert_array_equal(ours, numpy_mix32(values).astype(np.int64))


def test_tensor_seed_uses_crc32_of_name_and_seed_mod_2_32():
    assert tensor_seed(42, NAME) == mix32_int(42 ^ zlib.crc32(NAME.encode()))
    assert tensor_seed(42 + 2**32, NAME) == tensor_seed(42, NAME)
    assert tensor_seed(-1, NAME) == mix32_int(0xFFFFFFFF ^ zlib.crc32(NAME.encode()))
    assert tensor_seed(0, "") == 0


@pytest.mark.parametrize("i,tie,drop", ENTRY_VECTORS)
def test_entry_hash_fixed_vectors(i, tie, drop):
    seed = tensor_seed(42, NAME)
    assert entry_hash_int(i, seed, STREAM_TIE) == tie
    assert entry_hash_int(i, seed, STREAM_DROP) == drop
    index = torch.tensor([i], dtype=torch.int64)
    assert entry_hash(index, seed, STREAM_TIE).item() == tie
    assert entry_hash(index, seed, STREAM_DROP).item() == drop


def test_entry_hash_vectorised_equals_scalar_across_the_2_32_boundary():
    seed = tensor_seed(7, "x")
    idx = [0, 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 3 * 2**32 + 17]
    got = entry_hash(torch.tensor(idx, dtype=torch.int64), seed, STREAM_DROP).tolist()
    assert got == [entry_hash_int(i, seed, STREAM_DROP) for i in idx]
    assert got[0] != got[4], "the high word of the index must change the hash"


def test_drop_hash_is_uniform_enough_for_dare():
    seed = tensor_seed(0, NAME)
    u = entry_hash(torch.arange(1_000_000), seed, STREAM_DROP).double() / 2**32
    assert abs(u.mean().item() - 0.5) < 0.002
    assert abs((u < 0.1).double().mean().item() - 0.1) < 0.002
