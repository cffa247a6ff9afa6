"""Locate's first pass (Σ|Δ| and the neuron change scores C(j)) on every backend against the
torch reference ``change_scores_reference``.

Every |Δ| is a float32, exact in float64, so the backends and the reference add the same float64
numbers, only in another order: ``conftest.SCORES_RTOL`` says why 1e-12 allows that and nothing
else. The cpp backend's thread counts and instruction-set builds are in test_cpp.py. Triton runs
through its interpreter on tiny shapes here (``TRITON_INTERPRET=1``), on Llama-sized tensors
with a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from backends import needs_cpp, needs_cuda, needs_interpreter
from conftest import (
    AWKWARD_SHAPES,
    DTYPE_PAIRS,
    assert_scores_close,
    make_dtype_pair,
)

from fusion_kernels.errors import NonFiniteDeltaError
from fusion_kernels.ops import change_scores, select_backend
from fusion_kernels.ops import triton as triton_backend
from fusion_kernels.ops.cpp import scores_cpp
from fusion_kernels.ops.reference import change_scores_reference
from fusion_kernels.ops.registry import _REGISTRY

NAME = "model.layers.0.mlp.gate_proj.weight"
AXES = ["row", "col", "none"]

cpp_built, interpreted, cuda = needs_cpp, needs_interpreter, needs_cuda


def _layouts(shapes):
    return [
        pytest.param(shape, axis, id=f"{'x'.join(map(str, shape))}-{axis}")
        for shape in shapes
        for axis in (AXES if len(shape) == 2 else ["none"])
    ]


# 1×1, one row, one column, primes, a 3-D tensor (axis none only); the interpreter is slow, so
# the 4097-row case (several OpenMP slices and tiles per thread) runs on cpp alone.
LAYOUTS = _layouts(AWKWARD_SHAPES)
CASES = [
    pytest.param(backend, shape, axis, id=f"{backend}-{p.id}", marks=mark)
    for backend, mark in (("cpp", cpp_built), ("triton", interpreted))
    for p in LAYOUTS + (_layouts([(4097, 31)]) if backend == "cpp" else [])
    for shape, axis in [p.values]
]


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """torch.empty fills floats with NaN, so a sum a kernel forgets to write fails the test."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def scores_fn(backend: str):
    return select_backend(backend, "cpu").scores


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS.values(), ids=DTYPE_PAIRS)
@pytest.mark.parametrize(("backend", "shape", "axis"), CASES)
def test_matches_reference(backend, shape, axis, dtypes):
    base, tuned = make_dtype_pair(shape, dtypes, seed=len(shape))
    got = scores_fn(backend)(base, tuned, axis)
    assert_scores_close(got, change_scores_reference(base, tuned, axis), f"{backend} {axis}")


BACKENDS = [
    "torch",
    pytest.param("cpp", marks=cpp_built),
    pytest.param("triton", marks=interpreted),
]


@pytest.mark.parametrize("poison", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_delta_raises_naming_the_tensor(backend, poison):
    base, tuned = make_dtype_pair((7, 13), DTYPE_PAIRS["bf16"], seed=1)
    tuned[2, 3] = float(poison)
    for axis in AXES:
        total, _ = scores_fn(backend)(base, tuned, axis)
        assert not math.isfinite(total), f"{axis}: the total must carry the non-finite Δ"
        with pytest.raises(NonFiniteDeltaError, match=r"gate_proj\.weight"):
            change_scores(base, tuned, NAME, axis=axis, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_empty_and_scalar_inputs(backend):
    base, tuned = make_dtype_pair((17, 31), DTYPE_PAIRS["f16-bf16"], seed=5)
    for axis in AXES:
        got = scores_fn(backend)(base.t(), tuned.t(), axis)
        want = change_scores_reference(base.t(), tuned.t(), axis)
        assert_scores_close(got, want, f"transposed {axis}")
    for shape in [(0, 5), (5, 0), (0,), ()]:
        base, tuned = make_dtype_pair(shape, DTYPE_PAIRS["bf16"], seed=6)
        for axis in AXES if len(shape) == 2 else ["none"]:
            got = scores_fn(backend)(base, tuned, axis)
            assert_scores_close(got, change_scores_reference(base, tuned, axis), f"{shape}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_change_scores_reports_the_backend_that_computed_them(backend):
    base, tuned = make_dtype_pair((7, 13), DTYPE_PAIRS["f32"], seed=2)
    expected = {"torch": change_scores_reference, "cpp": scores_cpp}
    expected["triton"] = triton_backend.scores_triton
    assert _REGISTRY[backend].scores is expected[backend]
    total, scores, used = change_scores(base, tuned, NAME, backend=backend)
    assert used == backend
    assert_scores_close((total, scores), change_scores_reference(base, tuned, "row"), backend)


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS.values(), ids=DTYPE_PAIRS)
@pytest.mark.parametrize(
    ("shape", "axis"), _layouts([(4096, 14336), (14336, 4096), (4096,), (1, 1), (257, 3)])
)
def test_cuda_matches_reference(shape, axis, dtypes):
    if triton_backend.interpreting():
        pytest.skip("Llama-sized tensors are too large for the interpreter")
    base, tuned = make_dtype_pair(shape, dtypes, seed=7, device="cuda")
    got = select_backend("triton", "cuda").scores(base, tuned, axis)
    assert got[1] is None or got[1].device.type == "cuda"
    assert_scores_close(got, change_scores_reference(base, tuned, axis), f"cuda {axis}")
