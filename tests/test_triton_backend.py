"""The ``triton`` backend against the torch reference.

Without a GPU these run the real kernels through Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``), on tiny shapes: the interpreter's block sizes are small
(``INTERPRETER_TUNING``), so the tensors below still span many blocks, tails and loop splits. The
``cuda`` tests run the same checks at Llama sizes on a GPU.

Masks and counts must match exactly; values bit for bit, except where a scale comes from a
float64 sum (the l1 rescale, and Neu-S's C/C'): those sums may round differently in another
summation order, so SPEC allows one ulp of the output dtype there.
"""

from __future__ import annotations

import dataclasses
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

from fusion_kernels.errors import BackendUnavailableError, NonFiniteDeltaError
from fusion_kernels.ops import merge_tensor, select_backend
from fusion_kernels.ops import triton as triton_backend
from fusion_kernels.ops.contract import magnitude_window
from fusion_kernels.ops.reference import merge_reference
from fusion_kernels.params import params_for

NAME = "model.layers.0.mlp.down_proj.weight"
AXES = ["row", "col", "none"]

interpreted = pytest.mark.skipif(
    not triton_backend.interpreting(),
    reason="runs Triton's interpreter on the CPU: set TRITON_INTERPRET=1",
)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def triton_kernel():
    """The registered kernel function (through the registry, so its load() path runs too)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    device = "cuda" if torch.cuda.is_available() and not triton_backend.interpreting() else "cpu"
    return select_backend("triton", device).kernel()


def float64_scaled(params) -> bool:
    """Whether a scale of this merge is a ratio of float64 sums (see the module docstring)."""
    return params.rescale_mode == "l1" or params.restore == "rescale"


def check_against_reference(base, tuned, axis, case, what=""):
    params = params_for(**case)
    expected, actual = poisoned_like(base), poisoned_like(base)
    want = merge_reference(base, tuned, expected, NAME, axis, params)
    got = triton_kernel()(base, tuned, actual, NAME, axis, params)
    what = f"{what} {case_id(case)} axis={axis}"
    assert (got.kept, got.restored, got.fallbacks) == (want.kept, want.restored, want.fallbacks)
    assert math.isclose(got.l1_scale, want.l1_scale, rel_tol=2**-23), what
    if float64_scaled(params):
        assert_within_ulp(actual, expected, 1, what)
    else:
        assert_tensors_equal(actual, expected, what)


# Every case, every axis and every dtype, without the full cross product: each (case, axis) runs
# on two shapes and dtypes, rotating so every shape and dtype meets many cases. (37, 45) is a
# multiple of no block size; (300,) is one long row. Tensors that are not 2-D have no neurons,
# so row/col give them a 2-D shape instead.
SHAPES = [s for s in AWKWARD_SHAPES if s != (64, 48)] + [(37, 45), (300,)]
MATRIX = []
for c, case in enumerate(METHOD_CASES):
    for a, axis in enumerate(AXES):
        for turn in range(2):
            shape = SHAPES[(c + 3 * a + 5 * turn) % len(SHAPES)]
            if axis != "none" and len(shape) != 2:
                shape = ((31, 17), (1, 37))[turn]
            dtype = DTYPES[(c + a + turn) % len(DTYPES)]
            shape_id = "x".join(map(str, shape))
            MATRIX.append(
                pytest.param(
                    case, axis, shape, dtype, id=f"{case_id(case)}-{axis}-{shape_id}-{dtype}"
                )
            )


@interpreted
@pytest.mark.parametrize(("case", "axis", "shape", "dtype"), MATRIX)
def test_matches_reference(case, axis, shape, dtype):
    base, tuned = make_pair(shape, dtype, seed=len(MATRIX), tied=True)
    check_against_reference(base, tuned, axis, case)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_untied_data_and_larger_tensor(dtype):
    # 3072 entries: the selection passes span 12 blocks; the della rows are sorted in global memory.
    base, tuned = make_pair((64, 48), dtype, seed=5)
    for case in (METHOD_CASES[6], METHOD_CASES[10], METHOD_CASES[15]):
        check_against_reference(base, tuned, "col", case)


@interpreted
@pytest.mark.parametrize(("candidates_min", "candidates_div"), [(1 << 30, 1), (0, 1 << 30)])
def test_candidate_buffer_and_full_refinement(monkeypatch, candidates_min, candidates_div):
    # The deeper digits read either the copied keys of the cut's group or base/tuned again
    # (when the group outgrows the buffer); both must select the same entries.
    tuning = dataclasses.replace(
        triton_backend.INTERPRETER_TUNING,
        candidates_min=candidates_min,
        candidates_div=candidates_div,
    )
    monkeypatch.setattr(triton_backend, "INTERPRETER_TUNING", tuning)
    base, tuned = make_pair((64, 48), torch.bfloat16, seed=3, tied=True)
    for case in (METHOD_CASES[2], METHOD_CASES[9]):
        check_against_reference(base, tuned, "row", case)


@interpreted
@pytest.mark.parametrize("case", [METHOD_CASES[2], METHOD_CASES[8]], ids=case_id)
def test_approx_selection_within_tolerance(case):
    base, tuned = make_pair((64, 48), torch.bfloat16, seed=11, tied=True)
    n = base.numel()
    params = params_for(**case, select="approx")
    expected, actual = poisoned_like(base), poisoned_like(base)
    merge_reference(base, tuned, expected, NAME, "none", params)
    got = triton_kernel()(base, tuned, actual, NAME, "none", params)
    _, k = magnitude_window(params, n)
    assert abs(got.kept - k) <= 0.001 * n
    # Only entries at the two cuts can differ from the exact window.
    assert not bool(torch.isnan(actual).any())
    differ = int((actual.view(torch.int16) != expected.view(torch.int16)).sum())
    assert differ <= 2 * (0.001 * n) + 1


@interpreted
def test_index_tie_break():
    # Exact key ties need more than 2^32 entries (the TIE hash is a bijection below that), so
    # drive the index stage directly: cut a magnitude-only group (SHIFT = 32) at every rank.
    from fusion_kernels.ops import triton_kernels as kernels
    from fusion_kernels.ops import triton_select as selection
    from fusion_kernels.ops.triton import _prepare

    base, tuned = make_pair((31, 17), torch.float16, seed=2, tied=True)
    params = params_for(suppress="magnitude")
    job = _prepare(base, tuned, poisoned_like(base), NAME, params)
    bits = (tuned.float() - base.float()).abs().view(torch.int32).reshape(-1)
    value = int(bits.mode().values)
    members = (bits == value).nonzero().reshape(-1)
    assert members.numel() > 3
    block, n = job.tuning.flat_block, job.n
    blocks = -(-n // block)
    for rank in range(members.numel()):
        state = torch.tensor([kernels.cut_state(1, n)] * 2)
        state[:, 0], state[:, 1], state[:, 2] = value, 32, rank
        counts = torch.empty(2, blocks, dtype=torch.int64)
        args = (job.base, job.tuned, n, job.seed, state)
        selection._index_count_kernel[(blocks, 2)](*args, counts, **job.kinds, BLOCK=block)
        selection._index_pick_kernel[(2,)](*args, counts, blocks, **job.kinds, BLOCK=block, SCAN=4)
        assert state[:, 7].tolist() == [int(members[rank])] * 2
        assert state[:, 4].tolist() == [1, 1]


@interpreted
@pytest.mark.parametrize("poison", ["inf", "nan"])
def test_nonfinite_delta_raises(poison):
    base, tuned = make_pair((7, 13), torch.bfloat16, seed=1)
    tuned[2, 3] = float(poison)
    tuned[5, 0] = float(poison)
    with pytest.raises(NonFiniteDeltaError, match="2 entries"):
        merge_tensor(base, tuned, NAME, backend="triton", suppress="magnitude")
    merged, stats = merge_tensor(
        base, tuned, NAME, backend="triton", suppress="magnitude", allow_nonfinite=True
    )
    assert stats.action == "copy-nonfinite"
    assert_tensors_equal(merged, tuned)


@interpreted
@pytest.mark.parametrize("shape", [(), (0, 5)], ids=["scalar", "empty"])
def test_degenerate_shapes(shape):
    base, tuned = make_pair(shape, torch.float16, seed=6)
    check_against_reference(base, tuned, "none", METHOD_CASES[2])
    check_against_reference(base, tuned, "none", METHOD_CASES[14])


@interpreted
def test_mixed_dtypes_noncontiguous_and_reproducible():
    base, tuned = make_pair((17, 31), torch.bfloat16, seed=4, tied=True)
    base, tuned = base.t(), tuned.float().t()  # transposed views; tuned in another dtype
    case = dict(suppress="random", density=0.3, restore="rescale")
    check_against_reference(base, tuned, "col", case)
    first, stats1 = merge_tensor(base, tuned, NAME, axis="col", backend="triton", **case)
    again, stats2 = merge_tensor(base, tuned, NAME, axis="col", backend="triton", **case)
    assert_tensors_equal(first, again, "second run")
    assert stats1.l1_scale == stats2.l1_scale


def test_registration(monkeypatch):
    from fusion_kernels.ops import _REGISTRY

    registered = _REGISTRY["triton"]
    assert registered.devices == (("cuda", "cpu") if triton_backend.interpreting() else ("cuda",))
    assert "TRITON_INTERPRET=1" in registered.hint
    # Neither a GPU nor the interpreter: load() says why, and asking for it by name raises.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises((ImportError, RuntimeError)):
        triton_backend.load()
    backend = dataclasses.replace(registered, _fn=None, _error=None)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        backend.kernel()


# ----------------------------------------------------------------------------- on a GPU

GPU_SHAPES = [(4096, 14336), (14336, 4096), (4096,)]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_cuda_matches_reference(case, shape, axis):
    if triton_backend.interpreting():
        pytest.skip("Llama-sized tensors are too large for the interpreter")
    if axis != "none" and len(shape) != 2:
        pytest.skip("neurons need a 2-D tensor")
    base, tuned = make_pair(shape, torch.bfloat16, seed=0, tied=True)
    check_against_reference(base.cuda(), tuned.cuda(), axis, case, "cuda")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_dtypes_and_approx(dtype):
    if triton_backend.interpreting():
        pytest.skip("Llama-sized tensors are too large for the interpreter")
    base, tuned = (t.cuda() for t in make_pair((4096, 4096), dtype, seed=1))
    for case in METHOD_CASES:
        check_against_reference(base, tuned, "row", case, "cuda")
    params = params_for(suppress="magnitude", density=0.2, select="approx")
    stats = triton_kernel()(base, tuned, poisoned_like(base), NAME, "none", params)
    assert abs(stats.kept - magnitude_window(params, base.numel())[1]) <= 0.001 * base.numel()
