"""The fused C++ CPU backend against the torch reference (SPEC.md).

Outputs must match the reference bit for bit, with identical kept counts, restored neurons and
fallbacks. The only allowance is 1 ulp of the output dtype where a scale comes from sums taken
in double (the l1 rescale, and restore=rescale's C(j)/C'(j)): those sums may round differently
in their last bit when added in another order, and SPEC.md allows it there.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    AWKWARD_SHAPES,
    DTYPES,
    METHOD_CASES,
    assert_tensors_equal,
    assert_within_ulp,
    case_id,
    make_pair,
    poisoned_like,
)

from fusion_kernels import merge_tensor
from fusion_kernels.errors import BackendUnavailableError, NonFiniteDeltaError
from fusion_kernels.hashing import STREAM_TIE, entry_hash, tensor_seed
from fusion_kernels.ops import cpp as cpp_backend
from fusion_kernels.ops.contract import magnitude_window
from fusion_kernels.ops.reference import merge_reference, order_keys, spec_order
from fusion_kernels.ops.registry import _REGISTRY
from fusion_kernels.params import params_for

ext = pytest.importorskip(
    "fusion_kernels._cpp",
    reason="the C++ extension is not built (run `pip install -e .` with a C++ compiler)",
)

NAME = "model.layers.0.mlp.up_proj.weight"
SHAPES = [*AWKWARD_SHAPES, (4097, 31)]
LAYOUTS = [
    pytest.param(shape, axis, id=f"{'x'.join(map(str, shape))}-{axis}")
    for shape in SHAPES
    for axis in (("row", "col", "none") if len(shape) == 2 else ("none",))
]
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _double_summed_scale(params, axis: str) -> bool:
    """Whether a scale of this merge is a ratio of sums taken in double (see module docstring)."""
    l1 = params.suppress in ("random", "della") and params.rescale_mode == "l1"
    return l1 or (params.restore == "rescale" and axis != "none")


def _reference(base, tuned, name, axis, params):
    out = poisoned_like(base)
    return out, merge_reference(base, tuned, out, name, axis, params)


def _assert_matches(out, stats, ref_out, ref_stats, params, axis, what):
    assert (stats.kept, stats.restored, stats.fallbacks) == (
        ref_stats.kept,
        ref_stats.restored,
        ref_stats.fallbacks,
    ), f"{what}: stats {stats} != reference {ref_stats}"
    if not _double_summed_scale(params, axis):
        assert stats.l1_scale == ref_stats.l1_scale, what
        assert_tensors_equal(out, ref_out, what)
        return
    # The scale is a ratio of double sums whose last bit may depend on summation order: the
    # scale within 1 float32 ulp, the values within 1 ulp of the dtype (SPEC.md "Arithmetic").
    assert math.isclose(stats.l1_scale, ref_stats.l1_scale, rel_tol=2**-23, abs_tol=0), what
    assert_within_ulp(out, ref_out, 1, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_matches_reference(case, shape, axis, dtype):
    params = params_for(**case)
    for seed in (0, 1):
        base, tuned = make_pair(shape, dtype, seed=seed, tied=seed == 0)
        name = f"{NAME}.{seed}"
        ref_out, ref_stats = _reference(base, tuned, name, axis, params)
        out, stats = merge_tensor(
            base, tuned, name, axis=axis, backend="cpp", out=poisoned_like(base), params=params
        )
        _assert_matches(out, stats, ref_out, ref_stats, params, axis, f"seed {seed}")


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
        ref_out, ref_stats = _reference(base, tuned, NAME, axis, params)
        out = poisoned_like(base)
        kernel = _REGISTRY["cpp"].kernel()
        stats = kernel(base, tuned, out, NAME, axis, params, **ROUTES[route])
        _assert_matches(out, stats, ref_out, ref_stats, params, axis, f"{dtype} {route}")


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
        ref_out, ref_stats = _reference(base, tuned, NAME, axis, params)
        out, stats = merge_tensor(
            base, tuned, NAME, axis=axis, backend="cpp", out=poisoned_like(base), params=params
        )
        _assert_matches(out, stats, ref_out, ref_stats, params, axis, f"{isa} {shape}")


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


def test_nonfinite_delta_raises_naming_the_tensor():
    base, tuned = make_pair((64, 48), torch.bfloat16, seed=3)
    tuned[3, 7] = float("nan")
    tuned[10, 0] = float("inf")
    with pytest.raises(NonFiniteDeltaError, match=r"lm_head\.weight.*2 entries"):
        merge_tensor(base, tuned, "lm_head.weight", backend="cpp", suppress="magnitude")


def test_allow_nonfinite_copies_tuned():
    base, tuned = make_pair((31, 17), torch.float16, seed=4)
    tuned[0, 0] = float("-inf")
    out, stats = merge_tensor(base, tuned, NAME, backend="cpp", allow_nonfinite=True)
    assert stats.action == "copy-nonfinite"
    assert_tensors_equal(out, tuned)


def test_missing_extension_raises_a_clear_error(monkeypatch):
    backend = _REGISTRY["cpp"]

    def not_built():
        raise ImportError("No module named 'fusion_kernels._cpp'")

    monkeypatch.setattr(backend, "load", not_built)
    monkeypatch.setattr(backend, "_fn", None)
    monkeypatch.setattr(backend, "_error", None)
    base, tuned = make_pair((7, 13))
    with pytest.raises(BackendUnavailableError, match=r"'cpp' is not available.*pip install -e"):
        merge_tensor(base, tuned, NAME, backend="cpp", suppress="magnitude")


@pytest.mark.parametrize("axis", ["row", "col"])
def test_layouts_dtypes_and_aliasing(axis):
    params = params_for(method="neu-s-ties")
    base, tuned = make_pair((97, 61), torch.bfloat16, seed=6, tied=True)
    ref_out, ref_stats = _reference(base, tuned, NAME, axis, params)
    # Non-contiguous inputs and output.
    base_t, tuned_t = base.t().contiguous().t(), tuned.t().contiguous().t()
    out_t = poisoned_like(base).t().contiguous().t()
    _, stats = merge_tensor(
        base_t, tuned_t, NAME, axis=axis, backend="cpp", out=out_t, params=params
    )
    _assert_matches(out_t.contiguous(), stats, ref_out, ref_stats, params, axis, "non-contiguous")
    # Output written over base (no fused route then).
    in_place = base.clone()
    _, stats = merge_tensor(
        in_place, tuned, NAME, axis=axis, backend="cpp", out=in_place, params=params
    )
    _assert_matches(in_place, stats, ref_out, ref_stats, params, axis, "in place")
    # Three threads (slices that do not split evenly) give the same result as one.
    out = poisoned_like(base)
    stats = _REGISTRY["cpp"].kernel()(base, tuned, out, NAME, axis, params, threads=3)
    _assert_matches(out, stats, ref_out, ref_stats, params, axis, "three threads")


def test_mixed_dtypes_match_reference():
    base, _ = make_pair((41, 29), torch.float16, seed=7)
    tuned = (base.float() + 0.01 * torch.randn(41, 29)).to(torch.bfloat16)
    params = params_for(suppress="magnitude", density=0.3, restore="replace")
    ref_out, ref_stats = _reference(base, tuned, NAME, "row", params)
    out, stats = merge_tensor(base, tuned, NAME, axis="row", backend="cpp", params=params)
    _assert_matches(out, stats, ref_out, ref_stats, params, "row", "f16 base, bf16 tuned")


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,), ()], ids=str)
@pytest.mark.parametrize("case", [METHOD_CASES[1], METHOD_CASES[6], METHOD_CASES[15]], ids=case_id)
def test_empty_and_scalar_tensors(shape, case):
    params = params_for(**case)
    base, tuned = make_pair(shape, torch.float16, seed=8)
    for axis in ("row", "col", "none") if len(shape) == 2 else ("none",):
        ref_out, ref_stats = _reference(base, tuned, NAME, axis, params)
        out, stats = merge_tensor(base, tuned, NAME, axis=axis, backend="cpp", params=params)
        _assert_matches(out, stats, ref_out, ref_stats, params, axis, f"{shape} {axis}")


def test_extension_validates_its_inputs():
    base, tuned = make_pair((4, 8))
    args = cpp_backend._kernel_args(base, NAME, "none", params_for(suppress="magnitude"))
    good = [t.numpy() for t in (base, tuned, torch.empty_like(base))]
    with pytest.raises(ValueError, match="out has 16 entries; rows x cols is 32"):
        ext.merge(good[0], good[1], torch.empty(16).numpy(), **args)
    with pytest.raises(ValueError, match="base must be C-contiguous"):
        ext.merge(base.t().numpy(), good[1], good[2], **args)
    with pytest.raises(ValueError, match="suppress must be one of"):
        ext.merge(*good, **{**args, "suppress": "topk"})
    with pytest.raises(ValueError, match="2-byte items; the dtype needs 4"):
        ext.merge(base.half().view(torch.int16).numpy(), good[1], good[2], **args)
