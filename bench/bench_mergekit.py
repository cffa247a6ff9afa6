"""Stock mergekit against ``python -m fusion_kernels.mergekit`` (accelerated mode) on one ties YAML.

Input: a generated 2-layer pair with Llama-3-8B's shapes (hidden 4096, intermediate 14336,
32 heads / 8 KV heads, vocabulary 32000, bf16, 0.7 B parameters per model), cached in
``.bench_data/``. The same YAML (ties, density 0.2, weight 1) is run by ``mergekit-yaml`` and by
the launcher, which swaps mergekit's sparsify for the fused op and changes nothing else; our own
CLI on the same merge (``--method ties --density 0.2``) is the third row. Wall time and peak RSS
of each command, measured from outside. The two mergekit outputs may differ only in how ties of
bf16 |Δ| at the kept threshold are broken; the run checks that and records the fraction.

Run:  python -m pytest bench/bench_mergekit.py -q -s --benchmark-only
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cached_pair
from measure import measure, merge_command

from fusion_kernels.demo import PairSpec
from fusion_kernels.reader import Checkpoint

pytest.importorskip("mergekit", reason="installed by the test extra")

SPEC = PairSpec(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000, layers=2)
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"
FLAGS = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def ties_config(path: Path, base: Path, tuned: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(base.resolve()),
                "models": [
                    {"model": str(tuned.resolve()), "parameters": {"weight": 1.0, "density": 0.2}}
                ],
            }
        )
    )
    return path


def differing_outside_ties(stock: Path, fast: Path, base: Path, tuned: Path) -> tuple[float, int]:
    """(fraction of entries where the two outputs differ, how many of them are not threshold
    ties). Both keep exactly k = max(1, int(0.2·n)) entries of mergekit's bf16 |Δ|; they may
    differ only where |Δ| equals the k-th largest, which argsort and the SPEC order break apart.
    """
    outputs = [Checkpoint(p) for p in (stock, fast, base, tuned)]
    differ = total = outside = 0
    for name in outputs[0].names():
        a, b, w0, w1 = (c.read(name).reshape(-1) for c in outputs)
        changed = a.view(torch.int16) != b.view(torch.int16)
        magnitude = (w1 - w0).abs().float()
        n = magnitude.numel()
        threshold = torch.kthvalue(magnitude, n - max(1, int(0.2 * n)) + 1).values
        differ += int(changed.sum())
        outside += int((magnitude[changed] != threshold).sum())
        total += n
    return differ / total, outside


def test_mergekit_ties_stock_vs_accelerated(benchmark, bench_dir):
    base, tuned = cached_pair("llama3-8b-shapes-2l", SPEC)
    config = ties_config(bench_dir / "ties.yml", base, tuned)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stock_out, fast_out = bench_dir / "mergekit-stock", bench_dir / "mergekit-fast"
    stock = measure([MERGEKIT_YAML, config, stock_out, *FLAGS])
    fast = measure([sys.executable, "-m", "fusion_kernels.mergekit", config, fast_out, *FLAGS])
    ours = measure(
        merge_command(base, tuned, bench_dir / "ours-ties", "--method", "ties", "--density", "0.2")
    )
    differ, outside = differing_outside_ties(stock_out, fast_out, base, tuned)
    ratio = stock["seconds"] / fast["seconds"]
    benchmark.extra_info.update(
        {
            "stock_seconds": stock["seconds"],
            "accelerated_seconds": fast["seconds"],
            "fusion_kernels_cli_seconds": ours["seconds"],
            "speedup": ratio,
            "stock_peak_rss_MB": stock["peak_rss"] / 1e6,
            "accelerated_peak_rss_MB": fast["peak_rss"] / 1e6,
            "fusion_kernels_cli_peak_rss_MB": ours["peak_rss"] / 1e6,
            "differing_entries_fraction": differ,
            "differing_outside_threshold_ties": outside,
        }
    )
    print(
        f"\nmergekit-yaml ties: {stock['seconds']:.1f} s, peak RSS {stock['peak_rss'] / 1e6:.0f} MB"
        f"\nfusion_kernels.mergekit (accelerated): {fast['seconds']:.1f} s, peak RSS "
        f"{fast['peak_rss'] / 1e6:.0f} MB  -> {ratio:.2f}x"
        f"\nfusion_kernels.merge --method ties: {ours['seconds']:.1f} s, peak RSS "
        f"{ours['peak_rss'] / 1e6:.0f} MB"
        f"\nentries differing between the two mergekit outputs: {differ:.2e} of all, "
        f"{outside} of them not ties at the threshold"
    )
    benchmark.pedantic(lambda: None, rounds=1)
    assert outside == 0, "accelerated ties differs from stock beyond the threshold ties"
