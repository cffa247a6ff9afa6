"""What only the fused C++ CPU backend has, against the torch reference: its selection routes
and kernel options (threads, sampled brackets, radix select), its instruction-set builds, approx
selection at large sizes, aliasing and layouts, and the extension's own argument checks. The
method matrix every backend runs is in test_conformance.py, through the same comparison.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPE_PAIRS,
    DTYPES,
    assert_matches_reference,
    assert_same_merge,
    assert_scores_close,
    case_id,
    make_dtype_pair,
    make_pair,
    poisoned_like,
)

from fusion_kernels import merge_tensor
from fusion_kernels.hashing import STREAM_TIE, entry_hash, tensor_seed
from fusion_kernels.ops.contract import magnitude_window, plan_tensor
from fusion_kernels.ops.cpp import kernel_args, scores_cpp
from fusion_kernels.ops.reference import (
    change_scores_reference,
    merge_reference,
    order_keys,
    spec_order,
)
from fusion_kernels.params import params_for

ext = pytest.importorskip(
    "fusion_kernels._cpp",
    reason="the C++ extension is not built (run `pip install -e .` with a C++ compiler)",
)

NAME = "model.layers.0.mlp.up_proj.weight"
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


# Cases that exercise each selection route and every mask kind on larger tensors.
ROUTE_CASES = [
    dict(suppress="magnitude", density=0.2),
    dict(suppress="magnitude", density=0.05, restore="rescale", top_neurons=0.5),
    dict(suppress="breadcrumbs", density=0.3, gamma=0.05, restore="replace"),
    dict(suppress="breadcrumbs", density=0.002, gamma=0.001),
    dict(suppress="breadcrumbs", density=0.3, gamma=0.7),
    dict(suppress="random", density=0.3, rescale="inverse", restore="rescale"),
    dict(suppress="della", density=0.4, epsilon=0.1, restore="replace"),
    dict(suppress="none", weight=0.5, restore="rescale"),
]
# Kernel options: the sampled brackets (default, one thread at these sizes, or two), brackets
# that mostly miss (a sample of 64), and the radix select alone, collecting at every level
# (cap 0) or after a few (cap 1000).
ROUTES = {
    "brackets": {},
    "brackets-2-threads": dict(threads=2),
    "tiny-sample-2-threads": dict(sample_size=64, threads=2),
    "radix-2-threads": dict(sample_size=0, threads=2),
    "radix-all-levels": dict(sample_size=0, collect_cap=0),
    "radix-cap1000": dict(sample_size=0, collect_cap=1000),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("axis", ["row", "col", "none"])
@pytest.mark.parametrize("case", ROUTE_CASES, ids=case_id)
def test_selection_routes(case, axis, route):
    params = params_for(**case)
    for dtype, shape, tied in (
        (torch.bfloat16, (300, 700), True),
        (torch.float32, (257, 129), False),
    ):
        base, tuned = make_pair(shape, dtype, seed=5, tied=tied)
        assert_matches_reference("cpp", base, tuned, NAME, axis, params, route, **ROUTES[route])


@pytest.fixture
def isa(request):
    """Runs the passes with one instruction-set build, then restores the CPU's best."""
    best = ext.isa()
    if not ext.set_isa(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} build")
    yield request.param
    ext.set_isa(best)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", ROUTE_CASES, ids=case_id)
def test_every_instruction_set_build(case, dtype, isa):
    params = params_for(**case)
    for shape, axis in (((129, 257), "row"), ((257, 129), "col"), ((3, 5, 4099), "none")):
        base, tuned = make_pair(shape, dtype, seed=2, tied=True)
        assert_matches_reference("cpp", base, tuned, NAME, axis, params, isa)


def _kept_positions(out: torch.Tensor, delta: torch.Tensor, seed_of_tensor: int) -> torch.Tensor:
    """Positions in SPEC order of the entries a merge with base 0 kept (out != 0 there)."""
    flat = delta.reshape(-1)
    index = torch.arange(flat.numel())
    order = spec_order(order_keys(flat.abs(), entry_hash(index, seed_of_tensor, STREAM_TIE)))
    position = torch.empty_like(order)
    position[order] = index
    return position[out.reshape(-1) != 0].sort().values


