"""Peak memory set by the budget, not by the largest tensor; and the full 8B merge's wall time
against the machine's I/O floor.

Generated Llama-layout bf16 pairs (cached in .bench_data/), merged by the CLI with TIES 0.2 on the
cpp backend at the default ``--memory-budget``; wall time and peak RSS from a wrapper process
(RUSAGE_CHILDREN). ``FK_BENCH_BEFORE=DIR`` (a checkout of the code to compare with) adds the same
runs with that code, interleaved. The 32-layer 8B pair needs 32 GB of disk and 48 GB with its
output: it runs only with ``FK_BENCH_8B=1``. Run:

    python -m pytest bench/bench_memory.py -q -s --benchmark-only
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys

import pytest
from conftest import cached_pair
from measure import measure, merge_command

from fusion_kernels.demo import PairSpec

GB = 1e9
LLAMA_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8)
PAIRS = {
    "hidden 4096, vocab 32000": ("h4096-v32000-1l", PairSpec(vocab=32000, layers=1, **LLAMA_8B)),
    "hidden 4096, vocab 128256": ("h4096-v128256-1l", PairSpec(vocab=128256, layers=1, **LLAMA_8B)),
    "70B shapes (8192, 28672, 128256)": (
        "llama3-70b-1l",
        PairSpec(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256, layers=1),
    ),
}
FULL_8B = ("llama3-8b-32l", PairSpec(vocab=128256, layers=32, shards=4, **LLAMA_8B))
FLAGS = ("--method", "ties", "--density", "0.2", "--backend", "cpp")


def _code_versions() -> dict[str, str | None]:
    """``{"after": None (this checkout), "before": DIR}`` as requested."""
    versions: dict[str, str | None] = {"after": None}
    if os.environ.get("FK_BENCH_BEFORE"):
        versions["before"] = os.environ["FK_BENCH_BEFORE"]
    return versions


def _merge(base, tuned, out, code: str | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = None if code is None else {**os.environ, "PYTHONPATH": code}
    result = measure(merge_command(base, tuned, out, *FLAGS), env=env)
    shutil.rmtree(out, ignore_errors=True)
    return result


def test_peak_rss_is_set_by_the_budget(benchmark, bench_dir):
    rows = {}
    for label, (name, spec) in PAIRS.items():
        base, tuned = cached_pair(name, spec)
        for version, code in _code_versions().items():
            rows[label, version] = _merge(base, tuned, bench_dir / "out-memory", code)
    print()
    for (label, version), r in rows.items():
        print(
            f"{label:34s} {version:6s} peak RSS {r['peak_rss'] / GB:.2f} GB, {r['seconds']:.1f} s"
        )
    after = {label: rows[label, "after"]["peak_rss"] for label in PAIRS}
    ratio = after["70B shapes (8192, 28672, 128256)"] / after["hidden 4096, vocab 32000"]
    print(f"RSS(70B shapes) / RSS(vocab 32000) = {ratio:.3f}")
    benchmark.extra_info.update({f"{k} {v}": r["peak_rss"] / GB for (k, v), r in rows.items()})
    benchmark.pedantic(lambda: None, rounds=1)
    assert max(after.values()) <= 1 * GB
    assert ratio <= 1.15


def _cpu_times() -> list[int]:
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:]]


def _io_floor(base, tuned, scratch) -> dict:
    """Reading both inputs while writing one model's bytes: cat base > /dev/null & cp tuned."""
    shutil.rmtree(scratch, ignore_errors=True)
    script = f"cat {base}/*.safetensors > /dev/null & cp -r {tuned} {scratch}; wait; sync"
    result = measure(["bash", "-c", script])
    shutil.rmtree(scratch, ignore_errors=True)
    return result


@pytest.mark.skipif(not os.environ.get("FK_BENCH_8B"), reason="needs FK_BENCH_8B=1 and 48 GB")
def test_full_8b_wall_time_against_the_io_floor(benchmark, bench_dir):
    base, tuned = cached_pair(*FULL_8B)
    rounds = int(os.environ.get("FK_BENCH_ROUNDS", "3"))
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        jobs = [("floor", lambda: _io_floor(base, tuned, bench_dir / "floor-copy"))]
        for version, code in _code_versions().items():
            jobs.append((version, lambda c=code: _merge(base, tuned, bench_dir / "out-8b", c)))
        for label, job in jobs:
            before = _cpu_times()
            result = job()
            after = _cpu_times()
            spent = [b - a for a, b in zip(before, after, strict=True)]
            result["iowait_share"] = spent[4] / max(sum(spent), 1)
            result["busy_share"] = 1 - (spent[3] + spent[4]) / max(sum(spent), 1)
            runs.setdefault(label, []).append(result)
    print()
    medians = {}
    for label, results in runs.items():
        seconds = [r["seconds"] for r in results]
        medians[label] = statistics.median(seconds)
        listed = ", ".join(f"{s:.1f}" for s in seconds)
        iowait = statistics.median(r["iowait_share"] for r in results)
        busy = statistics.median(r["busy_share"] for r in results)
        print(
            f"{label:6s} median {medians[label]:.1f} s (runs {listed}); peak RSS "
            f"{max(r['peak_rss'] for r in results) / GB:.2f} GB; iowait {iowait:.0%}, "
            f"CPU busy {busy:.0%} of {os.cpu_count()} cores"
        )
    for version in _code_versions():
        print(f"{version}: {medians[version] / medians['floor']:.2f}x the I/O floor")
    benchmark.extra_info.update({f"median_{k}_s": v for k, v in medians.items()})
    benchmark.pedantic(lambda: None, rounds=1)


if __name__ == "__main__":
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", __file__, "-q", "-s"]))
