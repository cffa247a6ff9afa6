"""bench/gpu_check.sh: without a CUDA device it says so in one line, writes nothing and exits 0;
its steps run (shell functions included) under their time limits and leave at most five files in
$OUT; its summary reads whatever the steps left, including nothing or a log cut short; the e2e
step's plumbing (generate, merge twice through the CLI, compare, report) runs on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run_script(env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """bench/gpu_check.sh run with ``env``."""
    script = ROOT / "bench" / "gpu_check.sh"
    return subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # hides any GPU this machine has
    done = run_script(env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device here (torch.cuda.is_available() is false); nothing checked."
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_steps_run_time_boxed_and_leave_a_few_files(tmp_path):
    # A python that says CUDA is there (and is the real one otherwise): the env step then fails
    # on the missing device and the cuda tests skip, but each step runs, shell functions too
    # (rc 127 would mean `timeout` could not find one), and the results are published.
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        '[[ "${2:-}" == *torch.cuda.is_available* ]] && exit 0\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "TMPDIR": str(tmp_path)}
    env.update(GPU_CHECK_STEPS="env cuda-core", GPU_CHECK_SECONDS="200")
    done = run_script(env, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = {line.split()[0]: line for line in (out / "summary.txt").read_text().splitlines()
             if " rc=" in line}  # fmt: skip
    assert set(steps) == {"env", "cuda-core"}
    assert "rc=127" not in steps["env"] and "rc=0" in steps["cuda-core"]
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.txt"]
    assert "GPU check:" in done.stdout  # the summary, printed last


def summary(out: Path) -> str:
    return gpu_check().summary(out)


def gpu_check():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_summary_of_an_empty_run_names_what_is_missing(tmp_path):
    text = summary(tmp_path)
    assert "vs cpp's bytes: no result" in text
    assert "end-to-end: no result" in text


def test_summary_reports_tests_benchmarks_and_e2e(tmp_path):
    (tmp_path / "steps.txt").write_text("cuda-core rc=1 seconds=100\n")
    (tmp_path / "cuda-core.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="a"><failure/></testcase></testsuite></testsuites>'
    )
    # A step cut short: no JUnit file, only its verbose log.
    (tmp_path / "cuda-cpp.log").write_text(
        "tests/ops/test_triton.py::test_a[x] PASSED    [  1%]\n"
        "tests/ops/test_triton.py::test_a[y] FAILED    [  2%]\n"
        "tests/ops/test_triton.py::test_b SKIPPED (no cpp)    [  3%]\n"
    )
    bench = {"name": "test_triton[ties]", "stats": {"mean": 0.001}}
    bench["extra_info"] = {"gbps": 1000.0, "fraction_of_peak": 0.25}
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": [bench]}))
    row = dict(identical=False, differing_shards=["a.safetensors"], cuda_merge_seconds=2.0)
    row.update(vs_read=2.0, cuda_seconds=9.0, cpp_seconds=20.0)
    result = {"read_seconds": 1.0, "oracle": "--device cpu --backend cpp", "della": row}
    (tmp_path / "e2e.json").write_text(json.dumps(result))
    text = summary(tmp_path)
    assert "3 passed, 1 failed, 1 skipped" in text and "FAILED t::a" in text
    assert "1 passed, 1 failed, 1 skipped before it was cut short" in text
    assert "FAILED tests/ops/test_triton.py::test_a[y]" in text
    assert "25.0 % of HBM peak  < 50 %" in text
    assert "compared with --device cpu --backend cpp" in text
    assert "della: DIFFERS in ['a.safetensors']" in text and "over 1.3x" in text


def test_e2e_compares_the_merges_shards_and_reports_each_method(tmp_path):
    from fusion_kernels.demo import PairSpec

    spec = PairSpec(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=256)
    check = gpu_check()
    result = check.e2e(tmp_path / "work", tmp_path / "data", ["ties"], spec, device="cpu")
    assert result["ties"]["identical"] and result["ties"]["differing_shards"] == []
    assert json.loads((tmp_path / "work" / "e2e.json").read_text()) == result
    assert "ties: byte-identical" in check.summary(tmp_path / "work")
