"""Compile the Triton backend's kernels for a CUDA target without a GPU, and read their resources.

The launcher runs on ``meta`` tensors of real shapes with its CUDA block sizes, and its launches
are recorded instead of run; each distinct kernel variant (kernel, constexprs, warps, argument
types) is then compiled by ``kernel.warmup(..., grid=...)`` under a stand-in active driver whose
current target is ``GPUTarget("cuda", capability, 32)``. Triton's own ptxas assembles the cubin,
whose resource usage (registers, stack frame: the spills) the shipped ``cuobjdump`` reports; the
dynamic shared memory is in the compiled kernel's metadata.

Run as a script (what test_triton_compile.py does, in a process without TRITON_INTERPRET, since
the interpreter replaces the compiler):

    python tests/triton_compile.py --target 90 --dtypes bfloat16 --json out.json [--shard 0/4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import METHOD_CASES

from fusion_kernels.ops.contract import plan_tensor
from fusion_kernels.ops.triton import job as triton_job
from fusion_kernels.ops.triton import launcher
from fusion_kernels.ops.triton.combine import enqueue_multi
from fusion_kernels.params import Combine, params_for

# Shared memory a block may use (opt-in maximum), by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# CUDA's grid limits: x up to 2^31 - 1, y and z up to 65535.
GRID_LIMIT = (2**31 - 1, 65535, 65535)

# Llama-3.1-405B's weights (hidden 16384, intermediate 53248, 8 KV heads of 128, vocabulary
# 128256): the largest real shapes, for the grid limits. Llama-3-8B's and short rows add the
# block shapes of smaller tensors (partial tiles, 1-entry rows).
SHAPES_405B = {
    "q_proj": (16384, 16384),
    "k_proj": (1024, 16384),
    "up_proj": (53248, 16384),
    "down_proj": (16384, 53248),
    "embed_tokens": (128256, 16384),
    "norm": (16384,),
}
SHAPES_SMALL = {
    "8b_up_proj": (14336, 4096),
    "8b_down_proj": (4096, 14336),
    "8b_norm": (4096,),
    "rows_of_1000": (48, 1000),
    "rows_of_1": (5, 1),
}
CASES = [*METHOD_CASES, dict(suppress="magnitude", density=0.2, select="approx")]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    num_warps: int
    meta: dict
    where: str  # which configuration launched it first

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def variant(self) -> tuple:
        """What makes Triton compile a separate binary: the kernel, its constexprs and warps, and
        each argument's type and specialisation (1, divisible by 16, 32-bit)."""
        return (self.name, self.num_warps, tuple(sorted(self.meta.items())), _spec(self.args))


def _spec(args) -> tuple:
    out = []
    for a in args:
        if isinstance(a, tuple):
            out.append(_spec(a))
        elif isinstance(a, torch.Tensor):
            out.append(str(a.dtype))
        elif isinstance(a, bool) or not isinstance(a, int):
            out.append(type(a).__name__)
        else:
            out.append((a == 1, a % 16 == 0, -(2**31) <= a < 2**31))
    return tuple(out)


@contextlib.contextmanager
def _recording(where: str):
    """Within: the launcher records its launches (CUDA tuning) into the list it yields."""
    launches: list[Launch] = []

    def launch(job, kernel, grid, *args, num_warps=None, **meta):
        warps = num_warps or job.tuning.num_warps
        launches.append(Launch(kernel, tuple(grid), args, warps, meta, where))

    tuning, launch_fn = triton_job._tuning, triton_job._Job.launch
    triton_job._tuning = lambda device: triton_job.CUDA_TUNING
    triton_job._Job.launch = launch
    try:
        yield launches
    finally:
        triton_job._tuning, triton_job._Job.launch = tuning, launch_fn


def record(shape, dtype, case: dict, axis: str) -> list[Launch]:
    """The launches one merge makes, with the CUDA block sizes, on meta tensors (nothing runs)."""
    with _recording(f"{tuple(shape)} {dtype} {case} axis={axis}") as launches:
        base = torch.empty(shape, dtype=dtype, device="meta")
        params = params_for(**case)
        plan = plan_tensor(params, base.shape, axis, "compile")
        launcher._enqueue(triton_job._prepare(base, base, base, plan, params))
    return launches


# Merges of several tuned models (the combining kernel): models of every mask kind, each
# consensus; recorded on the smaller shapes (the kernel's grid is the write kernel's).
MULTI_CASES = [
    (("neu-p-ties", "dare", "della"), Combine("sum", True, 0.7)),
    (("neu-p-ties", "dare", "della", "neu-s-bread", "task_arithmetic"), Combine("count", True)),
]