@pytest.mark.parametrize("tied", [False, True], ids=["spread", "tied"])
@pytest.mark.parametrize(
    "case",
    [
        dict(suppress="magnitude", density=0.2),
        dict(suppress="breadcrumbs", density=0.3, gamma=0.02),
    ],
    ids=case_id,
)
@pytest.mark.parametrize("n", [9_973, 2_000_003])
def test_approx_keeps_a_window_within_tolerance(n, case, tied):
    gen = torch.Generator().manual_seed(n)
    if tied:  # few magnitudes, so bins hold many equal |Δ|
        magnitude = torch.tensor([0.25, 0.5, 1.0])[torch.randint(0, 3, (n,), generator=gen)]
        tuned = magnitude * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
    else:
        tuned = torch.randn(n, generator=gen)
    base = torch.zeros(n)  # out = Sub(Δ) exactly: kept entries are the nonzero ones
    params = params_for(**case, select="approx")
    out, stats = merge_tensor(base, tuned, NAME, backend="cpp", params=params)
    start, k = magnitude_window(params, n)
    tolerance = int(0.001 * n)
    assert abs(stats.kept - k) <= tolerance
    positions = _kept_positions(out, tuned, tensor_seed(params.seed, NAME))
    assert positions.numel() == stats.kept
    # The kept entries are one run of the SPEC order, starting near the exact window's start.
    if stats.kept:
        first = int(positions[0])
        assert torch.equal(positions, torch.arange(first, first + stats.kept))
        assert abs(first - start) <= tolerance


@pytest.mark.parametrize("axis", ["row", "col"])
def test_layouts_dtypes_and_aliasing(axis):
    params = params_for(method="neu-s-ties")
    base, tuned = make_pair((97, 61), torch.bfloat16, seed=6, tied=True)
    ref_out = poisoned_like(base)
    ref_stats = merge_reference(base, tuned, ref_out, NAME, axis, params)
    # Non-contiguous inputs and output.
    base_t, tuned_t = base.t().contiguous().t(), tuned.t().contiguous().t()
    out_t = poisoned_like(base).t().contiguous().t()
    _, stats = merge_tensor(
        base_t, tuned_t, NAME, axis=axis, backend="cpp", out=out_t, params=params
    )
    assert_same_merge(out_t.contiguous(), stats, ref_out, ref_stats, params, axis, "non-contiguous")
    # Output written over base (no fused route then).
    in_place = base.clone()
    _, stats = merge_tensor(
        in_place, tuned, NAME, axis=axis, backend="cpp", out=in_place, params=params
    )
    assert_same_merge(in_place, stats, ref_out, ref_stats, params, axis, "in place")
    # Three threads (slices that do not split evenly) give the same result as one.
    assert_matches_reference("cpp", base, tuned, NAME, axis, params, "three threads", threads=3)


def test_merge_validates_its_inputs():
    base, tuned = make_pair((4, 8))
    params = params_for(suppress="magnitude")
    args = kernel_args(plan_tensor(params, base.shape, "none", NAME), params, "float32")
    good = [t.numpy() for t in (base, tuned, torch.empty_like(base))]
    with pytest.raises(ValueError, match="out has 16 entries; rows x cols is 32"):
        ext.merge(good[0], good[1], torch.empty(16).numpy(), **args)
    with pytest.raises(ValueError, match="base must be C-contiguous"):
        ext.merge(base.t().numpy(), good[1], good[2], **args)
    with pytest.raises(ValueError, match="suppress must be one of"):
        ext.merge(*good, **{**args, "suppress": "topk"})
    with pytest.raises(ValueError, match="2-byte items; the dtype needs 4"):
        ext.merge(base.half().view(torch.int16).numpy(), good[1], good[2], **args)


# ----------------------------------------------------------------------------- locate's first pass
def test_scores_thread_counts():
    base, tuned = make_dtype_pair((1031, 1027), DTYPE_PAIRS["bf16"], seed=3)
    for axis in ("row", "col", "none"):
        want = change_scores_reference(base, tuned, axis)
        for threads in (1, 3, 0):
            got = scores_cpp(base, tuned, axis, threads=threads)
            assert_scores_close(got, want, f"{axis} threads={threads}")


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"], indirect=True)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS.values(), ids=DTYPE_PAIRS)
def test_scores_every_instruction_set_build(dtypes, isa):
    base, tuned = make_dtype_pair((129, 257), dtypes, seed=4)
    for axis in ("row", "col", "none"):
        got = scores_cpp(base, tuned, axis)
        assert_scores_close(got, change_scores_reference(base, tuned, axis), f"{isa} {axis}")


def test_scores_validates_its_inputs():
    base, tuned = (t.numpy() for t in make_pair((4, 8)))
    args = dict(dtype="float32", rows=4, cols=8, axis="row")
    with pytest.raises(ValueError, match="tuned has 16 entries; rows x cols is 32"):
        ext.scores(base, torch.empty(16).numpy(), **args)
    with pytest.raises(ValueError, match="base must be C-contiguous"):
        ext.scores(base.T, tuned.T, **{**args, "rows": 8, "cols": 4})
    with pytest.raises(ValueError, match="axis must be one of"):
        ext.scores(base, tuned, **{**args, "axis": "neuron"})
    with pytest.raises(ValueError, match="2-byte items; the dtype needs 4"):
        ext.scores(base.astype("float16"), tuned, **args)
