"""A LoRA-tuned merge (``--tuned BASE+ADAPTER``, the adapter merged in while streaming) against the
full-checkpoint merge of the same tuned model (the adapter merged and saved first) (issue 17).

Pair: the 2-layer TinyLlama-shaped bf16 model of bench_pipeline.py (hidden 2048, intermediate 5632,
vocabulary 32000) and a rank-16 float32 adapter on every q/k/v/o/gate/up/down projection. Both
merges run through the CLI (``--method neu-p-ties``, backend auto), alternating, several rounds;
the figure is the ratio of the minimum wall times (target ≤ 1.3) and of the peak RSS.
Run: python -m pytest bench/bench_lora.py -q -s
"""

from __future__ import annotations

import json

import torch
from conftest import cached_pair
from measure import measure, merge_command
from safetensors.torch import save_file

from fusion_kernels.demo import PairSpec
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.io.sources import open_checkpoint

SHAPES = dict(hidden=2048, intermediate=5632, heads=16, kv_heads=4, vocab=32000, shards=2)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, ROUNDS = 16, 32, 3


def write_adapter(base, root):
    """A PEFT-layout LoRA adapter for every projection of ``base``."""
    if (root / "adapter_config.json").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    ckpt = open_checkpoint(base)
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name in ckpt.names():
        if name.endswith(".weight") and name.split(".")[-2] in TARGETS:
            rows, cols = ckpt.info(name).shape
            module = "base_model.model." + name.removesuffix(".weight")
            weights[f"{module}.lora_A.weight"] = torch.randn(RANK, cols, generator=gen) / cols**0.5
            weights[f"{module}.lora_B.weight"] = 0.01 * torch.randn(rows, RANK, generator=gen)
    save_file(weights, str(root / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": TARGETS}
    (root / "adapter_config.json").write_text(json.dumps(config))
    return root


def write_materialized(base, adapter, root):
    """The tuned model as a full checkpoint (base's shard layout), computed once."""
    if (root / "config.json").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    tuned = open_checkpoint(f"{base}+{adapter}")
    for file in tuned.files:
        shard = {n: tuned.read(n) for n in tuned.names() if tuned.info(n).file == file}
        save_file(shard, str(root / file.name), metadata={"format": "pt"})
    for extra in ("model.safetensors.index.json", "config.json"):
        if (base / extra).exists():
            (root / extra).write_bytes((base / extra).read_bytes())
    return root


def test_lora_merge_cost_against_full_checkpoint(benchmark, bench_dir):
    base, _ = cached_pair("tinyllama-2l", PairSpec(layers=2, **SHAPES))
    adapter = write_adapter(base, bench_dir / "lora-r16" / "adapter")
    full = write_materialized(base, adapter, bench_dir / "lora-r16" / "full")
    flags = ("--method", "neu-p-ties")
    runs = {"full": [], "lora": []}
    for _ in range(ROUNDS):
        for kind, tuned in (("full", full), ("lora", f"{base}+{adapter}")):
            out = bench_dir / f"out-lora-{kind}"
            runs[kind].append(measure(merge_command(base, tuned, out, *flags)))
    # The same merged tensors (the shards lay them out in another order: save_file sorts).
    full_out, lora_out = (Checkpoint(bench_dir / f"out-lora-{kind}") for kind in runs)
    assert full_out.names() != [] and set(full_out.tensors) == set(lora_out.tensors)
    for name in full_out.names():
        assert torch.equal(full_out.read(name), lora_out.read(name)), name
    best = {kind: min(r["seconds"] for r in results) for kind, results in runs.items()}
    peak = {kind: max(r["peak_rss"] for r in results) for kind, results in runs.items()}
    ratio = best["lora"] / best["full"]
    benchmark.extra_info.update(
        {
            "seconds_full": best["full"],
            "seconds_lora": best["lora"],
            "time_ratio": ratio,
            "peak_rss_full_MB": peak["full"] / 1e6,
            "peak_rss_lora_MB": peak["lora"] / 1e6,
        }
    )
    print(
        f"\nfull-checkpoint merge {best['full']:.2f} s, LoRA merge {best['lora']:.2f} s "
        f"(ratio {ratio:.3f}, target <= 1.3); peak RSS {peak['full'] / 1e6:.0f} MB vs "
        f"{peak['lora'] / 1e6:.0f} MB; all runs: "
        f"{[round(r['seconds'], 2) for r in runs['full']]} / "
        f"{[round(r['seconds'], 2) for r in runs['lora']]}"
    )
    benchmark.pedantic(lambda: None, rounds=1)
