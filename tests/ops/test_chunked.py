"""The cpp backend's chunked merge (``ChunkedMergeCpp``, for tensors over the memory budget):
fed a tensor in chunks of rows (one row, a prime count, uneven, the whole tensor) it writes the
whole-tensor merge's bytes and stats, for every method, restore and selection mode, on every
selection route. Whole merges under a budget are in tests/test_chunks.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from fusion_kernels import params_for
from fusion_kernels.errors import NonFiniteDeltaError
from fusion_kernels.ops.contract import plan_tensor
from fusion_kernels.params import MergeParams

cpp = pytest.importorskip("fusion_kernels.ops.cpp")
try:
    import fusion_kernels._cpp as ext
except ImportError:
    pytest.skip("the C++ extension is not built", allow_module_level=True)

SUPPRESS = ("none", "magnitude", "breadcrumbs", "random", "della")
RESTORE = ("none", "replace", "rescale")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _pair(shape, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    delta = 0.01 * torch.randn(shape, generator=gen)
    return base, (base.float() + delta).to(dtype)


def _whole(base, tuned, axis, params, **options):
    out = torch.empty_like(base)
    stats = cpp.merge_cpp(ext, base, tuned, out, "t", axis, params, **options)
    return out, stats


def _chunked(base, tuned, axis, params, rows_per_chunk, **options):
    plan = plan_tensor(params, base.shape, axis, "t")
    op = cpp.ChunkedMergeCpp(plan, params, base.dtype, tuned.dtype, "t", **options)
    out = torch.empty_like(base)
    b, t, o = (x.reshape(op.rows, op.cols) for x in (base, tuned, out))
    passes = []
    for name in op.passes():
        passes.append(name)
        for row in range(0, op.rows, rows_per_chunk):
            stop = row + rows_per_chunk
            op.feed(b[row:stop], t[row:stop], o[row:stop] if name == "write" else None, row)
    return out, op.stats(), passes


@pytest.mark.parametrize(
    "suppress,restore,axis,select",
    list(itertools.product(SUPPRESS, RESTORE, ("row", "col", "none"), ("exact", "approx"))),
)
def test_chunked_kernel_writes_the_whole_tensor_merge_bytes(suppress, restore, axis, select):
    # 37 rows (prime) of 29: chunks of one row, of a prime count, uneven, and the whole tensor.
    base, tuned = _pair((37, 29))
    params = MergeParams(suppress=suppress, restore=restore, select=select)
    for options in ({}, {"sample_size": 0}, {"sample_size": 16}):
        want, want_stats = _whole(base, tuned, axis, params, **options)
        for rows in (1, 7, 10, 37):
            got, stats, _ = _chunked(base, tuned, axis, params, rows, **options)
            assert torch.equal(_bits(got), _bits(want)), (options, rows)
            assert stats == want_stats


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("suppress", SUPPRESS)
def test_chunked_kernel_other_dtypes_and_shapes(dtype, suppress):
    params = MergeParams(suppress=suppress, restore="rescale", rescale="l1")
    for shape, axis in (((101,), "none"), ((5, 3, 11), "none"), ((13, 300), "col")):
        base, tuned = _pair(shape, dtype, seed=1)
        want, want_stats = _whole(base, tuned, axis, params)
        got, stats, _ = _chunked(base, tuned, axis, params, 2)
        assert torch.equal(_bits(got), _bits(want)) and stats == want_stats


@pytest.mark.parametrize("select", ["exact", "approx"])
@pytest.mark.parametrize("suppress", ["magnitude", "breadcrumbs"])
def test_chunked_selection_routes_bracket_radix_and_missed_brackets(suppress, select):
    # Large enough for several threads; the sampled brackets, the radix select alone, and
    # brackets that miss (a 16-key sample) each give the whole-tensor cuts.
    base, tuned = _pair((613, 701), seed=2)
    params = MergeParams(suppress=suppress, restore="rescale", select=select)
    routes = set()
    for options in ({}, {"sample_size": 0, "collect_cap": 500}, {"sample_size": 16}):
        want, want_stats = _whole(base, tuned, "row", params, **options)
        got, stats, passes = _chunked(base, tuned, "row", params, 97, **options)
        assert torch.equal(_bits(got), _bits(want)) and stats == want_stats
        routes.add(tuple(passes))
    assert ("first", "bracket", "kept", "write") in routes
    assert any(passes.count("radix") >= 2 for passes in routes), routes


def test_chunked_mixed_dtypes_round_like_the_whole_merge():
    base, tuned = _pair((9, 17), torch.float16)
    tuned = tuned.to(torch.bfloat16)
    params = MergeParams(suppress="magnitude", restore="replace")
    want, want_stats = _whole(base, tuned, "row", params)
    got, stats, _ = _chunked(base, tuned, "row", params, 4)
    assert torch.equal(_bits(got), _bits(want)) and stats == want_stats


def test_chunked_nonfinite_delta_is_found_before_the_write_pass():
    base, tuned = _pair((8, 8))
    tuned[5, 3] = float("nan")
    params = params_for("ties")
    op = cpp.ChunkedMergeCpp(
        plan_tensor(params, (8, 8), "row", "t"), params, base.dtype, tuned.dtype, "t"
    )
    passes = []
    for name in op.passes():
        passes.append(name)
        op.feed(base, tuned, None, 0)
    assert passes == ["first"]
    with pytest.raises(NonFiniteDeltaError, match="'t'"):
        op.stats()


def test_chunked_feed_checks_its_chunks():
    params = MergeParams()
    op = cpp.ChunkedMergeCpp(
        plan_tensor(params, (4, 8), "row", "t"), params, torch.bfloat16, torch.bfloat16, "t"
    )
    base, tuned = _pair((4, 8))
    next(op.passes())
    with pytest.raises(ValueError, match="whole rows"):
        op.feed(base.reshape(-1)[:5], tuned.reshape(-1)[:5], None, 0)
    with pytest.raises(ValueError, match="past the tensor"):
        op.feed(base, tuned, None, 1)
