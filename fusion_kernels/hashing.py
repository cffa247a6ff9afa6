"""The counter-based hash of SPEC.md, identical in every backend.

``mix32`` is a 32-bit integer finaliser; per-entry hashes depend only on (seed, tensor name, flat
index, stream), so masks are reproducible and equal across backends and devices. Tensors hold the
32-bit values in int64 so every torch device can compute them without unsigned types.
"""

from __future__ import annotations

import zlib

import torch

MASK32 = 0xFFFFFFFF
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B
STREAM_TIE = 0x9E3779B9
STREAM_DROP = 0x85EBCA6B
#: ``u = h * TWO_POW_M32`` is exact in float64.
TWO_POW_M32 = 2.0**-32


def mix32_int(x: int) -> int:
    """``mix32`` of one Python integer (taken mod 2^32)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    x ^= x >> 16
    return x


def tensor_seed(seed: int, name: str) -> int:
    """``mix32((seed mod 2^32) ^ crc32(utf-8 name))``."""
    return mix32_int((seed & MASK32) ^ zlib.crc32(name.encode("utf-8")))


def model_tensor_seed(seed: int, name: str, model: int = 1) -> int:
    """Tuned model ``model``'s (1-based) seed: ``mix32((seed mod 2^32) ^ crc32(name) ^
    mix32(model − 1))`` (SPEC "Several tuned models"); model 1's is :func:`tensor_seed`."""
    return mix32_int((seed & MASK32) ^ zlib.crc32(name.encode("utf-8")) ^ mix32_int(model - 1))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # Split the constant into 16-bit halves so no int64 product overflows (each stays < 2^48).
    low = x * (c & 0xFFFF)
    high = (x * (c >> 16)) & 0xFFFF
    return (low + (high << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` elementwise on an int64 tensor of values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MUL2)
    return x ^ (x >> 16)


def entry_hash(index: torch.Tensor, seed_of_tensor: int, stream: int) -> torch.Tensor:
    """``h_stream(i)`` for int64 flat indices ``index`` (any shape); values in [0, 2^32)."""
    per_block = mix32(seed_of_tensor ^ stream ^ mix32(index >> 32))
    return mix32((index & MASK32) ^ per_block)


def entry_hash_int(i: int, seed_of_tensor: int, stream: int) -> int:
    """``h_stream(i)`` for one index, for tests and host-side checks."""
    per_block = mix32_int(seed_of_tensor ^ stream ^ mix32_int(i >> 32))
    return mix32_int((i & MASK32) ^ per_block)
