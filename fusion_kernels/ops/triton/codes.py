"""The codes the Triton kernels and their launchers share: how a tensor argument, a suppress
method, a rescale and a neuron's write mode are encoded; the fields of a cut's state, of the
float64 parameters and of the counters read back; and the host-side values of each."""

from __future__ import annotations

import torch
import triton.language as tl

from ...hashing import STREAM_DROP, STREAM_TIE

# Encodings of a tensor argument (fp32 and fp16 load natively; bf16 travels as its int16 bits).
KIND_F32: tl.constexpr = tl.constexpr(0)
KIND_F16: tl.constexpr = tl.constexpr(1)
KIND_BF16: tl.constexpr = tl.constexpr(2)

# Suppress methods as the kernels know them; magnitude and breadcrumbs are both a window
# [t, t + k) of the SPEC order, given by two cuts.
M_NONE: tl.constexpr = tl.constexpr(0)
M_WINDOW: tl.constexpr = tl.constexpr(1)
M_RANDOM: tl.constexpr = tl.constexpr(2)
M_DELLA: tl.constexpr = tl.constexpr(3)
R_NONE: tl.constexpr = tl.constexpr(0)
R_INVERSE: tl.constexpr = tl.constexpr(1)
R_L1: tl.constexpr = tl.constexpr(2)

# The host's names for these codes.
KINDS = {
    torch.float32: KIND_F32.value,
    torch.float16: KIND_F16.value,
    torch.bfloat16: KIND_BF16.value,
}
METHODS = {
    "none": M_NONE.value,
    "magnitude": M_WINDOW.value,
    "breadcrumbs": M_WINDOW.value,
    "random": M_RANDOM.value,
    "della": M_DELLA.value,
}
RESCALES = {"none": R_NONE.value, "inverse": R_INVERSE.value, "l1": R_L1.value}

# Per-neuron write modes: α·Sub, the whole delta (replace, or a rescale fallback), Sub·C/C'.
N_SCALED: tl.constexpr = tl.constexpr(0)
N_REPLACE: tl.constexpr = tl.constexpr(1)
N_RESCALE: tl.constexpr = tl.constexpr(2)

# One cut of the order, as int64 fields of a [2, STATE_FIELDS] state (cut 0 = position t,
# cut 1 = t + k). Once DONE, entry i lies before the cut iff (key >> SHIFT) > PREFIX, or it equals
# PREFIX and i < LIMIT. Until then PREFIX holds the key bits resolved so far, RANK the position of
# the cut inside the group of entries sharing them, COUNT that group's size.
F_PREFIX: tl.constexpr = tl.constexpr(0)
F_SHIFT: tl.constexpr = tl.constexpr(1)
F_RANK: tl.constexpr = tl.constexpr(2)
F_COUNT: tl.constexpr = tl.constexpr(3)
F_DONE: tl.constexpr = tl.constexpr(4)
F_COMPACT: tl.constexpr = tl.constexpr(5)
F_CANDIDATES: tl.constexpr = tl.constexpr(6)
F_LIMIT: tl.constexpr = tl.constexpr(7)
STATE_FIELDS: tl.constexpr = tl.constexpr(8)


def cut_state(position: int, n: int) -> list[int]:
    """Host-side fields of a cut at SPEC position ``position`` of ``n`` entries.

    Positions 0 and n need no selection: with SHIFT = 63 no key bits are compared, so LIMIT alone
    decides (no index, or every index, lies before the cut).
    """
    fields = [0] * STATE_FIELDS.value
    fields[F_SHIFT.value] = 63
    fields[F_LIMIT.value] = position
    if 0 < position < n:
        fields[F_RANK.value], fields[F_COUNT.value] = position, n
    else:
        fields[F_DONE.value] = 1
    return fields


# Float64 parameters, passed in a tensor: a Python float argument would arrive as float32.
P_DELLA_LOW: tl.constexpr = tl.constexpr(0)  # K − ε
P_DELLA_SPAN: tl.constexpr = tl.constexpr(1)  # 2ε
P_ROW_GAPS: tl.constexpr = tl.constexpr(2)  # L − 1 (1 when L = 1)
P_DENSITY: tl.constexpr = tl.constexpr(3)  # K
P_L1_EPS: tl.constexpr = tl.constexpr(4)


def float_params(density: float, epsilon: float, row_len: int, l1_eps: float) -> list[float]:
    """The P_* fields, computed in Python's float64 exactly as contract.della_probability does."""
    return [density - epsilon, 2.0 * epsilon, float(max(row_len - 1, 1)), density, l1_eps]


# Counters read back once at the end.
S_KEPT: tl.constexpr = tl.constexpr(0)
S_NONFINITE: tl.constexpr = tl.constexpr(1)
S_FALLBACKS: tl.constexpr = tl.constexpr(2)

_TIE: tl.constexpr = tl.constexpr(STREAM_TIE)
_DROP: tl.constexpr = tl.constexpr(STREAM_DROP)
_TWO_POW_M32: tl.constexpr = tl.constexpr(2.0**-32)
