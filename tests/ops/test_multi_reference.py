"""The torch reference of a merge of several tuned models against SPEC.md: an independent oracle,
the one-model merge it must reduce to, and the parameters' rules."""

import pytest
import torch
from conftest import AWKWARD_SHAPES, DTYPES, assert_tensors_equal, poisoned_like
from multi_cases import COMBINES, combine_id, make_models, model_params
from spec_oracle_multi import spec_merge_multi

from fusion_kernels.errors import NonFiniteDeltaError, ParameterError
from fusion_kernels.hashing import model_tensor_seed, tensor_seed
from fusion_kernels.ops import KernelStats, merge_tensor, merge_tensors
from fusion_kernels.params import PRESETS, Combine, combine_for, params_for

NAME = "model.layers.3.mlp.up_proj.weight"


def _oracle_params(params) -> list[dict]:
    return [{**vars(p), "rescale": p.rescale_mode} for p in params]


def _check_against_oracle(base, tuned, axis, params, combine):
    merged, stats = merge_tensors(
        base, tuned, NAME, axis=axis, backend="torch", params=params, combine=combine,
        out=poisoned_like(base),
    )  # fmt: skip
    spec = {"consensus": combine.consensus, "normalize": combine.normalize}
    expected, counts, dropped = spec_merge_multi(
        base, tuned, NAME, axis, _oracle_params(params), {**spec, "lambda": combine.lambda_}
    )
    assert_tensors_equal(merged, expected)
    assert [(s.kept, s.restored, s.fallbacks) for s in stats.models] == [c[:3] for c in counts]
    assert [s.l1_scale for s in stats.models] == pytest.approx([c[3] for c in counts], rel=1e-6)
    assert stats.dropped == dropped


@pytest.mark.parametrize("combine", COMBINES, ids=combine_id)
@pytest.mark.parametrize("models", [1, 2, 3, 5])
@pytest.mark.parametrize("method", [*PRESETS, "mixed"])
def test_reference_equals_independent_oracle(method, models, combine):
    for axis, tied, dtype in (("row", False, torch.bfloat16), ("col", True, torch.float32)):
        base, tuned = make_models((9, 11), dtype, models, seed=models, tied=tied)
        params = model_params(method, models, mixed=method == "mixed")
        _check_against_oracle(base, tuned, axis, params, combine)


