"""The torch reference against SPEC.md: an independent oracle, and the properties SPEC promises."""

import pytest
import torch
from conftest import (
    AWKWARD_SHAPES,
    DTYPES,
    METHOD_CASES,
    assert_tensors_equal,
    case_id,
    make_pair,
    poisoned_like,
)
from spec_oracle import spec_merge

from fusion_kernels import merge_tensor
from fusion_kernels.errors import NonFiniteDeltaError, ParameterError

NAME = "model.layers.3.mlp.up_proj.weight"


@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
@pytest.mark.parametrize("axis", ["row", "col", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_equals_independent_oracle(case, axis, dtype):
    shape = (9, 11)
    for tied in (False, True):
        base, tuned = make_pair(shape, dtype, seed=hash((axis, str(dtype))) % 1000, tied=tied)
        out = poisoned_like(base)
        merged, stats = merge_tensor(
            base, tuned, NAME, axis=axis, out=out, backend="torch", **case, method=None
        )
        expected, kept, restored, fallbacks, l1 = spec_merge(base, tuned, NAME, axis, case)
        assert merged.data_ptr() == out.data_ptr()
        assert_tensors_equal(merged, expected, f"tied={tied}")
        assert (stats.kept, stats.restored, stats.fallbacks) == (kept, restored, fallbacks)
        assert stats.l1_scale == pytest.approx(l1, rel=1e-6)


@pytest.mark.parametrize("shape", AWKWARD_SHAPES, ids=str)
def test_reference_on_awkward_shapes_equals_oracle(shape):
    case = dict(suppress="della", density=0.4, epsilon=0.2, rescale="inverse")
    base, tuned = make_pair(shape, torch.bfloat16, seed=1, tied=True)
    merged, stats = merge_tensor(
        base, tuned, NAME, axis="none", backend="torch", **case, method=None
    )
    expected, kept, *_ = spec_merge(base, tuned, NAME, "none", case)
    assert_tensors_equal(merged, expected)
    assert stats.kept == kept


@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.2, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (257, 3)], ids=str)
def test_magnitude_keeps_exact_count(density, shape):
    base, tuned = make_pair(shape, torch.bfloat16, tied=True)
    n = base.numel()
    merged, stats = merge_tensor(
        base, tuned, "x", suppress="magnitude", density=density, method=None
    )
    expected = n if density >= 1 else 0 if density <= 0 else max(1, int(density * n))
    assert stats.kept == expected
    changed = (merged.float() != base.float()).sum().item()
    assert changed <= expected


def test_breadcrumbs_drops_the_largest_then_keeps_the_next_k():
    base = torch.zeros(100)
    tuned = torch.arange(1, 101, dtype=torch.float32)
    merged, stats = merge_tensor(
        base, tuned, "b", suppress="breadcrumbs", density=0.2, gamma=0.05, method=None
    )
    assert stats.kept == 20
    kept_values = sorted(merged[merged != 0].tolist())
    assert kept_values == list(range(76, 96)), "the 5 largest are outliers, the next 20 are kept"


def test_ties_among_equal_magnitudes_follow_the_tie_hash_then_index():
    # Every |Δ| is equal, so the kept set is decided by h_TIE alone; it must differ by seed
    # and be exactly the oracle's set.
    base = torch.zeros(64, 64, dtype=torch.bfloat16)
    tuned = torch.full((64, 64), 0.5, dtype=torch.bfloat16)
    masks = []
    for seed in (0, 1):
        merged, stats = merge_tensor(
            base, tuned, NAME, suppress="magnitude", density=0.1, seed=seed, method=None
        )
        expected, kept, *_ = spec_merge(
            base, tuned, NAME, "none", dict(suppress="magnitude", density=0.1, seed=seed)
        )
        assert_tensors_equal(merged, expected)
        assert stats.kept == kept == int(0.1 * 64 * 64)
        masks.append(merged != 0)
    assert not torch.equal(masks[0], masks[1]), "the seed must change which ties are kept"
    # The kept entries are not simply the first indices (that would be a biased tie-break).
    assert masks[0].reshape(-1)[: stats.kept].sum() < stats.kept


