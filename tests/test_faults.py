"""The SIGBUS handler: a watched shard that shrinks while mapped ends the process with one line and
status 2, removing this process's temporary outputs; a fault on anything else is left alone."""

import signal
import subprocess
import sys
import textwrap

import pytest

from fusion_kernels.io import faults

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGBUS on Linux")

MAPPED_THEN_TRUNCATED = """
import mmap, os, sys
from pathlib import Path
from fusion_kernels.io import faults, outputs

path = Path(sys.argv[1])
path.write_bytes(b"x" * (1 << 16))
fd = os.open(path, os.O_RDONLY)
mapped = mmap.mmap(fd, 1 << 16, prot=mmap.PROT_READ)
if sys.argv[2] == "watched":
    faults.watch(fd, path, fd, 1 << 16)
else:
    faults.watch(-1, path, os.open(path, os.O_RDONLY), 0)  # installs the handler, never shrinks
workspace = outputs.create_workspace(path.parent / "out")
os.truncate(path, 0)
mapped[1 << 15]  # past the new end: SIGBUS
print("read past the end")
"""


def run(tmp_path, mode: str) -> subprocess.CompletedProcess:
    shard = tmp_path / "shard.safetensors"
    code = textwrap.dedent(MAPPED_THEN_TRUNCATED)
    return subprocess.run(
        [sys.executable, "-c", code, str(shard), mode], capture_output=True, text=True, timeout=60
    )


def test_a_watched_shard_that_shrinks_is_one_line_and_status_2(tmp_path):
    done = run(tmp_path, "watched")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"error: {tmp_path / 'shard.safetensors'}: shrank while being read (from 65536 bytes; "
        "another program truncated or rewrote it); nothing was written: let that program "
        "finish, then run again"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["shard.safetensors"]  # workspace removed


def test_a_fault_on_a_file_not_watched_gets_the_default_action(tmp_path):
    done = run(tmp_path, "other")
    assert done.returncode == -signal.SIGBUS, done.stderr
    assert "shrank" not in done.stderr


def test_shrank_compares_the_size_now_with_the_size_read(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8)
    with open(path, "rb") as handle:
        fd = handle.fileno()
        assert not faults._shrank((path, fd, 8))
        assert faults._shrank((path, fd, 9))
    assert not faults._shrank((path, fd, 9))  # a closed descriptor: not ours to judge


def test_unwatch_forgets_a_shard():
    faults._SHARDS[12345] = ("p", -1, 0)
    faults.unwatch(12345)
    faults.unwatch(12345)  # twice is harmless
    assert 12345 not in faults._SHARDS
