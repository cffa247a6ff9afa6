"""bench/gpu_check.sh: without a CUDA device it says so in one line, writes nothing and exits 0;
its summary reads whatever the steps left, including nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # hides any GPU this machine has
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device here (torch.cuda.is_available() is false); nothing checked."
    ]
    assert not (tmp_path / "out").exists()


def summary(out: Path) -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check.summary(out)


def test_summary_of_an_empty_run_names_what_is_missing(tmp_path):
    text = summary(tmp_path)
    assert "cuda tests: no result" in text
    assert "end-to-end: no result" in text


def test_summary_reports_tests_benchmarks_and_e2e(tmp_path):
    (tmp_path / "steps.txt").write_text("cuda-tests rc=1 seconds=100\n")
    (tmp_path / "cuda-tests.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="a"><failure/></testcase></testsuite></testsuites>'
    )
    bench = {"name": "test_triton[ties]", "stats": {"mean": 0.001}}
    bench["extra_info"] = {"gbps": 1000.0, "fraction_of_peak": 0.25}
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": [bench]}))
    (tmp_path / "e2e").mkdir()
    row = dict(identical=False, differing_shards=["a.safetensors"], cuda_merge_seconds=2.0)
    row.update(vs_read=2.0, cuda_seconds=9.0, cpp_seconds=20.0)
    (tmp_path / "e2e" / "e2e.json").write_text(json.dumps({"read_seconds": 1.0, "della": row}))
    text = summary(tmp_path)
    assert "3 passed, 1 failed, 1 skipped" in text and "FAILED t::a" in text
    assert "25.0 % of HBM peak  < 50 %" in text
    assert "della: DIFFERS in ['a.safetensors']" in text and "over 1.3x" in text
