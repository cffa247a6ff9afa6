"""End-to-end CLI merges: peak memory must not grow with model size (issue: engine).

A 2-layer and a 6-layer generated pair with the same matrix shapes (TinyLlama-like: hidden 2048,
intermediate 5632, vocabulary 32000, bf16) are merged by the CLI; wall time and peak RSS of each.
Run: make bench, or  python -m pytest bench/bench_pipeline.py -q -s
"""

from __future__ import annotations

import pytest
from conftest import cached_pair
from measure import measure, merge_command

from fusion_kernels.demo import PairSpec

SHAPES = dict(hidden=2048, intermediate=5632, heads=16, kv_heads=4, vocab=32000, shards=2)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_peak_rss_does_not_grow_with_layers(benchmark, bench_dir, backend):
    results = {}
    for layers in (2, 6):
        base, tuned = cached_pair(f"tinyllama-{layers}l", PairSpec(layers=layers, **SHAPES))
        out = bench_dir / f"out-{layers}l"
        results[layers] = measure(
            merge_command(base, tuned, out, "--method", "neu-p-ties", "--backend", backend)
        )
    ratio = results[6]["peak_rss"] / results[2]["peak_rss"]
    benchmark.extra_info.update(
        {
            "peak_rss_2_layers_MB": results[2]["peak_rss"] / 1e6,
            "peak_rss_6_layers_MB": results[6]["peak_rss"] / 1e6,
            "peak_rss_ratio": ratio,
            "seconds_2_layers": results[2]["seconds"],
            "seconds_6_layers": results[6]["seconds"],
        }
    )
    print(
        f"\n[{backend}] peak RSS 2 layers {results[2]['peak_rss'] / 1e6:.0f} MB, 6 layers "
        f"{results[6]['peak_rss'] / 1e6:.0f} MB (ratio {ratio:.3f}); "
        f"wall {results[2]['seconds']:.1f} s, "
        f"{results[6]['seconds']:.1f} s"
    )
    benchmark.pedantic(lambda: None, rounds=1)
    assert ratio < 1.15, "peak memory grew with model size"
