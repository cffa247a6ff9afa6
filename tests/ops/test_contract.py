"""The per-tensor plan every fast backend reads (``contract.plan_tensor``), against SPEC's rules
written out by hand."""

from __future__ import annotations

import dataclasses

import pytest

from fusion_kernels.hashing import tensor_seed
from fusion_kernels.ops.contract import APPROX_TOLERANCE, TensorPlan, matrix_shape, plan_tensor
from fusion_kernels.params import params_for

NAME = "model.layers.2.mlp.up_proj.weight"


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((), (1, 1)), ((7,), (1, 7)), ((7, 13), (7, 13)), ((3, 5, 7), (15, 7)), ((0, 5), (0, 5))],
    ids=str,
)
def test_matrix_shape_flattens_leading_dimensions(shape, expected):
    assert matrix_shape(shape) == expected
    plan = plan_tensor(params_for(), shape, "none", NAME)
    assert (plan.rows, plan.cols, plan.n) == (*expected, expected[0] * expected[1])


@pytest.mark.parametrize(
    ("density", "expected_k"), [(0.0, 0), (0.0001, 1), (0.2, 18), (0.999, 90), (1.0, 91)]
)
def test_magnitude_window_keeps_int_k_n_and_at_least_one(density, expected_k):
    plan = plan_tensor(params_for(suppress="magnitude", density=density), (7, 13), "row", NAME)
    assert (plan.window_start, plan.window_len) == (0, expected_k)
    assert plan.window_cuts == (0, expected_k)
    assert plan.active_cuts == (1 if 0 < expected_k < 91 else 0)


def test_breadcrumbs_window_drops_the_top_gamma_and_stays_inside_the_order():
    params = params_for(suppress="breadcrumbs", density=0.2, gamma=0.05)
    plan = plan_tensor(params, (100,), "none", NAME)
    assert (plan.window_start, plan.window_len, plan.active_cuts) == (5, 20, 2)
    # t is clamped so the window ends at n at the latest.
    plan = plan_tensor(params.replace(density=0.3, gamma=0.9), (100,), "none", NAME)
    assert plan.window_cuts == (70, 100) and plan.active_cuts == 1


def test_random_threshold_and_inverse_scale():
    plan = plan_tensor(params_for(suppress="random", density=0.3), (10, 10), "row", NAME)
    assert plan.drop_threshold == 1288490189  # ceil(0.3 * 2^32)
    assert plan.rescale == "l1" and plan.random_scale == 1.0
    inverse = params_for(suppress="random", density=0.3, rescale="inverse")
    plan = plan_tensor(inverse, (10, 10), "row", NAME)
    assert plan.rescale == "inverse"
    assert plan.random_scale == pytest.approx(1 / 0.3, rel=2**-24) and plan.random_scale != 1 / 0.3
    for method in ("none", "magnitude", "della"):
        plan = plan_tensor(params_for(suppress=method, density=0.3), (10, 10), "row", NAME)
        assert plan.drop_threshold == 0 and plan.random_scale == 1.0
        assert plan.rescale == ("l1" if method == "della" else "none")
    for method in ("none", "magnitude", "random", "della"):
        plan = plan_tensor(params_for(suppress=method, density=0.3), (10, 10), "row", NAME)
        windowed = method == "magnitude"
        assert (plan.window_start, plan.window_len) == ((0, 30) if windowed else (0, 0))


@pytest.mark.parametrize(
    ("restore", "axis", "top", "expected"),
    [
        ("replace", "row", 0.3, 2),  # int(0.3 * 7)
        ("replace", "col", 0.3, 3),  # int(0.3 * 13)
        ("rescale", "row", 0.01, 1),  # at least one
        ("replace", "row", 0.0, 0),  # M = 0 restores none
        ("replace", "none", 0.3, 0),
        ("none", "row", 0.3, 0),
    ],
)
def test_restored_neuron_count(restore, axis, top, expected):
    params = params_for(suppress="magnitude", density=0.2, restore=restore, top_neurons=top)
    assert plan_tensor(params, (7, 13), axis, NAME).restored_neurons == expected


def test_seed_weight_and_approx_slack():
    params = params_for(suppress="magnitude", density=0.2, seed=9, weight=0.1)
    plan = plan_tensor(params, (1000, 10), "none", NAME)
    assert (
        plan.tensor_seed
        == tensor_seed(9, NAME)
        != plan_tensor(params, (1,), "none", "x").tensor_seed
    )
    assert plan.weight == 0.10000000149011612  # 0.1 as float32
    assert plan.approx_slack == 0
    approx = plan_tensor(params.replace(select="approx"), (1000, 10), "none", NAME)
    assert approx.approx_slack == int(APPROX_TOLERANCE * 10_000) == 10


def test_the_plan_is_frozen():
    plan = plan_tensor(params_for(), (4, 4), "row", NAME)
    assert isinstance(plan, TensorPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.rows = 5
