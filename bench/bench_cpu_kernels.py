"""Per-tensor merge on the CPU at Llama-3-8B shapes: the C++ backend against its baselines.

Each case reads ``base`` and ``tuned`` and writes the merged tensor; those bytes over the mean
time are its effective bandwidth (GB/s, in ``extra_info``). Baselines in the same run, on the
same bf16 pair: the torch reference, mergekit's ``sparsify`` (delta, ``magnitude``, add back),
and the memory floor, one elementwise pass over the same bytes (``torch.add(base, tuned,
out=out)``: f32(base) + f32(tuned) rounded to bf16, in one kernel). The unfused spelling of
that pass, ``(base.float() + tuned.float()).to(bf16)``, is timed too, for scale.

Before any timing, each C++ case is checked against the reference: bit for bit (exact), or a
kept count within 0.1 % of n (approx).

Run:  python -m pytest bench/bench_cpu_kernels.py -q --benchmark-only \\
          --benchmark-columns=min,mean,rounds --benchmark-json=cpu.json
"""

from __future__ import annotations

import functools

import pytest
import torch

from fusion_kernels.ops import select_backend
from fusion_kernels.ops.contract import magnitude_window
from fusion_kernels.ops.reference import merge_reference
from fusion_kernels.params import params_for

NAME = "model.layers.0.mlp.up_proj.weight"

# (rows, cols, axis): Llama-3-8B's MLP and attention projections, neurons as SPEC's rules say.
SHAPES = [
    (4096, 14336, "row"),  # mlp.{gate,up}_proj (and the same bytes with column neurons below)
    (4096, 14336, "col"),
    (14336, 4096, "col"),  # mlp.down_proj
    (4096, 4096, "row"),  # self_attn.{q,o}_proj
    (1024, 4096, "row"),  # self_attn.{k,v}_proj
]
# Baselines that ignore the neuron axis run once per distinct shape.
PLAIN_SHAPES = [s for s in SHAPES if s[2] == "row" or s[0] > s[1]]

METHODS = {
    "ties": dict(suppress="magnitude", density=0.2),
    "neu-p-ties": dict(suppress="magnitude", density=0.2, restore="replace", top_neurons=0.3),
}


@functools.lru_cache(maxsize=4)
def bf16_pair(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 base ~ N(0, 1) and tuned = base + N(0, 0.01²): deltas of about one bf16 ulp, so
    |Δ| ties heavily (the same pair as bench_gpu_kernels.py)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    tuned = (base.float() + 0.01 * torch.randn(rows, cols, generator=gen)).to(torch.bfloat16)
    return base, tuned


def timed(benchmark, fn, base, tuned, out, rounds: int) -> None:
    """Time ``fn`` and record the bytes it moves and its effective bandwidth."""
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    moved = base.nbytes + tuned.nbytes + out.nbytes
    benchmark.extra_info.update(
        bytes=moved,
        gbps=moved / benchmark.stats.stats.mean / 1e9,
        gbps_best=moved / benchmark.stats.stats.min / 1e9,
        threads=torch.get_num_threads(),
    )


def shape_id(shape) -> str:
    rows, cols, axis = shape
    return f"{rows}x{cols}-{axis}"


def check_cpp(kernel, base, tuned, out, axis, params) -> None:
    """No speed claim for wrong results: exact must equal the reference bit for bit, approx
    must keep within 0.1 % of n of the exact count."""
    got = kernel(base, tuned, out, NAME, axis, params)
    if params.select == "approx":
        _, k = magnitude_window(params, base.numel())
        assert abs(got.kept - k) <= 0.001 * base.numel()
        return
    want_out = torch.empty_like(base)
    want = merge_reference(base, tuned, want_out, NAME, axis, params)
    assert (got.kept, got.restored) == (want.kept, want.restored)
    assert torch.equal(out.view(torch.int16), want_out.view(torch.int16))


@pytest.mark.parametrize("select", ["exact", "approx"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cpp(benchmark, shape, method, select):
    rows, cols, axis = shape
    params = params_for(**METHODS[method], select=select)
    ext = pytest.importorskip("fusion_kernels._cpp", reason="the C++ extension is not built")
    base, tuned = bf16_pair(rows, cols)
    out = torch.empty_like(base)
    kernel = select_backend("cpp", "cpu").kernel()
    check_cpp(kernel, base, tuned, out, axis, params)

    def merge():
        kernel(base, tuned, out, NAME, axis, params)

    benchmark.extra_info["isa"] = ext.isa()
    timed(benchmark, merge, base, tuned, out, 10)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_torch_reference(benchmark, shape, method):
    rows, cols, axis = shape
    params = params_for(**METHODS[method])
    base, tuned = bf16_pair(rows, cols)
    out = torch.empty_like(base)

    def merge():
        merge_reference(base, tuned, out, NAME, axis, params)

    timed(benchmark, merge, base, tuned, out, 2)


@pytest.mark.parametrize("shape", PLAIN_SHAPES, ids=shape_id)
def test_mergekit_magnitude(benchmark, shape):
    # TIES as mergekit computes it per tensor: delta, sparsify(magnitude), add back, cast.
    from mergekit.sparsify import magnitude

    rows, cols, _ = shape
    base, tuned = bf16_pair(rows, cols)
    out = torch.empty_like(base)

    def merge():
        delta = magnitude(tuned.float() - base.float(), density=0.2)
        out.copy_(base.float() + delta)

    timed(benchmark, merge, base, tuned, out, 1)


@pytest.mark.parametrize("shape", PLAIN_SHAPES, ids=shape_id)
def test_floor_pass(benchmark, shape):
    # One elementwise kernel reading base and tuned and writing out: the memory floor.
    rows, cols, _ = shape
    base, tuned = bf16_pair(rows, cols)
    out = torch.empty_like(base)
    timed(benchmark, lambda: torch.add(base, tuned, out=out), base, tuned, out, 20)


@pytest.mark.parametrize("shape", PLAIN_SHAPES, ids=shape_id)
def test_unfused_float_pass(benchmark, shape):
    # The same sum spelled as torch expressions: two upcasts, an add and a cast, four kernels.
    rows, cols, _ = shape
    base, tuned = bf16_pair(rows, cols)
    out = torch.empty_like(base)

    def merge():
        out.copy_((base.float() + tuned.float()).to(torch.bfloat16))

    timed(benchmark, merge, base, tuned, out, 5)
