"""Every fast backend's merge of several tuned models against the torch reference
(:func:`multi_cases.assert_same_multi`), always into NaN-poisoned outputs: every preset and a
mixed set of methods, N = 1, 2, 3, 5, each combine setting, awkward shapes, every dtype; the
cpp kernel also across thread counts and reruns, and with N = 1 against today's merge_tensor.

- ``cpp``: the full cross product (shapes and dtypes rotate through the cases).
- ``triton`` through its interpreter (``TRITON_INTERPRET=1``): one shape and dtype per case,
  rotating, N = 1, 2, 3 (each case compiles nothing but interprets every model's passes).
- ``triton`` on a GPU: every preset at a larger shape (skipped without CUDA).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools

import pytest
import torch
from backends import needs_cpp, needs_cuda, needs_interpreter
from conftest import (
    AWKWARD_SHAPES,
    DTYPES,
    assert_tensors_equal,
    double_summed_scale,
    poisoned_like,
)
from multi_cases import (
    COMBINES,
    assert_same_multi,
    combine_id,
    make_models,
    model_params,
)

from fusion_kernels.ops import merge_tensor, merge_tensors, select_backend
from fusion_kernels.ops.reference_multi import merge_multi_reference
from fusion_kernels.params import PRESETS

NAME = "model.layers.0.mlp.down_proj.weight"
METHODS = [*PRESETS, "mixed"]


def _axis(shape, turn: int) -> str:
    return ("row", "col", "none")[turn % 3] if len(shape) == 2 else "none"


def _check(backend, base, tuned, axis, params, combine, what, **options):
    """The backend against the reference, both into poisoned outputs; returns the output."""
    expected = poisoned_like(base)
    want = merge_multi_reference(base, tuned, expected, NAME, axis, params, combine)
    kernel = select_backend(backend, base.device.type).multi_kernel()
    actual = poisoned_like(base)
    got = kernel(base, tuned, actual, NAME, axis, params, combine, **options)
    assert_same_multi(actual, got, expected, want, params, axis, f"{backend} {what} {axis}")
    return actual


CPP_CASES = list(itertools.product(METHODS, (1, 2, 3, 5), COMBINES))


@needs_cpp
@pytest.mark.parametrize(
    "method, models, combine",
    CPP_CASES,
    ids=[f"{m}-N{n}-{combine_id(c)}" for m, n, c in CPP_CASES],
)
def test_cpp_matches_reference(method, models, combine):
    turn = CPP_CASES.index((method, models, combine))
    params = model_params(method, models, mixed=method == "mixed")
    for k, dtype in enumerate(DTYPES):
        shape = AWKWARD_SHAPES[(turn + 3 * k) % len(AWKWARD_SHAPES)]
        base, tuned = make_models(shape, dtype, models, seed=turn, tied=k == 2)
        axis = _axis(shape, turn + k)
        what = f"{method} N={models} {combine_id(combine)} {shape} {dtype}"
        first = _check("cpp", base, tuned, axis, params, combine, what, threads=1)
        for threads in (1, 3):  # reruns and thread counts: the same bytes
            again = _check("cpp", base, tuned, axis, params, combine, what, threads=threads)
            if threads == 1 or not any(double_summed_scale(p, axis) for p in params):
                assert_tensors_equal(again, first, f"{what} threads={threads}")


@needs_cpp
@pytest.mark.parametrize("method", PRESETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_one_model_is_merge_tensor(method, dtype):
    for turn, shape in enumerate(AWKWARD_SHAPES):
        base, (tuned,) = make_models(shape, dtype, 1, seed=turn, tied=turn % 2 == 0)
        axis = _axis(shape, turn)
        one, _ = merge_tensor(base, tuned, NAME, axis=axis, method=method, backend="cpp",
                              out=poisoned_like(base))  # fmt: skip
        many, _ = merge_tensors(base, [tuned], NAME, axis=axis, method=method, backend="cpp",
                                out=poisoned_like(base))  # fmt: skip
        assert_tensors_equal(many, one, f"{method} {shape} {axis}")


@needs_cpp
def test_cpp_large_tensor_across_threads():
    # Several OpenMP slices and tiles per thread; model masks of every kind.
    base, tuned = make_models((1031, 67), torch.bfloat16, 5, seed=9, tied=True)
    params = model_params("", 5, mixed=True)
    outs = [
        _check("cpp", base, tuned, "row", params, COMBINES[-1], "large", threads=t)
        for t in (1, 2, 4)
    ]
    assert outs[0].ne(base).any()


@needs_cpp
def test_cpp_mixed_tuned_dtypes_run_as_float32():
    base, tuned = make_models((13, 7), torch.bfloat16, 3, seed=2)
    tuned[1] = tuned[1].float()
    params = model_params("ties", 3)
    _check("cpp", base, tuned, "col", params, COMBINES[3], "mixed dtypes")


@needs_cpp
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_every_instruction_set_build(isa, dtype):
    ext = importlib.import_module("fusion_kernels._cpp")
    best = ext.isa()
    if not ext.set_isa(isa):
        pytest.skip(f"this CPU cannot run the {isa} build")
    try:
        params = model_params("", 5, mixed=True)
        for shape, axis in (((129, 257), "row"), ((257, 129), "col"), ((3, 5, 4099), "none")):
            base, tuned = make_models(shape, dtype, 5, seed=5, tied=True)
            for combine in (COMBINES[0], COMBINES[5]):
                _check("cpp", base, tuned, axis, params, combine, f"{isa} {shape}")
    finally:
        ext.set_isa(best)


TRITON_CASES = list(itertools.product(METHODS, (1, 2, 3), COMBINES[:4]))[::3]


@needs_interpreter
@pytest.mark.parametrize(
    "method, models, combine",
    TRITON_CASES,
    ids=[f"{m}-N{n}-{combine_id(c)}" for m, n, c in TRITON_CASES],
)
def test_triton_interpreter_matches_reference(method, models, combine):
    turn = TRITON_CASES.index((method, models, combine))
    params = model_params(method, models, mixed=method == "mixed")
    shape = AWKWARD_SHAPES[turn % len(AWKWARD_SHAPES)]
    dtype = DTYPES[turn % len(DTYPES)]
    base, tuned = make_models(shape, dtype, models, seed=turn, tied=turn % 2 == 0)
    what = f"{method} N={models} {combine_id(combine)} {shape} {dtype}"
    _check("triton", base, tuned, _axis(shape, turn), params, combine, what)


@needs_interpreter
def test_triton_interpreter_five_models_and_lambda():
    base, tuned = make_models((7, 13), torch.bfloat16, 5, seed=4, tied=True)
    params = model_params("", 5, mixed=True)
    _check("triton", base, tuned, "col", params, COMBINES[-1], "five models")


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("models", [1, 3])
def test_triton_cuda_matches_reference(method, models):
    params = model_params(method, models, mixed=method == "mixed")
    base, tuned = make_models((1024, 1000), torch.bfloat16, models, seed=models, tied=True)
    base, tuned = base.cuda(), [t.cuda() for t in tuned]
    for combine in (COMBINES[0], COMBINES[3], COMBINES[5]):
        _check("triton", base, tuned, "row", params, combine, method)
