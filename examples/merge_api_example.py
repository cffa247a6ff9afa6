"""Using fusion_kernels from Python: one tensor, then a whole checkpoint.

Run: python examples/merge_api_example.py [WORKDIR]
"""

import sys
import tempfile
from pathlib import Path

import torch

import fusion_kernels as fk
from fusion_kernels.demo import PairSpec, generate_pair


def one_tensor() -> None:
    # An up_proj weight: its rows are neurons. Four neurons changed a lot, the rest a little.
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(256, 128, generator=gen).to(torch.bfloat16)
    tuned = (base.float() + 0.05 * torch.randn(256, 128, generator=gen)).to(torch.bfloat16)
    tuned[[3, 50, 99, 200]] += 1.0
    merged, stats = fk.merge_tensor(
        base,
        tuned,
        "model.layers.0.mlp.up_proj.weight",
        method="neu-p-ties",
        top_neurons=4 / 256,
    )
    restored = (merged == tuned).all(dim=1).nonzero().flatten().tolist()
    print(
        f"kept {stats.kept} of {stats.numel} entries; restored neurons {restored} ({stats.backend})"
    )
    assert restored == [3, 50, 99, 200]


def whole_checkpoint(workdir: Path) -> None:
    base, tuned = generate_pair(workdir, PairSpec(hidden=64, intermediate=128, layers=2, vocab=256))
    params = fk.params_for("neu-s-ties", density=0.1)
    report = fk.merge_checkpoints(base, tuned, workdir / "merged", params, progress=False)
    totals = report["totals"]
    print(
        f"merged {totals['merged']} tensors, restored {totals['restored_neurons']} neurons "
        f"into {workdir / 'merged'}"
    )
    assert (workdir / "merged" / "fusion_report.json").exists()


if __name__ == "__main__":
    one_tensor()
    if len(sys.argv) > 1:
        whole_checkpoint(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            whole_checkpoint(Path(tmp))
