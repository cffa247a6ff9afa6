"""The Triton kernels compile for sm_80, sm_86, sm_89 and sm_90, fit each target's shared memory,
do not spill, and launch within CUDA's grid limits at the largest real shapes: checked without a
GPU (see triton_compile.py for how).

Every kernel variant the pipeline can launch (each method, restore, axis, dtype and block shape,
from Llama-3.1-405B's and smaller tensors) is compiled in the ``slow`` tests; the quick one
compiles one variant of each kernel for the tightest target (sm_86: 99 KiB of shared memory).
Compiled kernels land in Triton's cache, so a rerun takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
import triton_compile as tc

HERE = Path(__file__).parent
# No variant may spill: ptxas's stack frame (where spilled registers live) must be empty.
MAX_STACK_BYTES = 0
MAX_REGISTERS = 255  # ptxas's ceiling per thread; more would not assemble at all


def compile_for(target: int, dtypes: str, tmp_path: Path, smoke: bool = False) -> list[dict]:
    out = tmp_path / f"sm{target}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [sys.executable, str(HERE / "triton_compile.py"), "--target", str(target)]
    command += ["--dtypes", dtypes, "--json", str(out)] + (["--smoke"] if smoke else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def check(rows: list[dict], target: int) -> None:
    limit = tc.SHARED_LIMIT[target]
    too_big = [r for r in rows if r["shared"] > limit]
    spilled = [r for r in rows if r["stack"] > MAX_STACK_BYTES or r["local"] > MAX_STACK_BYTES]
    assert not too_big, f"sm_{target}: over {limit} B of shared memory: {too_big}"
    assert not spilled, f"sm_{target}: spills: {spilled}"
    assert all(r["reg"] <= MAX_REGISTERS for r in rows)
    worst = {
        "shared": max(rows, key=lambda r: r["shared"]),
        "reg": max(rows, key=lambda r: r["reg"]),
        "stack": max(rows, key=lambda r: r["stack"]),
    }
    print(f"\nsm_{target}: {len(rows)} variants, {sum(r['seconds'] for r in rows):.0f} s")
    for what, row in worst.items():
        usage = f"shared {row['shared']} B, {row['reg']} registers, stack {row['stack']} B"
        print(f"  most {what}: {row['kernel']} {row['meta']} warps={row['num_warps']}: {usage}")


def test_grids_stay_within_cuda_limits_at_405b_shapes():
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    assert tc.grid_excess(tc.SHAPES_405B, dtypes) == []


def test_grid_check_catches_an_oversized_grid(monkeypatch):
    # One 1-D row of 2^36 entries (128 GiB in bf16): flat grids stay within x's 2^31 - 1.
    assert tc.grid_excess({"huge": (1 << 36,)}, [torch.bfloat16]) == []
    # A y dimension past 65535 is reported (the shape of the old della counting kernel's grid).
    launches = [tc.Launch(type("K", (), {"fn": tc.grid_excess})(), (1, 70000), (), 4, {}, "x")]
    monkeypatch.setattr(tc, "record", lambda *config: launches)
    assert len(tc.grid_excess({"any": (2, 2)}, [torch.bfloat16])) > 0


def test_one_variant_of_each_kernel_compiles_for_sm86(tmp_path):
    rows = compile_for(86, "bfloat16", tmp_path, smoke=True)
    assert len({r["kernel"] for r in rows}) == len(rows) >= 10
    check(rows, 86)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(tc.SHARED_LIMIT), ids=lambda t: f"sm_{t}")
def test_every_bf16_variant_fits_the_target(target, tmp_path):
    check(compile_for(target, "bfloat16", tmp_path), target)


@pytest.mark.slow
def test_every_fp16_and_fp32_variant_fits_sm86(tmp_path):
    # The dtypes change only loads and stores; the tightest target checks them all.
    check(compile_for(86, "float16,float32", tmp_path), 86)
