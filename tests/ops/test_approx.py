"""select=approx is one rule (contract.approx_cut), so every backend keeps the same entries and
writes the same bytes: the torch reference, the cpp kernel on each of its selection routes, its
chunked merge, and triton (under its interpreter, or on a CUDA device when there is one)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import assert_same_merge, case_id, make_pair

from fusion_kernels.ops import merge_tensor
from fusion_kernels.ops.contract import APPROX_BINS, approx_cut, magnitude_window, plan_tensor
from fusion_kernels.ops.reference import merge_reference
from fusion_kernels.params import params_for

NAME = "model.layers.0.mlp.down_proj.weight"
CASES = [
    dict(suppress="magnitude", density=0.2),
    dict(suppress="magnitude", density=0.5, restore="rescale", top_neurons=0.1),
    dict(suppress="breadcrumbs", density=0.3, gamma=0.02),
]


def _reference(base, tuned, params, axis="row"):
    out = torch.full_like(base, float("nan"))
    return out, merge_reference(base, tuned, out, NAME, axis, params)


def _backends():
    """Backends present here, each as ``merge(base, tuned, params, axis) -> (out, stats)``."""
    found = {}
    try:
        import fusion_kernels._cpp as ext

        from fusion_kernels.ops import cpp
    except ImportError:
        ext = None
    if ext is not None:
        for route, options in {
            "cpp": {},
            "cpp-radix": {"sample_size": 0, "collect_cap": 300},
            "cpp-brackets-missing": {"sample_size": 16},
        }.items():
            found[route] = _cpp_whole(cpp, ext, options)
        found["cpp-chunked"] = _cpp_chunked(cpp)
    if importlib.util.find_spec("triton") is not None:
        from fusion_kernels.ops.triton import interpreting

        device = "cpu" if interpreting() else "cuda" if torch.cuda.is_available() else None
        if device is not None:
            found["triton"] = _triton(device)
    return found


def _cpp_whole(cpp, ext, options):
    def merge(base, tuned, params, axis):
        out = torch.full_like(base, float("nan"))
        return out, cpp.merge_cpp(ext, base, tuned, out, NAME, axis, params, **options)

    return merge


def _cpp_chunked(cpp):
    def merge(base, tuned, params, axis):
        plan = plan_tensor(params, base.shape, axis, NAME)
        op = cpp.ChunkedMergeCpp(plan, params, base.dtype, tuned.dtype, NAME)
        out = torch.full_like(base, float("nan"))
        b, t, o = (x.reshape(op.rows, op.cols) for x in (base, tuned, out))
        for name in op.passes():
            for row in range(0, op.rows, 7):
                chunk = o[row : row + 7] if name == "write" else None
                op.feed(b[row : row + 7], t[row : row + 7], chunk, row)
        return out, op.stats()

    return merge


def _triton(device):
    def merge(base, tuned, params, axis):
        out, stats = merge_tensor(
            base.to(device), tuned.to(device), NAME, axis=axis, backend="triton", params=params
        )
        return out.cpu(), stats

    return merge


BACKENDS = _backends()


def _near_an_edge(n: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """1998 entries of |Δ| = 2 above 2002 of |Δ| = 1: density 0.5 cuts 2 entries into the
    lower bin, within the slack (4) of its edge, so approx keeps 1998."""
    gen = torch.Generator().manual_seed(0)
    magnitude = torch.ones(n)
    magnitude[torch.randperm(n, generator=gen)[:1998]] = 2.0
    sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    return torch.zeros(n).reshape(40, 100), (magnitude * sign).reshape(40, 100)


def test_the_rule_moves_a_cut_to_the_nearer_edge_within_the_slack():
    histogram = np.zeros(APPROX_BINS, dtype=np.int64)
    histogram[[900, 500, 100]] = [10, 20, 70]  # edges at 0, 10, 30, 100 (largest bin first)
    assert [approx_cut(p, 100, 3, histogram) for p in (12, 13, 14, 20, 27, 28, 30)] == [
        10,
        10,
        14,
        20,
        30,
        30,
        30,
    ]
    assert approx_cut(20, 100, 10, histogram) == 10  # equally near both edges: the start
    assert approx_cut(0, 100, 10, histogram) == 0 and approx_cut(100, 100, 10, histogram) == 100


def test_the_reference_keeps_the_window_between_the_moved_cuts():
    base, tuned = _near_an_edge()
    params = params_for(suppress="magnitude", density=0.5, select="approx")
    out, stats = _reference(base, tuned, params, axis="none")
    assert stats.kept == 1998 and magnitude_window(params, base.numel())[1] == 2000
    assert torch.equal(out.abs() == 2.0, out != 0)  # exactly the larger bin


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize(
    "data",
    ["near-edge", "bf16-tied", "f32-spread", "f16-spread"],
)
def test_approx_writes_the_reference_bytes_on_every_backend(backend, case, data):
    if data == "near-edge":
        base, tuned = _near_an_edge()
    elif data == "bf16-tied":
        base, tuned = make_pair((48, 64), torch.bfloat16, seed=11, tied=True)
    elif data == "f32-spread":
        base, tuned = make_pair((61, 53), torch.float32, seed=4)
    else:
        base, tuned = make_pair((64, 48), torch.float16, seed=7)
    params = params_for(**case, select="approx")
    want, want_stats = _reference(base, tuned, params)
    got, stats = BACKENDS[backend](base, tuned, params, "row")
    # The same kept count and bytes (1 ulp only where restore=rescale's scale is a ratio of
    # float64 sums, as for every method).
    assert_same_merge(got, stats, want, want_stats, params, "row", f"{backend} {data}")
    k = magnitude_window(params, base.numel())[1]
    assert abs(stats.kept - k) <= int(0.001 * base.numel())


def test_approx_moves_cuts_in_these_cases():
    # The cases above would prove little if approx never left the exact window.
    moved = 0
    for seed in range(4):
        base, tuned = make_pair((61, 53), torch.float32, seed=seed)
        for case in CASES:
            params = params_for(**case, select="approx")
            _, stats = _reference(base, tuned, params)
            moved += stats.kept != magnitude_window(params, base.numel())[1]
    assert moved > 0
