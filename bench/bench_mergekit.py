"""End to end on the CPU: stock mergekit, mergekit with our op, and our CLI, side by side.

Input: a generated 2-layer pair with Llama-3-8B's shapes (hidden 4096, intermediate 14336,
32 heads / 8 KV heads, vocabulary 32000, bf16, 0.7 B parameters per model), cached in
``.bench_data/``. TIES (density 0.2, weight 1): the same YAML run by ``mergekit-yaml`` and by
``python -m fusion_kernels.mergekit`` (the launcher: mergekit's pipeline, our sparsify), and our
CLI with ``--method ties --density 0.2``; as floors, ``python -c "import torch"`` and ``cp -r`` of
the tuned directory (the bytes our CLI writes). Neu-P-TIES (the ``neuron_fusion`` preset), which
stock mergekit cannot do: the launcher with ``merge_method: neuron_fusion`` and our CLI. Each round
runs every command once, in turn, into an output directory removed beforehand (outside the timing);
wall time and peak RSS are measured from outside. Medians over ``FK_BENCH_ROUNDS`` rounds
(default 3). The run checks that the two mergekit TIES outputs differ only in how ties of bf16
|Δ| at the kept threshold are broken, and that the launcher's and our CLI's Neu-P-TIES outputs are
byte-identical.

Run:  python -m pytest bench/bench_mergekit.py -q -s --benchmark-only
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cached_pair
from measure import measure, merge_command

from fusion_kernels.demo import PairSpec
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint

pytest.importorskip("mergekit", reason="installed by the test extra")

SPEC = PairSpec(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000, layers=2)
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"
FLAGS = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def write_config(path: Path, method: str, base: Path, tuned: Path, **parameters) -> Path:
    """A one-model mergekit YAML: ``tuned`` merged onto ``base`` with ``method``."""
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": method,
                "base_model": str(base.resolve()),
                "models": [{"model": str(tuned.resolve()), "parameters": parameters}],
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


def commands(bench_dir: Path, base: Path, tuned: Path) -> dict[str, tuple[list, Path | None]]:
    """Row label → (command, output directory to remove before it runs)."""
    ties_yaml = write_config(bench_dir / "ties.yml", "ties", base, tuned, weight=1.0, density=0.2)
    fusion_yaml = write_config(bench_dir / "neuron_fusion.yml", "neuron_fusion", base, tuned)
    launcher = [sys.executable, "-m", "fusion_kernels.mergekit"]
    rows = {
        "ties: mergekit-yaml": ([MERGEKIT_YAML, ties_yaml], "mergekit-stock"),
        "ties: fusion_kernels.mergekit": ([*launcher, ties_yaml], "mergekit-fast"),
        "ties: fusion_kernels.merge": (["--method", "ties", "--density", "0.2"], "ours-ties"),
        "neu-p-ties: fusion_kernels.mergekit": ([*launcher, fusion_yaml], "mergekit-fusion"),
        "neu-p-ties: fusion_kernels.merge": (["--method", "neu-p-ties"], "ours-fusion"),
    }
    built = {}
    for label, (args, directory) in rows.items():
        out = bench_dir / directory
        if label.endswith("fusion_kernels.merge"):
            built[label] = (merge_command(base, tuned, out, *args), out)
        else:
            built[label] = ([*args, out, *FLAGS], out)
    # Floors for our CLI: starting Python with torch, and copying the bytes it writes.
    built["floor: python -c 'import torch'"] = ([sys.executable, "-c", "import torch"], None)
    copy = bench_dir / "plain-copy"
    built["floor: cp -r tuned/"] = (["cp", "-r", tuned, copy], copy)
    return built


def test_mergekit_vs_fusion_kernels_end_to_end(benchmark, bench_dir):
    base, tuned = cached_pair("llama3-8b-shapes-2l", SPEC)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = commands(bench_dir, base, tuned)
    runs: dict[str, list[dict]] = {label: [] for label in rows}
    for _ in range(int(os.environ.get("FK_BENCH_ROUNDS", "3"))):
        for label, (command, out) in rows.items():
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)
            runs[label].append(measure(command))
    seconds = {label: statistics.median(r["seconds"] for r in rs) for label, rs in runs.items()}
    stock = seconds["ties: mergekit-yaml"]
    print()
    for label, rs in runs.items():
        rss = max(r["peak_rss"] for r in rs) / 1e6
        times = ", ".join(f"{r['seconds']:.2f}" for r in rs)
        speedup = stock / seconds[label] if label.startswith("ties") else None
        against = f", {speedup:.1f}x faster than mergekit-yaml" if speedup else ""
        print(f"{label}: median {seconds[label]:.2f} s ({times}){against}, peak RSS {rss:.0f} MB")
        benchmark.extra_info[label] = {"seconds": seconds[label], "peak_rss_MB": rss}
    differ, outside = differing_outside_ties(
        rows["ties: mergekit-yaml"][1], rows["ties: fusion_kernels.mergekit"][1], base, tuned
    )
    print(
        f"entries differing between the two mergekit ties outputs: {differ:.2e} of all, "
        f"{outside} of them not ties at the threshold"
    )
    benchmark.extra_info["differing_entries_fraction"] = differ
    benchmark.pedantic(lambda: None, rounds=1)
    assert outside == 0, "accelerated ties differs from stock beyond the threshold ties"
    fusion_outputs = [rows[k][1] for k in rows if k.startswith("neu-p-ties")]
    assert same_tensors(*fusion_outputs), "launcher and CLI neu-p-ties outputs differ"


def same_tensors(first: Path, second: Path) -> bool:
    """Whether two checkpoints hold the same tensor names with the same bytes."""
    a, b = Checkpoint(first), Checkpoint(second)
    if set(a.names()) != set(b.names()):
        return False
    return all(
        torch.equal(a.read(n).view(-1).view(torch.uint8), b.read(n).view(-1).view(torch.uint8))
        for n in a.names()
    )
