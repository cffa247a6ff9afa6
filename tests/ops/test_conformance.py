"""Every fast backend against the torch reference (SPEC.md), through one check:
:func:`conftest.assert_matches_reference` (kept counts, restored neurons and fallbacks exact;
values bit for bit, or within SPEC's one ulp where a scale is a ratio of double sums), always
into a NaN-poisoned output so an entry a kernel forgets to write fails.

Each backend runs the method matrix (every case of ``METHOD_CASES``) on awkward shapes (1×1, one
row, one column, primes, non-multiples of the block sizes, a 3-D tensor) in every dtype:

- ``cpp``: the full cross product, plus 4097 rows (several OpenMP slices and tiles per thread).
- ``triton`` through its interpreter (``TRITON_INTERPRET=1``) on the CPU: the interpreter is slow
  and its block sizes small, so each (case, axis) runs on two shapes and dtypes, rotating so
  every shape and dtype meets many cases; the tiny tensors still span many blocks and tails.
- ``triton`` on a GPU: every case at Llama sizes (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch
from backends import needs_cpp, needs_cuda, needs_interpreter
from conftest import (
    AWKWARD_SHAPES,
    DTYPES,
    METHOD_CASES,
    assert_matches_reference,
    assert_tensors_equal,
    case_id,
    make_pair,
)

from fusion_kernels.errors import NonFiniteDeltaError
from fusion_kernels.ops import merge_tensor
from fusion_kernels.params import params_for

NAME = "model.layers.0.mlp.up_proj.weight"
AXES = ("row", "col", "none")
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

cpp_built, interpreted, cuda = needs_cpp, needs_interpreter, needs_cuda
# (backend, device, marks) of each fast backend this suite checks.
TARGETS = {
    "cpp": ("cpp", "cpu", [cpp_built]),
    "triton-interpreter": ("triton", "cpu", [interpreted]),
    "triton-cuda": ("triton", "cuda", [cuda, pytest.mark.cuda]),
}


def _shape_id(shape) -> str:
    return "x".join(map(str, shape))


def _case(target, case, shape, axis, dtype, seeds):
    backend, device, marks = TARGETS[target]
    return pytest.param(
        backend, device, case, shape, axis, dtype, seeds, marks=marks,
        id=f"{target}-{case_id(case)}-{_shape_id(shape)}-{axis}-{DTYPE_IDS[dtype]}",
    )  # fmt: skip


def _axes(shape):
    return AXES if len(shape) == 2 else ("none",)


def _cpp_matrix():
    # Two pairs per case: one with many exact |Δ| ties, one spread.
    return [
        _case("cpp", case, shape, axis, dtype, seeds=((0, True), (1, False)))
        for case in METHOD_CASES
        for shape in [*AWKWARD_SHAPES, (4097, 31)]
        for axis in _axes(shape)
        for dtype in DTYPES
    ]


def _interpreter_matrix():
    # (37, 45) is a multiple of no block size; (300,) is one long row. A shape that is not 2-D
    # has no neurons, so row/col give it a 2-D shape instead.
    shapes = [s for s in AWKWARD_SHAPES if s != (64, 48)] + [(37, 45), (300,)]
    matrix = []
    for c, case in enumerate(METHOD_CASES):
        for a, axis in enumerate(AXES):
            for turn in range(2):
                shape = shapes[(c + 3 * a + 5 * turn) % len(shapes)]
                if axis != "none" and len(shape) != 2:
                    shape = ((31, 17), (1, 37))[turn]
                dtype = DTYPES[(c + a + turn) % len(DTYPES)]
                matrix.append(_case("triton-interpreter", case, shape, axis, dtype, ((102, True),)))
    return matrix


def _cuda_matrix():
    return [
        _case("triton-cuda", case, shape, axis, torch.bfloat16, seeds=((0, True),))
        for case in METHOD_CASES
        for shape in [(4096, 14336), (14336, 4096), (4096,)]
        for axis in _axes(shape)
    ]


@pytest.mark.parametrize(
    ("backend", "device", "case", "shape", "axis", "dtype", "seeds"),
    _cpp_matrix() + _interpreter_matrix() + _cuda_matrix(),
)
def test_matches_reference(backend, device, case, shape, axis, dtype, seeds):
    params = params_for(**case)
    for seed, tied in seeds:
        base, tuned = (t.to(device) for t in make_pair(shape, dtype, seed=seed, tied=tied))
        name = f"{NAME}.{seed}"
        assert_matches_reference(backend, base, tuned, name, axis, params, f"seed {seed}")


# The same checks on the few situations every backend must handle alike, on the CPU.
BACKENDS = [
    pytest.param("cpp", marks=cpp_built),
    pytest.param("triton", marks=interpreted),
]


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,), ()], ids=str)
@pytest.mark.parametrize("case", [METHOD_CASES[i] for i in (1, 2, 6, 14, 15)], ids=case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_scalar_tensors(backend, case, shape):
    params = params_for(**case)
    base, tuned = make_pair(shape, torch.float16, seed=8)
    for axis in _axes(shape):
        assert_matches_reference(backend, base, tuned, NAME, axis, params)


@pytest.mark.parametrize("poison", ["inf", "nan"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_delta_raises_naming_the_tensor_or_copies_tuned(backend, poison):
    base, tuned = make_pair((64, 48), torch.bfloat16, seed=3)
    tuned[3, 7] = float(poison)
    tuned[10, 0] = float(poison)
    with pytest.raises(NonFiniteDeltaError, match=r"lm_head\.weight.*2 entries"):
        merge_tensor(
            base, tuned, "lm_head.weight", backend=backend, suppress="magnitude", method=None
        )
    merged, stats = merge_tensor(
        base, tuned, NAME, backend=backend, suppress="magnitude", allow_nonfinite=True, method=None
    )
    assert stats.action == "copy-nonfinite"
    assert_tensors_equal(merged, tuned)


@pytest.mark.parametrize(
    "case",
    [
        dict(suppress="random", density=0.3, restore="rescale"),
        dict(suppress="magnitude", density=0.3, restore="replace"),
    ],
    ids=case_id,
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_noncontiguous_and_reproducible(backend, case):
    params = params_for(**case)
    base, tuned = make_pair((17, 31), torch.bfloat16, seed=4, tied=True)
    base, tuned = base.t(), tuned.float().t()  # transposed views; tuned in another dtype
    assert_matches_reference(backend, base, tuned, NAME, "col", params, "f32 tuned, transposed")
    f16 = base.to(torch.float16)
    assert_matches_reference(backend, f16, tuned.bfloat16(), NAME, "row", params, "f16/bf16")
    # The kernels take mixed dtypes; merge_tensor, like a merge of checkpoints, refuses them.
    same = tuned.to(base.dtype)
    assert not same.is_contiguous()
    first, stats1 = merge_tensor(base, same, NAME, axis="col", backend=backend, params=params)
    again, stats2 = merge_tensor(base, same, NAME, axis="col", backend=backend, params=params)
    assert_tensors_equal(first, again, "second run")
    assert stats1.l1_scale == stats2.l1_scale
