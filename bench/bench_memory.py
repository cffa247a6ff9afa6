"""Peak memory set by the budget, not by the largest tensor; and the full 8B merge's wall time
against the machine's I/O floor.

Generated Llama-layout bf16 pairs (cached in .bench_data/), merged by the CLI with TIES 0.2 on the
cpp backend at the default ``--memory-budget``; wall time and peak RSS from a wrapper process
(RUSAGE_CHILDREN). ``FK_BENCH_BEFORE=DIR`` (a checkout of the code to compare with) adds the same
runs with that code, interleaved. ``--verify`` on and off side by side (neu-p-ties) shows that
reading the output back costs time, not memory. The 32-layer 8B pair needs 32 GB of disk and
48 GB with its output: it runs only with ``FK_BENCH_8B=1``. Run:

    python -m pytest bench/bench_memory.py -q -s --benchmark-only
"""

from __future__ import annotations

import functools
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


def _merge(base, tuned, out, code: str | None, flags: tuple[str, ...] = FLAGS) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = None if code is None else {**os.environ, "PYTHONPATH": code}
    # Run from the other checkout: ``python -m`` puts the working directory first on the path.
    result = measure(merge_command(base, tuned, out, *flags), env=env, cwd=code)
    shutil.rmtree(out, ignore_errors=True)
    return result


def _rounds() -> int:
    return int(os.environ.get("FK_BENCH_ROUNDS", "3"))


def _interleaved(jobs: list[tuple[str, object]], rounds: int) -> dict[str, list[dict]]:
    """Every job once per round, the order reversed every other round, so that machine load
    and the page cache's state fall on each job alike."""
    runs: dict[str, list[dict]] = {}
    for index in range(rounds):
        for label, job in jobs if index % 2 == 0 else jobs[::-1]:
            runs.setdefault(label, []).append(job())
    return runs


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_peak_rss_is_set_by_the_budget(benchmark, bench_dir, cache):
    """``cold``: the inputs dropped from the page cache before every run (read from disk,
    direct where the file system allows); ``warm``: as the previous run left them."""
    after = {}
    print()
    for label, (name, spec) in PAIRS.items():
        base, tuned = cached_pair(name, spec)
        jobs = []
        for version, code in _code_versions().items():
            job = functools.partial(_merge, base, tuned, bench_dir / "out-memory", code)
            jobs.append((version, _evicted(job, base, tuned) if cache == "cold" else job))
        for version, results in _interleaved(jobs, _rounds()).items():
            peak = max(r["peak_rss"] for r in results)
            seconds = [r["seconds"] for r in results]
            listed = ", ".join(f"{s:.1f}" for s in seconds)
            print(
                f"{cache} {label:34s} {version:6s} peak RSS {peak / GB:.3f} GB "
                f"({peak / 2**30:.3f} GiB), median {statistics.median(seconds):.1f} s ({listed})"
            )
            if version == "after":
                after[label] = peak
    ratio = after["70B shapes (8192, 28672, 128256)"] / after["hidden 4096, vocab 32000"]
    print(f"RSS(70B shapes) / RSS(vocab 32000) = {ratio:.3f}")
    benchmark.extra_info.update({f"{k} after": v / GB for k, v in after.items()})
    benchmark.pedantic(lambda: None, rounds=1)
    assert max(after.values()) <= 1 * GB
    assert ratio <= 1.15


VERIFY_FLAGS = ("--method", "neu-p-ties", "--backend", "cpp")


@pytest.mark.parametrize("label", ["hidden 4096, vocab 32000", "hidden 4096, vocab 128256"])
def test_peak_rss_verify_on_off(benchmark, bench_dir, label):
    """``--verify`` re-reads the output within the same budget: peak RSS with it and without it,
    side by side (interleaved, warm cache), on pairs whose embeddings stream in chunks."""
    name, spec = PAIRS[label]
    base, tuned = cached_pair(name, spec)
    out = bench_dir / "out-verify"
    jobs = [
        (flag or "off", functools.partial(_merge, base, tuned, out, None, VERIFY_FLAGS + flags))
        for flag, flags in (("", ()), ("on", ("--verify",)))
    ]
    peaks = {}
    print()
    for version, results in _interleaved(jobs, _rounds()).items():
        peaks[version] = max(r["peak_rss"] for r in results)
        seconds = statistics.median(r["seconds"] for r in results)
        peak = peaks[version] / GB
        print(f"{label:26s} verify {version:3s} peak RSS {peak:.3f} GB, {seconds:.1f} s")
    benchmark.extra_info.update({f"verify {k}": v / GB for k, v in peaks.items()})
    benchmark.pedantic(lambda: None, rounds=1)
    assert peaks["on"] <= 1.1 * peaks["off"]


def _cpu_times() -> list[int]:
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:]]


def _with_cpu_shares(job):
    """``job`` whose result also says which share of the machine's CPU time went to iowait
    and to work (all processes, all cores) while it ran."""

    def run() -> dict:
        before = _cpu_times()
        result = job()
        spent = [b - a for a, b in zip(before, _cpu_times(), strict=True)]
        result["iowait_share"] = spent[4] / max(sum(spent), 1)
        result["busy_share"] = 1 - (spent[3] + spent[4]) / max(sum(spent), 1)
        return result

    return run


