"""The reference against mergekit's sparsify functions (mergekit is a test oracle only)."""

import pytest
import torch
from conftest import assert_tensors_equal, make_pair

from fusion_kernels import merge_tensor

sparsify = pytest.importorskip(
    "mergekit.sparsify", reason="mergekit is installed by the test extra"
)


def untied_pair(shape, seed):
    """A float32 pair whose |Δ| are all distinct (a permutation of multiples of 2^-16, exact in
    float32 next to base in [1, 1.5)), so any correct top-k picks the same set."""
    gen = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    base = 1 + 0.5 * torch.rand(shape, generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    delta = (torch.randperm(n, generator=gen) + 1).reshape(shape) * 2.0**-16 * sign
    tuned = base + delta
    assert torch.equal(tuned - base, delta)
    return base, tuned


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(64, 48), (257, 31), (1, 1000)], ids=str)
def test_ties_equals_mergekit_magnitude_on_float32_without_ties(density, shape):
    base, tuned = untied_pair(shape, seed=11)
    delta = tuned - base
    ours, stats = merge_tensor(base, tuned, "w", suppress="magnitude", density=density, method=None)
    theirs = sparsify.magnitude(delta, density=density)
    assert stats.kept == int((theirs != 0).sum())
    assert_tensors_equal(ours, base + theirs, f"ties density {density}")


@pytest.mark.parametrize("density,gamma", [(0.2, 0.01), (0.3, 0.1), (0.9, 0.2), (0.5, 0.0)])
@pytest.mark.parametrize("shape", [(64, 48), (257, 31)], ids=str)
def test_breadcrumbs_equals_mergekit_magnitude_outliers(density, gamma, shape):
    base, tuned = untied_pair(shape, seed=12)
    delta = tuned - base
    ours, stats = merge_tensor(
        base, tuned, "w", suppress="breadcrumbs", density=density, gamma=gamma, method=None
    )
    theirs = sparsify.magnitude_outliers(delta, density=density, gamma=gamma)
    assert stats.kept == int((theirs != 0).sum())
    assert_tensors_equal(ours, base + theirs, f"breadcrumbs density {density} gamma {gamma}")


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
@pytest.mark.parametrize("method", ["random", "della"])
def test_dare_and_della_kept_fraction_and_l1_norm_match_mergekit(method, density):
    base, tuned = make_pair((512, 512), torch.float32, seed=13)
    delta = tuned - base
    torch.manual_seed(0)
    if method == "random":
        ours, stats = merge_tensor(
            base, tuned, "w", suppress="random", density=density, method=None
        )
        theirs = sparsify.bernoulli(delta, density=density, rescale_norm=sparsify.RescaleNorm.l1)
    else:
        ours, stats = merge_tensor(
            base, tuned, "w", suppress="della", density=density, epsilon=0.05, method=None
        )
        theirs = sparsify.della_magprune(
            delta, density=density, epsilon=0.05, rescale_norm=sparsify.RescaleNorm.l1
        )
    n = delta.numel()
    our_delta = (ours.double() - base.double()).abs()
    assert stats.kept / n == pytest.approx(density, rel=0.01)
    assert int((theirs != 0).sum()) / n == pytest.approx(density, rel=0.01)
    assert our_delta.sum().item() == pytest.approx(theirs.double().abs().sum().item(), rel=0.01)
    assert our_delta.sum().item() == pytest.approx(delta.double().abs().sum().item(), rel=0.01)
