"""The two Python steps of ``bench/gpu_check.sh``: the end-to-end GPU merge and the summary.

``e2e``: generate a Llama-3-8B-shape pair (2 layers, bf16, vocabulary 128256), merge it with the
CLI on the GPU (``--device cuda``) and with the cpp backend on the CPU, and compare every output
shard byte for byte; time both merges and a read of the inputs from the page cache (the goal: a
GPU merge within 1.3 times that read). The results file is rewritten after each method, so a
step cut short by its time limit keeps what it finished. ``summary``: one screen of every figure
in the check's working directory (test counts from the JUnit files, or from the verbose logs of
steps cut short before pytest wrote them).

    python bench/gpu_check.py e2e OUT_DIR [--data DIR] [--methods neuron_fusion,della]
    python bench/gpu_check.py summary OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

LLAMA3_8B_2_LAYERS = dict(
    hidden=4096, intermediate=14336, layers=2, heads=32, kv_heads=8, vocab=128256, shards=2
)
# The test steps of gpu_check.sh, in its order, and what each checks.
TEST_STEPS = {
    "cuda-core": "cuda tests: staged transport on every GPU, della rows > 16384 vs cpp, index ties",
    "cuda-cpp": "cuda tests: Llama-3-8B shapes and every dtype vs cpp's bytes",
    "cuda-reference": "cuda tests: the conformance matrix vs the torch reference",
}
READ_GOAL = 1.3  # a GPU merge within 1.3x the time of reading its inputs from the page cache
PEAK_GOAL = 0.5  # fused kernels at 50 % of HBM peak or more


def read_seconds(paths: list[Path]) -> float:
    """Seconds to read the files once they are in the page cache (read twice, time the second)."""
    for _ in range(2):
        started = time.perf_counter()
        for path in paths:
            with open(path, "rb", buffering=0) as handle:
                while handle.read(64 << 20):
                    pass
        seconds = time.perf_counter() - started
    return seconds


def merge(base: Path, tuned: Path, out: Path, method: str, *flags: str) -> float:
    """Seconds the CLI took to merge ``base`` and ``tuned`` into ``out``."""
    command = [sys.executable, "-m", "fusion_kernels.merge", "--base", str(base)]
    command += ["--tuned", str(tuned), "--out", str(out), "--method", method]
    command += ["--overwrite", "--quiet", *flags]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def oracle_flags() -> list[str]:
    """The backend the GPU's bytes are compared with: cpp, or the torch reference on the GPU
    where the C++ extension is not built (every backend writes the same bytes)."""
    try:
        import fusion_kernels._cpp  # noqa: F401
    except ImportError:
        return ["--device", "cuda", "--backend", "torch"]
    return ["--device", "cpu", "--backend", "cpp"]


def e2e(out_dir: Path, data: Path, methods: list[str], spec=None, device: str = "cuda") -> dict:
    """Merge the generated pair on ``device`` and with the oracle, per method; write and return
    the figures (``spec``: the pair's shapes, Llama-3-8B's with 2 layers unless given)."""
    from fusion_kernels.demo import PairSpec, generate_pair

    if not (data / "pair_spec.json").exists():
        generate_pair(data, spec or PairSpec(**LLAMA3_8B_2_LAYERS))
    base, tuned = data / "base", data / "tuned"
    inputs = sorted(base.glob("*.safetensors")) + sorted(tuned.glob("*.safetensors"))
    results = {
        "read_seconds": read_seconds(inputs),
        "input_bytes": sum(p.stat().st_size for p in inputs),
        "oracle": " ".join(oracle_flags()),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for method in methods:
        gpu, cpu = data / f"out-{method}-cuda", data / f"out-{method}-cpp"
        row = {"cuda_seconds": merge(base, tuned, gpu, method, "--device", device)}
        row["cpp_seconds"] = merge(base, tuned, cpu, method, *oracle_flags())
        report = json.loads((gpu / "fusion_report.json").read_text())
        row["cuda_merge_seconds"] = report["totals"]["seconds"]
        row["backends"] = report["backends"]
        shards = sorted(p.name for p in cpu.glob("*.safetensors"))
        row["differing_shards"] = [
            name for name in shards if (gpu / name).read_bytes() != (cpu / name).read_bytes()
        ]
        row["identical"] = bool(shards) and not row["differing_shards"]
        row["vs_read"] = row["cuda_merge_seconds"] / results["read_seconds"]
        results[method] = row
        (out_dir / "e2e.json").write_text(json.dumps(results, indent=1))
    return results


# A test's line in pytest -v output: "path::name[id] PASSED   [ 10%]".
VERBOSE_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)


def _from_log(path: Path) -> str:
    """Counts from a verbose log that pytest did not finish (the step hit its time limit)."""
    if not path.exists():
        return "no result"
    found = VERBOSE_LINE.findall(path.read_text(errors="replace"))
    if not found:
        return f"no result (see {path.name})"
    count = {k: sum(outcome == k for _, outcome in found) for k in ("PASSED", "SKIPPED")}
    failed = [name for name, outcome in found if outcome in ("FAILED", "ERROR")]
    line = f"{count['PASSED']} passed, {len(failed)} failed, {count['SKIPPED']} skipped"
    line += f" before it was cut short (last: {found[-1][0]})"
    return line + "".join(f"\n    FAILED {name}" for name in failed[:15])


def _junit(path: Path) -> str:
    if not path.exists():
        return _from_log(path.with_suffix(".log"))
    suites = ElementTree.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    failures = counts["failures"] + counts["errors"]
    line = f"{passed} passed, {failures} failed, {counts['skipped']} skipped"
    return line + "".join(f"\n    FAILED {name}" for name in failed[:15])


def _bench(path: Path) -> list[str]:
    if not path.exists():
        return ["  no result (see bench.log)"]
    lines = []
    for item in json.loads(path.read_text())["benchmarks"]:
        info = item.get("extra_info", {})
        fraction = info.get("fraction_of_peak")
        peak = f"{100 * fraction:5.1f} % of HBM peak" if fraction else "peak unknown"
        flag = (
            "" if not fraction or fraction >= PEAK_GOAL or "plain" in item["name"] else "  < 50 %"
        )
        lines.append(
            f"  {item['name']:<55} {item['stats']['mean'] * 1e3:8.2f} ms "
            f"{info.get('gbps', 0):7.0f} GB/s  {peak}{flag}"
        )
    return lines


def _compile(out_dir: Path) -> list[str]:
    # compile-sm90-3.json: shard 3 of the compilation for sm_90; one line per target.
    targets: dict[str, list[dict]] = {}
    for path in sorted(out_dir.glob("compile-*.json")):
        targets.setdefault(path.stem.rsplit("-", 1)[0], []).extend(json.loads(path.read_text()))
    lines = []
    for target, rows in targets.items():
        if not rows:
            continue
        worst = max(rows, key=lambda r: r["shared"])
        lines.append(
            f"  {target}: {len(rows)} variants; max shared {worst['shared']} B "
            f"({worst['kernel']}), max registers {max(r['reg'] for r in rows)}, "
            f"max stack {max(r['stack'] for r in rows)} B"
        )
    return lines or ["  no result (see precompile.log)"]


def _lines_with(path: Path, prefix: str) -> list[str]:
    if not path.exists():
        return []
    return ["  " + line for line in path.read_text().splitlines() if line.startswith(prefix)]


def summary(out_dir: Path) -> str:
    lines = [f"GPU check: {out_dir}"]
    lines += _lines_with(out_dir / "env.log", "device")
    lines += _lines_with(out_dir / "env.log", "cuda:N")
    lines += _lines_with(out_dir / "build.log", "cpp extension")
    steps = out_dir / "steps.txt"
    if steps.exists():
        lines += ["steps (rc 0 = ok, 124 = timed out):"]
        lines += ["  " + line for line in steps.read_text().splitlines()]
    lines += ["compile (this device's target):", *_compile(out_dir)]
    lines += [f"{what}: {_junit(out_dir / f'{step}.xml')}" for step, what in TEST_STEPS.items()]
    lines += [
        "kernel benchmarks (bytes checked against cpp first):",
        *_bench(out_dir / "bench.json"),
    ]
    e2e_path = out_dir / "e2e.json"
    if e2e_path.exists():
        result = json.loads(e2e_path.read_text())
        read, oracle = result["read_seconds"], result.get("oracle")
        lines += [f"end-to-end (Llama-3-8B shapes, 2 layers; inputs read from page cache in "
                  f"{read:.2f} s; compared with {oracle}):"]  # fmt: skip
        for method, row in result.items():
            if isinstance(row, dict):
                same = "byte-identical" if row["identical"] else (
                    f"DIFFERS in {row['differing_shards']}")  # fmt: skip
                goal = "ok" if row["vs_read"] <= READ_GOAL else "over 1.3x"
                lines.append(
                    f"  {method}: {same}; merge {row['cuda_merge_seconds']:.2f} s "
                    f"({row['vs_read']:.2f}x the read, {goal}); "
                    f"CLI wall {row['cuda_seconds']:.1f} s, oracle {row['cpp_seconds']:.1f} s"
                )
    else:
        lines += ["end-to-end: no result (see e2e.log)"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["e2e", "summary"])
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "fk-gpu-check"
    )
    parser.add_argument("--methods", default="neuron_fusion,della")
    args = parser.parse_args()
    if args.step == "e2e":
        print(json.dumps(e2e(args.out, args.data, args.methods.split(",")), indent=1))
    else:
        print(summary(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