def _evicted(job, *directories):
    """``job`` run after the files of ``directories`` are dropped from the page cache, so that
    every run reads its inputs from disk and starts with the same free memory (on some virtual
    machines, memory that was free costs more at first touch than memory being recycled)."""

    def run() -> dict:
        os.sync()
        for directory in directories:
            for path in directory.iterdir():
                if path.is_file():
                    _drop(path)
        return job()

    return run


def _half_cached(job, *directories):
    """``job`` run with the first half of each directory's weight shards in the page cache and
    the rest evicted: the state in which cached tensors are read in place from the mapping."""

    def run() -> dict:
        for directory in directories:
            shards = sorted(directory.glob("*.safetensors"))
            for path in shards[len(shards) // 2 :]:
                _drop(path)
            for path in shards[: len(shards) // 2]:
                with open(path, "rb") as file:
                    while file.read(64 * 2**20):
                        pass
        return job()

    return run


def _drop(path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


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
    jobs = [("floor", lambda: _io_floor(base, tuned, bench_dir / "floor-copy"))]
    for version, code in _code_versions().items():
        jobs.append((version, lambda c=code: _merge(base, tuned, bench_dir / "out-8b", c)))
    runs = _interleaved(
        [(label, _evicted(_with_cpu_shares(job), base, tuned)) for label, job in jobs], _rounds()
    )
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
            f"{max(r['peak_rss'] for r in results) / GB:.3f} GB; iowait {iowait:.0%}, "
            f"CPU busy {busy:.0%} of {os.cpu_count()} cores"
        )
    for version in _code_versions():
        print(f"{version}: {medians[version] / medians['floor']:.2f}x the I/O floor")
    benchmark.extra_info.update({f"median_{k}_s": v for k, v in medians.items()})
    benchmark.pedantic(lambda: None, rounds=1)


@pytest.mark.skipif(not os.environ.get("FK_BENCH_8B"), reason="needs FK_BENCH_8B=1 and 48 GB")
def test_full_8b_peak_rss_cold_and_warm(benchmark, bench_dir):
    """Peak RSS of the full 8B merge (neu-p-ties) with the inputs evicted before the run (cold)
    and with the first half of each model's shards in the page cache (warm: 32 GB of inputs do
    not fit this machine's memory, and direct reads leave none of them cached after a run), side
    by side in one run with ``FK_BENCH_BEFORE``'s code."""
    base, tuned = cached_pair(*FULL_8B)
    flags = ("--method", "neu-p-ties", "--backend", "cpp")
    jobs = []
    for version, code in _code_versions().items():
        job = functools.partial(_merge, base, tuned, bench_dir / "out-8b-rss", code, flags)
        jobs += [
            (f"{version} cold", _evicted(job, base, tuned)),
            (f"{version} warm", _half_cached(job, base, tuned)),
        ]
    print()
    peaks = {}
    for label, results in _interleaved(jobs, _rounds()).items():
        peaks[label] = max(r["peak_rss"] for r in results)
        seconds = statistics.median(r["seconds"] for r in results)
        print(f"{label:12s} peak RSS {peaks[label] / GB:.3f} GB, median {seconds:.1f} s")
    benchmark.extra_info.update({k: v / GB for k, v in peaks.items()})
    benchmark.pedantic(lambda: None, rounds=1)
    assert peaks["after cold"] <= 1 * GB and peaks["after warm"] <= 1 * GB


@pytest.mark.skipif(
    not (os.environ.get("FK_BENCH_8B") and os.environ.get("FK_BENCH_MERGEKIT")),
    reason="needs FK_BENCH_8B=1 FK_BENCH_MERGEKIT=1 (about 12 minutes a run)",
)
def test_full_8b_mergekit_yaml(benchmark, bench_dir):
    """The same TIES merge of the 8B pair by ``mergekit-yaml`` (one run: it is slow), for the
    ratio to our median above."""
    pytest.importorskip("mergekit", reason="installed by the test extra")
    from bench_mergekit import FLAGS as MERGEKIT_FLAGS
    from bench_mergekit import MERGEKIT_YAML, write_config

    base, tuned = cached_pair(*FULL_8B)
    config = write_config(bench_dir / "ties-8b.yml", "ties", base, tuned, weight=1.0, density=0.2)
    out = bench_dir / "out-8b-mergekit"
    shutil.rmtree(out, ignore_errors=True)
    result = measure([MERGEKIT_YAML, config, out, *MERGEKIT_FLAGS])
    shutil.rmtree(out, ignore_errors=True)
    print(f"\nmergekit-yaml {result['seconds']:.1f} s, peak RSS {result['peak_rss'] / GB:.2f} GB")
    benchmark.extra_info.update(mergekit_s=result["seconds"], mergekit_rss=result["peak_rss"])
    benchmark.pedantic(lambda: None, rounds=1)


if __name__ == "__main__":
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", __file__, "-q", "-s"]))
