"""Per-tensor merge on the GPU at Llama-3-8B shapes: the Triton backend against its baselines.

Each case moves ``base + tuned`` read once and the merged tensor written once; that byte count
over the mean time is the effective bandwidth, reported in GB/s and as a fraction of the GPU's
HBM peak. Baselines in the same run: the torch reference on the GPU, mergekit's ``sparsify`` on
the GPU (delta, sparsify, add back), and a plain elementwise pass over the same bytes (the
floor a fused kernel can approach). Before a Triton case is timed, its output must equal the
``cpp`` backend's byte for byte (within one ulp where a scale is a ratio of float64 sums, whose
summation order differs between the two). Skipped without CUDA.

Run:  python -m pytest bench/bench_gpu_kernels.py -q --benchmark-only \\
          --benchmark-columns=min,mean,rounds
"""

from __future__ import annotations

import pytest
import torch

from fusion_kernels.ops import select_backend
from fusion_kernels.ops.reference import merge_reference
from fusion_kernels.params import params_for

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# HBM peak in GB/s by device name (SXM parts).
HBM_PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}

# (rows, cols, axis): Llama-3-8B's MLP and attention projections, neurons as SPEC's rules say.
SHAPES = [
    (4096, 14336, "row"),  # mlp.{gate,up}_proj viewed as rows (and as columns below)
    (4096, 14336, "col"),
    (14336, 4096, "col"),  # mlp.down_proj
    (4096, 4096, "row"),  # self_attn.{q,o}_proj
    (1024, 4096, "row"),  # self_attn.{k,v}_proj
]

METHODS = {
    "task_arithmetic": dict(suppress="none", weight=0.5),
    "ties": dict(suppress="magnitude", density=0.2),
    "neu-p-ties": dict(suppress="magnitude", density=0.2, restore="replace"),
    "neu-s-ties": dict(suppress="magnitude", density=0.2, restore="rescale"),
    "breadcrumbs": dict(suppress="breadcrumbs", density=0.2, gamma=0.01),
    "dare": dict(suppress="random", density=0.2),
    "della": dict(suppress="della", density=0.2, epsilon=0.15),
}

# mergekit's counterpart of each suppress method (None: nothing to sparsify).
MERGEKIT = {
    "none": None,
    "magnitude": "magnitude",
    "breadcrumbs": "magnitude_outliers",
    "random": "random",
    "della": "della_magprune",
}


def hbm_peak_gbps() -> float | None:
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in HBM_PEAK_GBPS.items() if key in name), None)


def ulps_apart(actual: torch.Tensor, expected: torch.Tensor) -> int:
    """The largest distance between the two in units in the last place of their dtype."""
    width = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF)}[actual.element_size()]
    ordered = []
    for t in (actual, expected):
        bits = t.contiguous().view(width[0]).to(torch.int64)
        magnitude = bits & width[1]
        ordered.append(torch.where(bits < 0, -magnitude, magnitude))
    return int((ordered[0] - ordered[1]).abs().max())


def pair(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(rows, cols, generator=gen, device="cuda").to(torch.bfloat16)
    tuned = (base.float() + 0.01 * torch.randn(rows, cols, generator=gen, device="cuda")).to(
        torch.bfloat16
    )
    return base, tuned


def run_timed(benchmark, fn, base, tuned, out) -> None:
    """Time ``fn`` (synchronised) and record the bytes it moves and its effective bandwidth."""

    def call():
        fn()
        torch.cuda.synchronize()

    call()  # warm-up: Triton compiles on first use
    benchmark.pedantic(call, rounds=10, warmup_rounds=1)
    moved = base.nbytes + tuned.nbytes + out.nbytes
    gbps = moved / benchmark.stats.stats.mean / 1e9
    peak = hbm_peak_gbps()
    benchmark.extra_info.update(
        bytes=moved,
        gbps=gbps,
        hbm_peak_gbps=peak,
        fraction_of_peak=gbps / peak if peak else None,
        device=torch.cuda.get_device_name(),
    )


def shape_id(shape) -> str:
    rows, cols, axis = shape
    return f"{rows}x{cols}-{axis}"


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_triton(benchmark, shape, method):
    rows, cols, axis = shape
    params = params_for(**METHODS[method])
    base, tuned = pair(rows, cols)
    out = torch.empty_like(base)
    kernel = select_backend("triton", "cuda").kernel()
    # No speed claim for wrong results: counts and bytes must match the cpp backend's first.
    expected = torch.empty(base.shape, dtype=base.dtype)
    cpp = select_backend("cpp", "cpu").kernel()
    want = cpp(base.cpu(), tuned.cpu(), expected, "bench", axis, params)
    got = kernel(base, tuned, out, "bench", axis, params)
    assert (got.kept, got.restored, got.fallbacks) == (want.kept, want.restored, want.fallbacks)
    scaled = params.rescale_mode == "l1" or params.restore == "rescale"
    apart = ulps_apart(out.cpu(), expected)
    assert apart <= (1 if scaled else 0), f"{apart} ulps from the cpp backend's bytes"
    benchmark.extra_info["ulps_from_cpp"] = apart

    def merge():
        kernel(base, tuned, out, "bench", axis, params)

    run_timed(benchmark, merge, base, tuned, out)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_torch_reference(benchmark, shape, method):
    rows, cols, axis = shape
    params = params_for(**METHODS[method])
    base, tuned = pair(rows, cols)
    out = torch.empty_like(base)

    def merge():
        merge_reference(base, tuned, out, "bench", axis, params)

    run_timed(benchmark, merge, base, tuned, out)


@pytest.mark.parametrize("method", [m for m in METHODS if "neu" not in m])
@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[2:], ids=shape_id)
def test_mergekit_sparsify(benchmark, shape, method):
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    rows, cols, _ = shape
    params = params_for(**METHODS[method])
    kind = MERGEKIT[params.suppress]
    base, tuned = pair(rows, cols)
    out = torch.empty_like(base)
    rescale = RescaleNorm.l1 if params.rescale_mode == "l1" else None

    def merge():
        delta = tuned.float() - base.float()
        if kind is not None:
            delta = sparsify(
                delta,
                params.density,
                SparsificationMethod(kind),
                gamma=params.gamma,
                epsilon=params.epsilon,
                rescale_norm=rescale,
            )
        out.copy_(base.float() + params.weight * delta)

    run_timed(benchmark, merge, base, tuned, out)


@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[2:], ids=shape_id)
def test_plain_pass(benchmark, shape):
    # One elementwise kernel reading base and tuned and writing out: the bandwidth ceiling.
    rows, cols, _ = shape
    base, tuned = pair(rows, cols)
    out = torch.empty_like(base)
    run_timed(benchmark, lambda: torch.sub(tuned, base, out=out), base, tuned, out)