@pytest.mark.parametrize("axis", ["row", "col"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_replace_restores_neurons_bit_identical_to_tuned(axis, dtype):
    # Δ is exact here (tuned within a factor 2 of base, Sterbenz), so base + Δ == tuned bit for bit.
    # For float32 pairs far apart, SPEC's base + Δ can differ from tuned in the last bit.
    base, tuned = make_pair((48, 40), dtype, seed=3, scale=0.01)
    base, tuned = (base.float().abs() + 1).to(dtype), (tuned.float().abs() + 1).to(dtype)
    # Plant three large-change neurons; they must be the restored ones.
    planted = [2, 17, 30]
    if axis == "row":
        tuned[planted] = (tuned[planted].float() + 0.5).to(dtype)
    else:
        tuned[:, planted] = (tuned[:, planted].float() + 0.5).to(dtype)
    merged, stats = merge_tensor(
        base,
        tuned,
        "w",
        axis=axis,
        suppress="magnitude",
        density=0.1,
        restore="replace",
        top_neurons=3 / 40 + 1e-9,
        method=None,
    )
    assert stats.restored == 3
    view_m, view_t = (merged, tuned) if axis == "row" else (merged.t(), tuned.t())
    assert_tensors_equal(view_m[planted], view_t[planted])
    others = [j for j in range(view_m.shape[0]) if j not in planted]
    assert not torch.equal(view_m[others], view_t[others])


@pytest.mark.parametrize("axis", ["row", "col"])
def test_rescale_restores_the_change_score_of_restored_neurons(axis):
    base, tuned = make_pair((32, 24), torch.float32, seed=5)
    merged, stats = merge_tensor(
        base,
        tuned,
        "w",
        axis=axis,
        suppress="magnitude",
        density=0.2,
        restore="rescale",
        top_neurons=0.25,
        method=None,
    )
    dim = 1 if axis == "row" else 0
    change = (tuned - base).abs().double().sum(dim)
    new_change = (merged - base).abs().double().sum(dim)
    top = torch.sort(change, descending=True, stable=True).indices[: stats.restored]
    torch.testing.assert_close(new_change[top], change[top], rtol=1e-5, atol=0)
    assert stats.fallbacks == 0


def test_rescale_falls_back_to_replace_when_nothing_was_kept():
    base, tuned = make_pair((10, 10), torch.float32, seed=6)
    merged, stats = merge_tensor(
        base,
        tuned,
        "w",
        axis="row",
        suppress="magnitude",
        density=0.0,
        restore="rescale",
        top_neurons=0.3,
        method=None,
    )
    assert stats.kept == 0 and stats.restored == 3 and stats.fallbacks == 3
    top = torch.sort((tuned - base).abs().double().sum(1), descending=True, stable=True).indices[:3]
    assert torch.equal(merged[top], tuned[top])


@pytest.mark.parametrize("method", ["random", "della"])
def test_l1_rescale_preserves_the_l1_norm(method):
    base, tuned = make_pair((200, 300), torch.float32, seed=8)
    extra = dict(epsilon=0.1) if method == "della" else {}
    merged, stats = merge_tensor(
        base, tuned, "w", suppress=method, density=0.3, **extra, method=None
    )
    delta = (tuned - base).abs().double().sum().item()
    new = (merged.double() - base.double()).abs().sum().item()
    assert stats.l1_scale > 1
    assert new == pytest.approx(delta, rel=1e-3)
    assert stats.kept / base.numel() == pytest.approx(0.3, abs=0.01)


def test_weight_scales_the_suppressed_delta_but_not_replaced_neurons():
    base, tuned = make_pair((20, 16), torch.float32, seed=9)
    half, _ = merge_tensor(base, tuned, "w", axis="none", suppress="none", weight=0.5, method=None)
    torch.testing.assert_close(half - base, 0.5 * (tuned - base), rtol=1e-5, atol=1e-7)
    merged, stats = merge_tensor(
        base,
        tuned,
        "w",
        axis="row",
        suppress="none",
        weight=0.0,
        restore="replace",
        top_neurons=0.25,
        method=None,
    )
    restored = (merged == tuned).all(dim=1)
    assert restored.sum().item() == stats.restored == 5
    assert torch.equal(merged[~restored], base[~restored])


def test_nonfinite_delta_is_an_error_naming_the_tensor_or_copied_on_request():
    base, tuned = make_pair((4, 4))
    tuned[1, 2] = float("inf")
    with pytest.raises(NonFiniteDeltaError, match=r"layers\.0\.x"):
        merge_tensor(base, tuned, "layers.0.x", suppress="magnitude", method=None)
    merged, stats = merge_tensor(
        base, tuned, "layers.0.x", suppress="magnitude", allow_nonfinite=True, method=None
    )
    assert stats.action == "copy-nonfinite"
    assert torch.equal(merged, tuned)


@pytest.mark.parametrize(
    "bad",
    [
        dict(density=1.5),
        dict(density=-0.1),
        dict(top_neurons=2.0),
        dict(gamma=1.0),
        dict(suppress="della", density=0.1, epsilon=0.15),
        dict(suppress="nope"),
        dict(suppress="magnitude", rescale="l1"),
        dict(weight=float("nan")),
    ],
    ids=str,
)
def test_bad_parameters_are_rejected(bad):
    base, tuned = make_pair((4, 4))
    with pytest.raises(ParameterError):
        merge_tensor(base, tuned, "x", **bad, method=None)


def test_default_axis_comes_from_the_name_and_3d_tensors_have_no_neurons():
    base, tuned = make_pair((8, 6))
    _, stats = merge_tensor(
        base, tuned, "model.layers.0.self_attn.o_proj.weight", method="neu-p-ties"
    )
    assert stats.axis == "col" and stats.restored == int(0.3 * 6)
    _, stats = merge_tensor(base, tuned, "model.layers.0.mlp.up_proj.weight", method="neu-p-ties")
    assert stats.axis == "row" and stats.restored == int(0.3 * 8)
    b3, t3 = make_pair((2, 3, 4))
    _, stats = merge_tensor(b3, t3, "model.layers.0.mlp.up_proj.weight", method="neu-p-ties")
    assert stats.axis == "none" and stats.restored == 0
    with pytest.raises(ParameterError, match="needs 2-D"):
        merge_tensor(b3, t3, "x", axis="row", method="neu-p-ties")
