"""Shared test helpers: generated tensor pairs, poisoned outputs, the method matrix, verbose
comparisons that say how many elements differ, where and by how much, and the one conformance
check of a backend against the torch reference (:func:`assert_matches_reference`)."""

from __future__ import annotations

import math
import os

# Nothing in the suite may reach the Hub: lm-eval, datasets and transformers read local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

# Shapes that catch tails and edge cases: 1×1, one row, one column, primes, non-multiples of
# any block size, and a 3-D tensor (neuron axes need 2-D, so 3-D runs with axis none).
AWKWARD_SHAPES = [(1, 1), (1, 37), (41, 1), (7, 13), (31, 17), (64, 48), (257, 3), (3, 5, 7)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# suppress × restore × rescale combinations; every fast backend runs all of them.
METHOD_CASES = [
    dict(suppress="none", weight=0.5),
    dict(suppress="none", weight=0.5, restore="replace", top_neurons=0.3),
    dict(suppress="magnitude", density=0.2),
    dict(suppress="magnitude", density=1.0),
    dict(suppress="magnitude", density=0.0),
    dict(suppress="magnitude", density=0.2, restore="replace", top_neurons=0.3),
    dict(suppress="magnitude", density=0.05, restore="rescale", top_neurons=0.5),
    dict(suppress="magnitude", density=0.3, restore="rescale", top_neurons=0.0),
    dict(suppress="breadcrumbs", density=0.2, gamma=0.05),
    dict(suppress="breadcrumbs", density=0.3, gamma=0.1, restore="replace", weight=0.7),
    dict(suppress="breadcrumbs", density=0.2, gamma=0.01, restore="rescale"),
    dict(suppress="random", density=0.3),
    dict(suppress="random", density=0.3, rescale="inverse", restore="rescale"),
    dict(suppress="random", density=0.5, rescale="none", restore="replace", seed=7),
    dict(suppress="della", density=0.4, epsilon=0.1),
    dict(suppress="della", density=0.4, epsilon=0.2, rescale="inverse", restore="rescale"),
    dict(suppress="della", density=0.3, epsilon=0.1, rescale="none", weight=2.0, seed=3),
]


def case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


def make_pair(
    shape, dtype=torch.float32, seed: int = 0, scale: float = 0.02, tied: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A base tensor and a tuned tensor near it, in ``dtype``.

    ``tied=True`` draws the delta from a few magnitudes so |Δ| has many exact ties.
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    if tied:
        levels = torch.tensor([0.0, 0.25, 0.5, 1.0]) * scale
        pick = torch.randint(0, 4, shape, generator=gen)
        sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        tuned = (base.float() + levels[pick] * sign).to(dtype)
    else:
        tuned = (base.float() + scale * torch.randn(shape, generator=gen)).to(dtype)
    return base, tuned


# (base dtype, tuned dtype) of locate's change scores: the three float dtypes, and a pair that
# differs.
DTYPE_PAIRS = {
    "f32": (torch.float32, torch.float32),
    "f16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "f16-bf16": (torch.float16, torch.bfloat16),
}
#: Change scores are float64 sums of the same float32 |Δ| in another order: with non-negative
#: summands each sum's relative rounding error is at most (depth of its summation tree) × 2^-53,
#: about 1e-14 at test sizes. 1e-12 leaves room for that and nothing else: an entry read twice or
#: missed moves a sum by ~1/n of it, far more.
SCORES_RTOL = 1e-12


def make_dtype_pair(shape, dtypes, seed: int = 0, device="cpu"):
    """:func:`make_pair` in float32, then base and tuned in ``dtypes`` (one of DTYPE_PAIRS)."""
    base, tuned = make_pair(shape, torch.float32, seed=seed)
    return base.to(device, dtypes[0]), tuned.to(device, dtypes[1])


def assert_scores_close(got, want, what: str = "") -> None:
    """``(Σ|Δ|, C(j) or None)`` of a backend against the reference's, within SCORES_RTOL."""
    (total, scores), (want_total, want_scores) = got, want
    assert math.isclose(total, want_total, rel_tol=SCORES_RTOL, abs_tol=0), (
        f"{what}: {total} != {want_total}"
    )
    if want_scores is None:
        assert scores is None, what
        return
    assert scores.dtype == torch.float64, what
    torch.testing.assert_close(scores.cpu(), want_scores.cpu(), rtol=SCORES_RTOL, atol=0, msg=what)


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so an element a kernel forgets to write fails the test."""
    return torch.full_like(t, float("nan"))


def assert_tensors_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bitwise equality (NaN-safe), with a report of how many, where and how much on failure."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.reshape(-1), expected.reshape(-1)
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    differ = a.view(int_type) != e.view(int_type)
    if bool(differ.any()):
        where = differ.nonzero().reshape(-1)
        first = where[:5].tolist()
        gap = (a.float() - e.float()).abs()[differ]
        raise AssertionError(
            f"{what}: {len(where)} of {a.numel()} elements differ; first at flat {first}: "
            f"actual {a[where[:5]].tolist()} expected {e[where[:5]].tolist()}; "
            f"max |diff| {gap.max().item():.3g}"
        )


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of the tensors' dtype (same sign assumed near equal)."""
    int_type = {2: torch.int16, 4: torch.int32}[actual.element_size()]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.reshape(-1).view(int_type).to(torch.int64)
        sign_bit = 1 << (8 * t.element_size() - 1)
        return torch.where(bits < 0, -(bits + sign_bit), bits)

    return (ordered(actual) - ordered(expected)).abs()


def assert_within_ulp(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1, what: str = ""):
    """Values within ``ulps`` units in the last place of their dtype; NaN nowhere."""
    assert not bool(torch.isnan(actual).any()), f"{what}: output has NaN (unwritten elements?)"
    dist = ulp_distance(actual, expected)
    if bool((dist > ulps).any()):
        where = (dist > ulps).nonzero().reshape(-1)[:5].tolist()
        raise AssertionError(
            f"{what}: {(dist > ulps).sum().item()} elements more than {ulps} ulp apart "
            f"(max {dist.max().item()}); first at {where}"
        )


def double_summed_scale(params, axis: str) -> bool:
    """Whether a scale of this merge is a ratio of sums taken in double: the l1 rescale, and
    restore=rescale's C(j)/C'(j) on a neuron axis."""
    l1 = params.suppress in ("random", "della") and params.rescale_mode == "l1"
    return l1 or (params.restore == "rescale" and axis != "none")


def assert_matches_reference(
    backend: str, base, tuned, name: str, axis: str, params, what: str = "", **options
):
    """Run ``backend``'s kernel (from the registry, on the tensors' device) into a NaN-poisoned
    output and check it against the torch reference; returns the backend's stats.

    Kept counts, restored neurons and fallbacks must be equal, and the values bit for bit, except
    where a scale is a ratio of double sums (see :func:`double_summed_scale`): their last bit may
    depend on the summation order, so SPEC.md allows the scale within 1 float32 ulp and the
    values within 1 ulp of the output dtype there. ``options`` go to the kernel as they are
    (the cpp backend's threads, sample_size, collect_cap).
    """
    from fusion_kernels.ops import select_backend
    from fusion_kernels.ops.reference import merge_reference

    expected, actual = poisoned_like(base), poisoned_like(base)
    want = merge_reference(base, tuned, expected, name, axis, params)
    kernel = select_backend(backend, base.device.type).kernel()
    got = kernel(base, tuned, actual, name, axis, params, **options)
    what = f"{backend} {what} axis={axis} {tuple(base.shape)} {base.dtype}"
    assert_same_merge(actual, got, expected, want, params, axis, what)
    return got


def assert_same_merge(out, stats, ref_out, ref_stats, params, axis: str, what: str = "") -> None:
    """The comparison rule of :func:`assert_matches_reference`, for outputs already computed."""
    assert (stats.kept, stats.restored, stats.fallbacks) == (
        ref_stats.kept,
        ref_stats.restored,
        ref_stats.fallbacks,
    ), f"{what}: stats {stats} != reference {ref_stats}"
    if not double_summed_scale(params, axis):
        assert stats.l1_scale == ref_stats.l1_scale, what
        assert_tensors_equal(out, ref_out, what)
    else:
        assert math.isclose(stats.l1_scale, ref_stats.l1_scale, rel_tol=2**-23, abs_tol=0), what
        assert_within_ulp(out, ref_out, 1, what)


@pytest.fixture
def tmp_checkpoints(tmp_path):
    """A directory for generated checkpoints."""
    return tmp_path


def pytest_report_header(config):
    from fusion_kernels import available_backends

    interp = os.environ.get("TRITON_INTERPRET", "")
    return (
        f"fusion_kernels backends available: {available_backends()} (TRITON_INTERPRET={interp!r})"
    )
