"""Merges under a memory budget (chunks.py): the budget rule, and whole checkpoints whose every
tensor streams in chunks (a budget below one row, uneven chunks, prime row counts) written byte
for byte as whole-tensor merges, for every method, restore and selection mode, grown
vocabularies, non-finite deltas and the CLI. The chunked kernel itself is tested in
tests/ops/test_chunked.py; LoRA and ``.bin`` inputs under a budget in test_lora.py and
test_bin.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import tiny_pair, write_single

from fusion_kernels import merge_checkpoints, params_for
from fusion_kernels.errors import NonFiniteDeltaError, ParameterError
from fusion_kernels.io.checkpoint import TensorInfo
from fusion_kernels.params import PRESETS
from fusion_kernels.plan.planner import TensorTask
from fusion_kernels.streaming.chunks import (
    BRACKET_KEY_BYTES,
    BUFFERS_IN_FLIGHT,
    MIN_CHUNK_ENTRIES,
    Budget,
)

pytest.importorskip("fusion_kernels._cpp", reason="the C++ extension is not built")

RESTORE = ("none", "replace", "rescale")


# ---- the budget rule ----


def _task(shape, action="merge") -> TensorTask:
    info = TensorInfo(
        "w", Path("x.safetensors"), "BF16", shape, 0, 2 * int(torch.Size(shape).numel())
    )
    return TensorTask("w", action, info, info if action == "merge" else None, axis="row")


def test_budget_holds_six_buffers_whole_and_chunks_the_rest():
    task = _task((100, 64))  # 12 800 bytes
    ties, della = params_for("ties"), params_for("della")
    assert Budget(BUFFERS_IN_FLIGHT * 12_800).whole(task, ties)
    assert not Budget(BUFFERS_IN_FLIGHT * 12_800 - 1).whole(task, ties)
    # della's per-entry scale (4 bytes an entry) counts too.
    assert not Budget(BUFFERS_IN_FLIGHT * 12_800).whole(task, della)
    assert Budget(BUFFERS_IN_FLIGHT * 128 * 10).chunk_rows(task, ties) == 10
    assert Budget(1).chunk_rows(task, ties) == 1, "a budget below one row still moves a row"
    # A selection's bracket keys (per cut, at most one key an entry) come out of the chunks'
    # share (rows of 2**18 entries: the floor below is one row).
    wide = _task((100, 2**18))
    row = BUFFERS_IN_FLIGHT * 2 * 2**18
    assert Budget(row * 10 + 2 * BRACKET_KEY_BYTES).chunk_rows(wide, ties, cuts=2) == 10
    keys = 8 * 100 * 64  # the narrow task has fewer entries than the cap
    assert Budget(BUFFERS_IN_FLIGHT * 128 * 10 + 2 * keys).chunk_rows(task, ties, cuts=2) >= 10
    with pytest.raises(ParameterError, match="memory-budget"):
        Budget(0)


def test_chunks_never_shrink_to_a_few_rows_when_the_keys_crowd_them_out():
    """A budget smaller than a selection's keys kept chunks of one row (a 4 MiB embedding took
    2 s instead of 5 ms): chunks hold at least MIN_CHUNK_ENTRIES as long as six fit."""
    task, ties = _task((1024, 2048)), params_for("ties")  # 4 MiB of bf16, keys 16 MiB a cut
    assert Budget(8 * 2**20).chunk_rows(task, ties, cuts=1) == MIN_CHUNK_ENTRIES // 2048
    # Six chunks of that floor do not fit 1 MiB: as many rows as do.
    assert Budget(2**20).chunk_rows(task, ties, cuts=1) == 2**20 // (BUFFERS_IN_FLIGHT * 4096)
    step, chunks, passes = Budget(8 * 2**20).chunking(task, ties)
    assert (step, chunks, passes) == (128, 8, 3)
    assert Budget(2**30).chunking(task, ties) is None


def test_the_report_and_dry_run_say_which_tensors_stream_in_chunks(tmp_path, odd_pair, capsys):
    from fusion_kernels.merge import main

    base, tuned = odd_pair
    args = ["--base", str(base), "--tuned", str(tuned), "--method", "ties", "--quiet"]
    assert main([*args, "--memory-budget", "6000", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "in chunks under --memory-budget 0.00572205MiB" in text
    report = _merge(base, tuned, tmp_path / "a", params_for("ties"), memory_budget=6_000)
    streamed = [entry for entry in report["tensors"] if "chunks" in entry]
    assert streamed and text.count(" rows, read ") == len(streamed)
    for entry in streamed:
        step, chunks, passes = entry["rows_per_chunk"], entry["chunks"], entry["passes"]
        assert passes[0] == "first" and passes[-1] == "write" and len(passes) >= 3
        assert f"  {entry['name']}: {chunks} chunk(s) of {step} rows, read 3+ times" in text
    whole = _merge(base, tuned, tmp_path / "b", params_for("ties"))
    assert not any("chunks" in entry for entry in whole["tensors"])


# ---- whole merges under a budget ----


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def _merge(base, tuned, out, params, **kwargs) -> dict:
    return merge_checkpoints(base, tuned, out, params, progress=False, overwrite=True, **kwargs)


# 1 byte: every tensor in chunks of one row (a budget smaller than one row); 6 000: uneven
# chunks of several rows; the default: every tiny tensor whole.
BUDGETS = (1, 6_000)


@pytest.fixture(scope="module")
def odd_pair(tmp_path_factory) -> tuple[Path, Path]:
    # Prime row counts: vocabulary 67, intermediate 53.
    return tiny_pair(tmp_path_factory.mktemp("odd"), vocab=67, intermediate=53)


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_a_budgeted_merge_writes_the_same_files_for_every_method(tmp_path, odd_pair, method):
    base, tuned = odd_pair
    params = params_for(method)
    want = _merge(base, tuned, tmp_path / "whole", params, backend="cpp")
    for budget in BUDGETS:
        got = _merge(
            base, tuned, tmp_path / f"b{budget}", params, backend="cpp", memory_budget=budget,
            verify=True,
        )  # fmt: skip
        assert _files(tmp_path / f"b{budget}") == _files(tmp_path / "whole"), budget
        assert [t["kept"] for t in got["tensors"]] == [t["kept"] for t in want["tensors"]]
        assert got["memory_budget"] == budget


@pytest.mark.parametrize("restore", RESTORE)
@pytest.mark.parametrize("select", ["exact", "approx"])
def test_a_budgeted_merge_writes_the_same_files_for_every_restore_mode(
    tmp_path, odd_pair, restore, select
):
    base, tuned = odd_pair
    for suppress in ("random", "della", "breadcrumbs"):
        rescale = {"breadcrumbs": None}.get(suppress, "l1")
        params = params_for(suppress=suppress, restore=restore, select=select, rescale=rescale)
        _merge(base, tuned, tmp_path / "whole", params, backend="cpp")
        _merge(base, tuned, tmp_path / "chunked", params, backend="cpp", memory_budget=1)
        assert _files(tmp_path / "chunked") == _files(tmp_path / "whole"), suppress


def test_budgeted_copies_grown_vocabulary_and_nonfinite_stream_too(tmp_path):
    gen = torch.Generator().manual_seed(3)
    base = {
        "model.embed_tokens.weight": torch.randn(41, 16, generator=gen).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(23, 16, generator=gen).bfloat16(),
    }
    tuned = {k: (v.float() + 0.01).bfloat16() for k, v in base.items()}
    tuned["model.embed_tokens.weight"] = torch.cat(
        [tuned["model.embed_tokens.weight"], torch.randn(6, 16, generator=gen).bfloat16()]
    )
    tuned["model.layers.0.mlp.up_proj.weight"][4, 2] = float("inf")
    tuned["extra.weight"] = torch.randn(19, 16, generator=gen).bfloat16()
    b = write_single(tmp_path / "base", base)
    t = write_single(tmp_path / "tuned", tuned)
    params = params_for("neu-p-ties", allow_nonfinite=True)
    want = _merge(b, t, tmp_path / "whole", params, backend="cpp")
    got = _merge(b, t, tmp_path / "chunked", params, backend="cpp", memory_budget=1, verify=True)
    assert _files(tmp_path / "chunked") == _files(tmp_path / "whole")
    assert got["totals"]["copied_nonfinite"] == want["totals"]["copied_nonfinite"] != []
    report = json.loads((tmp_path / "chunked" / "fusion_report.json").read_text())
    assert report["memory_budget"] == 1
    with pytest.raises(NonFiniteDeltaError, match=r"model\.safetensors"):
        _merge(b, t, tmp_path / "fails", params_for("ties"), backend="cpp", memory_budget=1)
    assert not (tmp_path / "fails").exists()


def test_the_torch_backend_ignores_chunking_and_matches(tmp_path, odd_pair):
    base, tuned = odd_pair
    params = params_for("neu-s-ties")
    _merge(base, tuned, tmp_path / "cpp", params, backend="cpp", memory_budget=1)
    _merge(base, tuned, tmp_path / "torch", params, backend="torch", memory_budget=1)
    assert _files(tmp_path / "torch") == _files(tmp_path / "cpp")


def test_triton_under_a_budget_stages_in_chunks_and_matches(tmp_path):
    # The triton backend merges whole tensors on its device; what crosses host memory goes
    # through staging buffers a quarter of the budget each (on CUDA by default; here, under the
    # interpreter, by asking for them). Chunked or not, the bytes are the same, and cpp's.
    pytest.importorskip("triton")
    from fusion_kernels.ops import triton as triton_backend

    if not triton_backend.interpreting() and not torch.cuda.is_available():
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    base, tuned = tiny_pair(tmp_path / "pair", layers=1, vocab=37, intermediate=40)
    device = "cuda" if torch.cuda.is_available() and not triton_backend.interpreting() else "cpu"
    params = params_for("neu-p-ties")
    _merge(base, tuned, tmp_path / "cpp", params, backend="cpp")
    _merge(base, tuned, tmp_path / "whole", params, backend="triton", device=device)
    # Staging buffers of a page: every tensor crosses them in several chunks.
    _merge(
        base, tuned, tmp_path / "staged", params, backend="triton", device=device,
        memory_budget=4 * 4096, staging_bytes=4096,
    )  # fmt: skip
    assert _files(tmp_path / "staged") == _files(tmp_path / "whole") == _files(tmp_path / "cpp")


def test_the_cli_takes_a_memory_budget(tmp_path, odd_pair):
    from fusion_kernels.merge import main

    base, tuned = odd_pair
    args = ["--base", str(base), "--tuned", str(tuned), "--method", "ties", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a"), "--memory-budget", "1KiB"]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    report = json.loads((tmp_path / "a" / "fusion_report.json").read_text())
    assert report["memory_budget"] == 1024


_HELD_AFTER_FREE = """
import ctypes, sys
from fusion_kernels.process import return_freed_memory_promptly
if sys.argv[1] == "prompt":
    return_freed_memory_promptly()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
