"""Locate's scores pass over a whole checkpoint pair, per backend (issue 7).

The 2-layer pair with Llama-3-8B's shapes (0.7 B parameters per model, bf16, cached in
``.bench_data/``): ``locate_checkpoints`` computes Σ|Δ| and C(j) for every tensor, reading both
checkpoints once. GB/s counts base + tuned bytes read. The figures (not the plots) are checked
equal across backends.

Run:  python -m pytest bench/bench_locate.py -q -s --benchmark-only
"""

from __future__ import annotations

import pytest
from conftest import cached_pair

from fusion_kernels.demo import PairSpec
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.locate import locate_checkpoints
from fusion_kernels.ops import available_backends

SPEC = PairSpec(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000, layers=2)
_results: dict[str, dict] = {}


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_locate_scores_pass(benchmark, backend):
    if backend not in available_backends():
        pytest.skip(f"backend {backend} is not available here")
    base, tuned = cached_pair("llama3-8b-shapes-2l", SPEC)
    result = benchmark.pedantic(
        locate_checkpoints,
        args=(base, tuned),
        kwargs={"backend": backend, "progress": False},
        rounds=3,
        iterations=1,
    )
    nbytes = Checkpoint(base).nbytes + Checkpoint(tuned).nbytes
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update({"GB/s": nbytes / seconds / 1e9, "backends": result["backends"]})
    print(f"\nlocate, backend {backend}: {seconds:.2f} s, {nbytes / seconds / 1e9:.2f} GB/s")
    assert result["backends"] == [backend]
    _results[backend] = {t["name"]: t for t in result["tensors"]}
    if len(_results) == 2:
        reference, fused = _results["torch"], _results["cpp"]
        for name, entry in reference.items():
            assert fused[name]["total_abs"] == pytest.approx(entry["total_abs"], rel=1e-12)
