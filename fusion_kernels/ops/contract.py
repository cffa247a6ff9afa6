"""Host-side numbers of SPEC.md that every backend shares: counts, selection windows, thresholds,
scales, the per-tensor plan (:func:`plan_tensor`) and the per-tensor result. Backends read the
plan instead of deriving these numbers, so each rule exists exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..hashing import TWO_POW_M32, model_tensor_seed
from ..params import MergeParams

#: Below this, an l1 sum counts as zero and the l1 scale stays 1 (SPEC "rescale").
L1_EPS = 1e-7
#: SPEC "Selection modes": approx keeps within 0.1 % of n of the exact count.
APPROX_TOLERANCE = 1e-3
#: SPEC "Selection modes": approx bins entries by the top 16 of the 31 float32 bits of |Δ|.
APPROX_BIN_SHIFT = 15
APPROX_BINS = 1 << 16


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


@dataclass
class MultiKernelStats:
    """What a backend reports for one tensor merged from several tuned models (SPEC "Several
    tuned models"): each model's :class:`KernelStats`, in model order, and ``dropped``, the
    entries (model, index) whose weighted delta was not zero and consensus dropped."""

    models: list[KernelStats]
    dropped: int = 0


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


def approx_cut(position: int, n: int, slack: int, histogram) -> int:
    """SPEC "Selection modes": the SPEC position where select=approx places a cut at ``position``.

    ``histogram[b]`` counts the entries whose |Δ| float32 bits, shifted right by
    :data:`APPROX_BIN_SHIFT`, equal b. The bin holding ``position`` starts at the number of
    entries in the bins above it and ends ``histogram[b]`` later; the cut moves to the nearer of
    the two edges (the start on a tie) when that is at most ``slack`` positions away, and stays
    at ``position`` otherwise. Integer counts only, so every backend lands on the same edge.
    """
    if position <= 0 or position >= n:
        return position
    edges = np.concatenate(([0], np.cumsum(np.asarray(histogram, dtype=np.int64)[::-1])))
    bin_ = int(np.searchsorted(edges, position, side="right")) - 1
    start, end = int(edges[bin_]), int(edges[bin_ + 1])
    edge = start if position - start <= end - position else end
    return edge if abs(edge - position) <= slack else position


@dataclass(frozen=True)
class TensorPlan:
    """Everything SPEC fixes about one tensor's merge before its entries are read.

    Every fast backend reads these numbers from here; the kernels then work on the tensor as a
    row-major ``[rows, cols]`` matrix.
    """

    rows: int  # leading dimensions flattened; a scalar is 1 x 1
    cols: int  # the last dimension
    axis: str  # the neuron axis: row, col or none
    rescale: str  # the rescale mode in force for random/della; none for the other methods
    window_start: int  # magnitude/breadcrumbs keep SPEC positions [t, t + k); 0 otherwise
    window_len: int  # k; 0 for the other methods
    drop_threshold: int  # random keeps i iff h_DROP(i) < T; 0 for the other methods
    random_scale: float  # random with rescale=inverse: 1/K as float32; 1 otherwise
    restored_neurons: int  # m: neurons restored (0 when restore or axis is none)
    tensor_seed: int  # seed of the entry hashes
    approx_slack: int  # select=approx: the largest |kept - k| allowed; 0 when exact
    weight: float  # α, rounded to float32 as the merge applies it

    @property
    def n(self) -> int:
        return self.rows * self.cols

    @property
    def window_cuts(self) -> tuple[int, int]:
        """SPEC positions t and t + k of the window's cuts (both 0 for non-window methods)."""
        return self.window_start, self.window_start + self.window_len

    @property
    def active_cuts(self) -> int:
        """How many cuts need a selection: those strictly inside the order."""
        return sum(0 < cut < self.n for cut in self.window_cuts)

    @property
    def cut_slack(self) -> int:
        """select=approx: how far each cut may move (the slack split between the active cuts)."""
        return self.approx_slack // max(1, self.active_cuts)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The tensor as 2-D ``(rows, cols)``: leading dimensions flattened; a scalar is 1 x 1."""
    shape = tuple(shape)
    return (math.prod(shape[:-1]), shape[-1]) if shape else (1, 1)


def plan_tensor(
    params: MergeParams, shape: tuple[int, ...], axis: str, name: str, model: int = 1
) -> TensorPlan:
    """The :class:`TensorPlan` of merging tensor ``name`` of ``shape`` along ``axis``; ``model``
    is the tuned model's place (1-based) in a merge of several, which picks its hash seed."""
    rows, cols = matrix_shape(shape)
    n = rows * cols
    method = params.suppress
    windowed = method in ("magnitude", "breadcrumbs")
    start, k = magnitude_window(params, n) if windowed else (0, 0)
    random_scale = 1.0
    if method == "random" and params.rescale_mode == "inverse":
        random_scale = float(np.float32(inverse_scale_random(params.density)))
    restoring = params.restore != "none" and axis != "none"
    neurons = {"row": rows, "col": cols}.get(axis, 0)
    return TensorPlan(
        rows=rows,
        cols=cols,
        axis=axis,
        rescale=params.rescale_mode if method in ("random", "della") else "none",
        window_start=start,
        window_len=k,
        drop_threshold=random_keep_threshold(params.density) if method == "random" else 0,
        random_scale=random_scale,
        restored_neurons=neuron_count(params.top_neurons, neurons) if restoring else 0,
        tensor_seed=model_tensor_seed(params.seed, name, model),
        approx_slack=count(APPROX_TOLERANCE, n) if params.select == "approx" else 0,
        weight=float(np.float32(params.weight)),
    )


__all__ = [
    "APPROX_BINS",
    "APPROX_BIN_SHIFT",
    "APPROX_TOLERANCE",
    "L1_EPS",
    "TWO_POW_M32",
    "KernelStats",
    "MultiKernelStats",
    "TensorPlan",
    "approx_cut",
    "count",
    "della_probability",
    "inverse_scale_random",
    "l1_scale",
    "magnitude_window",
    "matrix_shape",
    "neuron_count",
    "plan_tensor",
    "random_keep_threshold",
]