def record_multi(shape, dtype, methods, combine: Combine, axis: str) -> list[Launch]:
    """The launches of one merge of several tuned models, as :func:`record` takes them."""
    with _recording(f"{tuple(shape)} {dtype} {methods} {combine} axis={axis}") as launches:
        base = torch.empty(shape, dtype=dtype, device="meta")
        jobs = []
        for model, method in enumerate(methods, start=1):
            params = params_for(method)
            plan = plan_tensor(params, base.shape, axis, "compile", model)
            jobs.append(triton_job._prepare(base, base, base, plan, params))
        enqueue_multi(jobs, combine)
    return launches


def configurations(shapes: dict, dtypes):
    for shape in shapes.values():
        for dtype in dtypes:
            for case in CASES:
                for axis in ("row", "col", "none"):
                    if axis == "none" or len(shape) == 2:
                        yield shape, dtype, case, axis


def grid_excess(shapes: dict, dtypes) -> list[str]:
    """Every launch whose grid passes CUDA's limits (none, we hope), said in words."""
    bad = []
    for config in configurations(shapes, dtypes):
        for launch in record(*config):
            grid = launch.grid + (1,) * (3 - len(launch.grid))
            if any(g > limit or g < 1 for g, limit in zip(grid, GRID_LIMIT, strict=True)):
                bad.append(f"{launch.name} grid {launch.grid} for {launch.where}")
    return bad


def variants(dtypes) -> dict[tuple, Launch]:
    found: dict[tuple, Launch] = {}
    for shapes in (SHAPES_405B, SHAPES_SMALL):
        for config in configurations(shapes, dtypes):
            for launch in record(*config):
                found.setdefault(launch.variant(), launch)
    for shape in SHAPES_SMALL.values():
        for dtype in dtypes:
            for methods, combine in MULTI_CASES:
                axis = "row" if len(shape) == 2 else "none"
                for launch in record_multi(shape, dtype, methods, combine, axis):
                    found.setdefault(launch.variant(), launch)
    return found


class StandInDriver:
    """Triton's active driver for a GPU that is not there: a target, a device id, a stream."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # One per target: Triton caches binders and kernels per device id.
        return 1000 + self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _host_arg(a):
    # Compiling reads only a tensor's dtype and alignment: a small aligned host tensor will do.
    if isinstance(a, tuple):  # the combining kernel's per-model arguments
        return tuple(map(_host_arg, a))
    return torch.empty(16, dtype=a.dtype) if isinstance(a, torch.Tensor) else a


def resources(cubin: bytes) -> dict:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():  # Triton builds that ship no cuobjdump: the CUDA toolkit's
        tool = Path(shutil.which("cuobjdump") or tool)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", handle.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    fields = dict(
        item.split(":", 1) for line in text.splitlines() if "REG:" in line for item in line.split()
    )
    return {
        "reg": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "local": int(fields["LOCAL"]),
    }


def compile_all(capability: int, dtypes, smoke: bool = False, shard=(0, 1)) -> list[dict]:
    """Compile every variant (``smoke``: the first of each kernel) for sm_``capability``;
    ``shard = (i, n)`` takes every n-th of them from the i-th, so n processes share the work."""
    from triton.runtime import driver

    launches = list(variants(dtypes).values())
    if smoke:
        launches = list({launch.name: launch for launch in reversed(launches)}.values())
    launches = launches[shard[0] :: shard[1]]
    previous = driver._active
    driver.set_active(StandInDriver(capability))
    rows = []
    try:
        for launch in launches:
            started = time.perf_counter()
            compiled = launch.kernel.warmup(
                *map(_host_arg, launch.args),
                grid=launch.grid,
                num_warps=launch.num_warps,
                enable_fp_fusion=False,
                **launch.meta,
            )
            rows.append(
                {
                    "kernel": launch.name,
                    "meta": {k: v for k, v in launch.meta.items() if not k.endswith("_KIND")},
                    "kinds": [launch.meta.get("BASE_KIND"), launch.meta.get("TUNED_KIND")],
                    "num_warps": launch.num_warps,
                    "where": launch.where,
                    "shared": compiled.metadata.shared,
                    "seconds": round(time.perf_counter() - started, 2),
                    **resources(compiled.asm["cubin"]),
                }
            )
    finally:
        driver._active = previous
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=int, required=True, help="e.g. 90 for sm_90")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--json", required=True)
    parser.add_argument("--smoke", action="store_true", help="one variant of each kernel")
    parser.add_argument("--shard", default="0/1", help="I/N: every N-th variant from the I-th")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    index, count = map(int, args.shard.split("/"))
    rows = compile_all(args.target, dtypes, args.smoke, (index, count))
    Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