@pytest.mark.parametrize("shape", AWKWARD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_on_awkward_shapes_equals_oracle(shape, dtype):
    base, tuned = make_models(shape, dtype, 3, seed=len(shape), tied=True)
    axis = "row" if len(shape) == 2 else "none"
    _check_against_oracle(base, tuned, axis, model_params("", 3, mixed=True), Combine("sum", True))


@pytest.mark.parametrize("method", PRESETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", ["row", "col", "none"])
def test_one_model_is_the_one_model_merge_byte_for_byte(method, dtype, axis):
    for shape, tied in (((9, 11), True), ((1, 1), False), ((31, 17), False)):
        base, (tuned,) = make_models(shape, dtype, 1, seed=3, tied=tied)
        # A base holding −0 checks the sums' start: −0 + Δ' must stay what the one merge writes.
        base.view(-1)[0] = -0.0
        tuned.view(-1)[0] = -0.0
        one, one_stats = merge_tensor(base, tuned, NAME, axis=axis, method=method, backend="torch")
        many, stats = merge_tensors(base, [tuned], NAME, axis=axis, method=method, backend="torch")
        assert_tensors_equal(many, one, f"{method} {shape}")
        want = KernelStats(one_stats.kept, one_stats.restored, one_stats.fallbacks,
                           one_stats.l1_scale)  # fmt: skip
        assert stats.models == [want] and stats.dropped == 0


def test_model_one_draws_as_the_one_model_merge_and_the_others_differ():
    assert model_tensor_seed(7, NAME, 1) == tensor_seed(7, NAME)
    seeds = {model_tensor_seed(7, NAME, t) for t in range(1, 6)}
    assert len(seeds) == 5


def test_identical_models_with_dare_keep_different_entries():
    base, (tuned,) = make_models((16, 16), torch.float32, 1, seed=1)
    _, stats = merge_tensors(base, [tuned, tuned], NAME, method="dare", backend="torch")
    a, b = stats.models
    assert a.kept != b.kept or a.l1_scale != b.l1_scale


def test_consensus_drops_the_minority_sign():
    base = torch.zeros(4)
    tuned = [torch.tensor([1.0, 1.0, -1.0, 0.0]), torch.tensor([-3.0, 2.0, -1.0, 5.0])]
    # method=None: SPEC's field defaults (no suppress, no restore), so only consensus acts.
    plain = dict(backend="torch", method=None)
    out, stats = merge_tensors(base, tuned, "x", **plain, combine=Combine("sum"))
    # entry 0: 1 - 3 < 0 elects −, so model 1's +1 is dropped; entry 3: model 1's 0 is no drop.
    assert out.tolist() == [-3.0, 3.0, -2.0, 5.0] and stats.dropped == 1
    out, stats = merge_tensors(base, tuned, "x", **plain, combine=Combine("count", True))
    # entry 0: one vote each, a tie elects +: model 2's −3 is dropped, 1 / w = 1.
    assert out.tolist() == [1.0, 1.5, -1.0, 5.0] and stats.dropped == 1


def test_lambda_scales_the_combined_delta_and_normalize_divides_by_the_kept_weights():
    base = torch.zeros(2)
    tuned = [torch.tensor([2.0, 4.0]), torch.tensor([4.0, -4.0])]
    params = [params_for(None, weight=1.0), params_for(None, weight=3.0)]
    out, _ = merge_tensors(base, tuned, "x", backend="torch", params=params,
                           combine=Combine("none", True, 2.0))  # fmt: skip
    assert out.tolist() == [2.0 * (2.0 + 12.0) / 4.0, 2.0 * (4.0 - 12.0) / 4.0]


def test_presets_elect_signs_only_for_ties_with_several_models():
    assert combine_for("ties", 2).consensus == "sum"
    assert combine_for("neu-s-ties", 3).consensus == "sum"
    assert combine_for("ties", 1).consensus == "none"
    assert combine_for("dare", 3) == Combine()
    assert combine_for("ties", 2, normalize=True) == Combine("sum", True)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(params=[params_for("ties", seed=1), params_for("ties", seed=2)]),
        dict(params=[params_for("ties")]),
        dict(combine=Combine("majority")),
        dict(combine=Combine(lambda_=float("inf"))),
        dict(params=params_for("ties"), density=0.3),
    ],
)
def test_bad_parameters_are_refused(kwargs):
    base, tuned = make_models((3, 3), torch.float32, 2)
    with pytest.raises(ParameterError):
        merge_tensors(base, tuned, "x", backend="torch", **kwargs)


def test_a_non_finite_delta_in_any_model_errors_or_copies_tuned_one():
    base, tuned = make_models((3, 3), torch.float32, 2)
    tuned[1][1, 1] = float("inf")
    with pytest.raises(NonFiniteDeltaError):
        merge_tensors(base, tuned, "x", backend="torch")
    out, stats = merge_tensors(base, tuned, "x", backend="torch", allow_nonfinite=True)
    assert_tensors_equal(out, tuned[0])
    assert stats.action == "copy-nonfinite"


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "neu-p-ties"])
def test_one_model_keeps_the_sign_of_zero(method):
    # A negative weight makes W = −0 where Δ is 0 or dropped; on a −0 base the one-model merge
    # writes −0 + −0 = −0, so the sum over models must start from the first term, not from +0.
    base = torch.full((4, 6), -0.0)
    tuned = base.clone()
    tuned[0, :3] = torch.tensor([0.5, -0.25, 1.0])
    one, _ = merge_tensor(base, tuned, NAME, method=method, weight=-0.5, backend="torch")
    many, _ = merge_tensors(base, [tuned], NAME, method=method, weight=-0.5, backend="torch")
    assert_tensors_equal(many, one)
    assert torch.signbit(one).sum() > 3
