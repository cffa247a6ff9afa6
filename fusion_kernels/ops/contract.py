"""Host-side numbers of SPEC.md that every backend shares: counts, selection windows, thresholds,
scales and the per-tensor result. Backends call these so the count rules exist exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..hashing import TWO_POW_M32
from ..params import MergeParams

#: Below this, an l1 sum counts as zero and the l1 scale stays 1 (SPEC "rescale").
L1_EPS = 1e-7


@dataclass
class KernelStats:
    """What a backend reports for one tensor (SPEC "What a merge reports per tensor").

    kept: entries kept by suppress; restored: neurons in R; fallbacks: rescale neurons that fell
    back to replace; l1_scale: the l1 rescale factor applied (1.0 when none).
    """

    kept: int
    restored: int = 0
    fallbacks: int = 0
    l1_scale: float = 1.0


def count(fraction: float, n: int) -> int:
    """``int(F · n)``, truncating, in double precision."""
    return int(float(fraction) * n)


def magnitude_window(params: MergeParams, n: int) -> tuple[int, int]:
    """``(t, k)``: magnitude and breadcrumbs keep positions ``[t, t + k)`` of the SPEC order."""
    density = params.density
    if params.suppress == "magnitude":
        if density >= 1.0:
            return 0, n
        if density <= 0.0:
            return 0, 0
        return 0, min(n, max(1, count(density, n)))
    if params.suppress == "breadcrumbs":
        k = count(density, n)
        return min(count(params.gamma, n), n - k), k
    raise ValueError(f"no magnitude window for suppress={params.suppress!r}")


def neuron_count(top_neurons: float, n_neurons: int) -> int:
    """m: how many neurons are restored (0 for M = 0, else at least one)."""
    if top_neurons <= 0.0 or n_neurons == 0:
        return 0
    return min(n_neurons, max(1, count(top_neurons, n_neurons)))


def random_keep_threshold(density: float) -> int:
    """T such that ``u(i) < K  ⇔  h_DROP(i) < T`` for integer hashes (exact: K·2^32 is exact)."""
    return min(2**32, max(0, math.ceil(density * 2.0**32)))


def della_probability(density: float, epsilon: float, rank, row_len: int):
    """p(i) for rank r in a row of length L, in float64; ``rank`` may be a float64 tensor.

    Evaluated as ``(K − ε) + ((2ε) · r) / (L − 1)`` left to right, so every backend rounds alike.
    """
    if row_len == 1:
        return density + 0.0 * rank
    return (density - epsilon) + ((2.0 * epsilon) * rank) / float(row_len - 1)


def inverse_scale_random(density: float) -> float:
    """The ``inverse`` rescale of random: 1/K (1 when K = 0, where nothing is kept)."""
    return 1.0 / density if density > 0 else 1.0


def l1_scale(total_abs: float, kept_abs: float) -> float:
    """``Σ|Δ| / Σ_S|Δ|``, left at 1 when either sum < 1e-7."""
    if total_abs < L1_EPS or kept_abs < L1_EPS:
        return 1.0
    return total_abs / kept_abs


__all__ = [
    "L1_EPS",
    "TWO_POW_M32",
    "KernelStats",
    "count",
    "della_probability",
    "inverse_scale_random",
    "l1_scale",
    "magnitude_window",
    "neuron_count",
    "random_keep_threshold",
]