def anon():
    line = [l for l in open("/proc/self/status") if l.startswith("RssAnon")][0]
    return int(line.split()[1]) * 1024
size = 8 * 2**20
for _ in range(2):  # glibc raises its threshold after the first such block is freed
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    before = anon()
    libc.free(block)
print(before - anon())  # bytes given back by the last free
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_return_freed_memory_promptly_gives_freed_blocks_back():
    def returned(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", _HELD_AFTER_FREE, mode], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    assert returned("prompt") >= 4 * 2**20
    assert returned("default") < 2**20  # it stays in the heap


def test_verify_reads_back_within_the_budget(tmp_path, monkeypatch):
    # --verify re-reads a 1 MiB tensor under a 192 KiB budget: a chunk (a sixth) at a time,
    # never the whole tensor, so it costs time, not memory.
    from fusion_kernels.io import writer
    from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint

    held: list[int] = []

    class Spy(Checkpoint):
        def read(self, name):
            held.append(self.info(name).nbytes)
            return super().read(name)

        def view(self, name, populate=True):
            held.append(self.info(name).nbytes)
            return super().view(name, populate)

        def read_into(self, name, offset, out):
            held.append(len(out))
            super().read_into(name, offset, out)

    monkeypatch.setattr(writer, "SafetensorsCheckpoint", Spy)
    gen = torch.Generator().manual_seed(5)
    base = {
        "model.embed_tokens.weight": torch.randn(512, 1024, generator=gen).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 32, generator=gen).bfloat16(),
    }
    tuned = {
        k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).bfloat16()
        for k, v in base.items()
    }
    b, t = write_single(tmp_path / "base", base), write_single(tmp_path / "tuned", tuned)
    budget = BUFFERS_IN_FLIGHT * 32 * 2**10
    report = _merge(
        b, t, tmp_path / "o", params_for("neu-p-ties"), backend="cpp", memory_budget=budget,
        verify=True,
    )  # fmt: skip
    assert report["verified"] and sum(held) == 512 * 1024 * 2 + 64 * 32 * 2
    assert max(held) <= budget // BUFFERS_IN_FLIGHT
