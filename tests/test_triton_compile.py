"""The Triton kernels compile for sm_80, sm_86, sm_89 and sm_90, fit each target's shared memory,
spill at most a few bytes, and launch within CUDA's grid limits at the largest real shapes:
checked without a GPU (see triton_compile.py for how).

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
# Spills: ptxas's stack frame per thread, where spilled registers live. At 8 entries a thread a
# few della variants keep 8-16 bytes of float64 values there (cached in L1); a bigger frame would
# mean a variant outgrew its tile.
MAX_STACK_BYTES = 64
MAX_REGISTERS = 255  # ptxas's ceiling per thread; more would not assemble at all


def start(target: int, dtypes: str, out: Path, smoke: bool = False) -> subprocess.Popen:
    """Compile in a child process without TRITON_INTERPRET (the interpreter replaces the
    compiler); the JSON of resources goes to ``out``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [sys.executable, str(HERE / "triton_compile.py"), "--target", str(target)]
    command += ["--dtypes", dtypes, "--json", str(out)] + (["--smoke"] if smoke else [])
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(child: subprocess.Popen, out: Path) -> list[dict]:
    output, _ = child.communicate(timeout=3600)
    assert child.returncode == 0, output.decode(errors="replace")[-3000:]
    return json.loads(out.read_text())


# The full sweep: every bf16 variant per target, and fp16/fp32 for the tightest target (the dtypes
# change only loads and stores).
SWEEP = {f"sm_{t}": (t, "bfloat16") for t in sorted(tc.SHARED_LIMIT)}
SWEEP["sm_86-fp16-fp32"] = (86, "float16,float32")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The sweep's compilations, started together when the first slow test asks (they run side
    by side on as many cores as there are)."""
    root = tmp_path_factory.mktemp("compile")
    children = {
        name: (start(target, dtypes, root / f"{name}.json"), root / f"{name}.json")
        for name, (target, dtypes) in SWEEP.items()
    }
    yield children
    for child, _ in children.values():
        if child.poll() is None:
            child.kill()
            child.wait()


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
    out = tmp_path / "smoke.json"
    rows = finish(start(86, "bfloat16", out, smoke=True), out)
    assert len({r["kernel"] for r in rows}) == len(rows) >= 10
    check(rows, 86)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SWEEP))
def test_every_variant_fits_the_target(sweep, name):
    check(finish(*sweep[name]), SWEEP[name][0])
