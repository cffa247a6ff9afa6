"""Faults, bad checkpoints and interrupted merges: nothing lost, nothing half-written, and a clear
word on what went wrong."""

import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
from checkpoints import tiny_pair, tree_digest, write_single
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fusion_kernels import available_backends, merge_checkpoints, params_for
from fusion_kernels.errors import CheckpointError
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.merge import main

METHODS = ["task_arithmetic", "ties", "breadcrumbs", "dare", "della", "neu-p-ties", "neu-s-bread"]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "fusion_kernels.merge", *map(str, args), "--quiet"]


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# --- corrupt inputs -------------------------------------------------------------------------


def rewrite_header(path, edit):
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + length :])


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda h: h["b"].update(data_offsets=[60, 68]),
            "overlaps",
        ),
        (
            lambda h: h["b"].update(
                data_offsets=[h["b"]["data_offsets"][0] + 8, h["b"]["data_offsets"][1] + 8]
            ),
            "leaves a gap",
        ),
        (lambda h: h["a"].update(shape=[3, 3]), "needs 36 bytes"),
        (lambda h: h["a"].update(dtype="Q7"), "unknown dtype"),
        (lambda h: h["a"].update(shape=[True, 4]), "malformed shape"),
        (lambda h: h.update(c=[1, 2]), "malformed header entry"),
    ],
    ids=["overlap", "gap", "shape-vs-bytes", "dtype", "bool-shape", "entry"],
)
def test_corrupt_headers_name_the_file_and_the_problem(tmp_path, edit, message):
    path = (
        write_single(tmp_path / "c", {"a": torch.zeros(4, 4), "b": torch.ones(2)})
        / "model.safetensors"
    )
    rewrite_header(path, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        Checkpoint(path)
    assert str(path) in str(info.value)


def test_duplicate_names_across_shards_and_bad_index_entries(tmp_path):
    root = tmp_path / "dup"
    root.mkdir()
    save_file({"w": torch.zeros(2)}, str(root / "a.safetensors"))
    save_file({"w": torch.ones(2)}, str(root / "b.safetensors"))
    index = {"weight_map": {"w": "a.safetensors", "v": "b.safetensors"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="also appears in"):
        Checkpoint(root)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../a.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="not a file name"):
        Checkpoint(root)
    (root / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a valid index"):
        Checkpoint(root)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_headers_read_back_what_they_describe_or_raise_checkpoint_error(tmp_path, data):
    path = tmp_path / "model.safetensors"
    originals = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(5, dtype=torch.bfloat16),
    }
    save_file(originals, str(path))
    raw = bytearray(path.read_bytes())
    length = int.from_bytes(raw[:8], "little")
    untouched = json.loads(raw[8 : 8 + length])
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, 8 + length - 1))] = data.draw(st.integers(0, 255))
    else:
        header = json.loads(raw[8 : 8 + length])
        name = data.draw(st.sampled_from(["a", "b"]))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        value = data.draw(
            st.recursive(
                st.none() | st.booleans() | st.integers(-5, 100) | st.text(max_size=4),
                lambda inner: st.lists(inner, max_size=3),
                max_leaves=5,
            )
        )
        header[name][field] = value
        new = json.dumps(header).encode()
        raw = bytearray(len(new).to_bytes(8, "little") + new + raw[8 + length :])
    path.write_bytes(bytes(raw))
    try:
        ckpt = Checkpoint(path)
        read = {name: ckpt.read(name).clone() for name in ckpt.names()}
        ckpt.close()
    except CheckpointError:
        return
    # Opened: the header is JSON that lists exactly the tensors read, each of the shape it
    # says, and a tensor whose entry the fuzzing left alone reads back bit for bit (the data
    # bytes are never changed).
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    assert set(read) == set(header) - {"__metadata__"}
    for name, tensor in read.items():
        assert list(tensor.shape) == header[name]["shape"], name
        if header[name] == untouched.get(name) and size == length:
            assert torch.equal(tensor, originals[name]), name


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    index=st.recursive(
        st.none() | st.integers() | st.text(max_size=12),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
        ),
        max_leaves=8,
    )
)
def test_fuzzed_index_files_never_crash_the_reader(tmp_path, index):
    # Any index: either a CheckpointError (a clear message) or a checkpoint of the one tensor
    # the shard holds; never another exception.
    root = tmp_path / "idx"
    root.mkdir(exist_ok=True)
    save_file({"w": torch.zeros(2)}, str(root / "model-1.safetensors"))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    with contextlib.suppress(CheckpointError):
        assert set(Checkpoint(root).names()) <= {"w"}


# --- what gets copied ----------------------------------------------------------------------


def test_non_float_tensors_are_copied_unchanged_and_reported(tmp_path):
    extras = {
        "ids": torch.arange(6, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "scale_fp8": torch.linspace(-1, 1, 8).to(torch.float8_e4m3fn),
    }
    base = {"w": torch.randn(4, 4), **extras}
    tuned = {
        "w": base["w"] + 1,
        "ids": extras["ids"] * 3,
        "mask": ~extras["mask"],
        "scale_fp8": (torch.linspace(-1, 1, 8) * 0.5).to(torch.float8_e4m3fn),
    }
    write_single(tmp_path / "b", base)
    write_single(tmp_path / "t", tuned)
    report = merge_checkpoints(
        tmp_path / "b", tmp_path / "t", tmp_path / "o", params_for("ties"), progress=False
    )
    out = load_file(tmp_path / "o" / "model.safetensors")
    for name in extras:
        assert torch.equal(out[name].view(torch.uint8), tuned[name].view(torch.uint8)), name
    reasons = {t["name"]: t.get("reason") for t in report["tensors"]}
    assert (
        reasons["scale_fp8"] == "F8_E4M3 is not a merge dtype (F32, F16, BF16)"
        and reasons["mask"] == "BOOL is not a float dtype"
    )


# --- interrupted and failing runs ---------------------------------------------------------------


@pytest.mark.slow
def test_killed_merges_leave_no_output_and_inputs_untouched(tmp_path):
    base, tuned = tiny_pair(tmp_path / "in", hidden=256, intermediate=768, layers=8, vocab=2048)
    before = tree_digest(tmp_path / "in")
    out = tmp_path / "out"
    rng = random.Random(0)
    interrupted = 0
    for attempt in range(6):
        proc = subprocess.Popen(
            cli(
                "--base", base, "--tuned", tuned, "--out", out, "--backend", "torch", "--overwrite"
            ),
            stderr=subprocess.PIPE,
        )
        # Kill shortly after the merge starts writing (its temporary directory appears), so the
        # signal lands mid-merge however fast the machine is.
        deadline = time.monotonic() + 60
        while not (tmp_path / f".out.partial-{proc.pid}").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the merge never started writing"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        sig = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL][attempt % 3]
        proc.send_signal(sig)
        proc.wait(timeout=60)
        if proc.returncode != 0:
            interrupted += 1
            if sig != signal.SIGKILL:
                assert proc.returncode == 130 and not leftovers(tmp_path), proc.stderr.read()
        if out.exists():
            assert Checkpoint(out).names(), "an output directory is always a complete merge"
    assert interrupted >= 3, "the kills should land mid-merge"
    done = subprocess.run(
        cli("--base", base, "--tuned", tuned, "--out", out, "--overwrite"), check=False
    )
    assert done.returncode == 0
    assert leftovers(tmp_path) == [], "the next run removes what killed runs left"
    assert tree_digest(tmp_path / "in") == before


def test_file_size_limit_is_a_clear_error_with_nothing_left(tmp_path):
    base, tuned = tiny_pair(tmp_path / "in")
    before = tree_digest(tmp_path / "in")
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    done = subprocess.run(
        cli("--base", base, "--tuned", tuned, "--out", out),
        preexec_fn=limit,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "cannot write (File too large)" in done.stderr.strip().splitlines()[-1]
    assert not out.exists() and leftovers(tmp_path) == []
    assert tree_digest(tmp_path / "in") == before


def test_output_under_a_file_is_a_clear_error(tmp_path, capsys):
    base, tuned = tiny_pair(tmp_path / "in")
    (tmp_path / "afile").write_text("x")
    assert (
        main(
            [
                "--base",
                str(base),
                "--tuned",
                str(tuned),
                "--out",
                str(tmp_path / "afile" / "out"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "cannot write" in capsys.readouterr().err


# --- determinism and verification -----------------------------------------------------------------


# The interpreter is slow, so triton runs the random methods (where determinism is at stake).
DETERMINISM_CASES = [
    (method, backend)
    for backend in available_backends()
    for method in (METHODS if backend != "triton" else ["dare", "della", "neu-p-ties"])
]


@pytest.mark.parametrize("method,backend", DETERMINISM_CASES)
def test_same_merge_twice_gives_byte_identical_files(tmp_path, method, backend):
    small = dict(hidden=16, intermediate=24, layers=1, vocab=32) if backend == "triton" else {}
    base, tuned = tiny_pair(tmp_path / "in", **small)
    params = params_for(method, seed=1234)
    outputs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        merge_checkpoints(base, tuned, out, params, backend=backend, progress=False)
        outputs.append({p.name: p.read_bytes() for p in out.glob("*.safetensors")})
    assert outputs[0] == outputs[1]


def test_verify_passes_and_catches_a_bad_write(tmp_path, monkeypatch, capsys):
    base, tuned = tiny_pair(tmp_path / "in")
    assert (
        main(
            [
                "--base",
                str(base),
                "--tuned",
                str(tuned),
                "--out",
                str(tmp_path / "ok"),
                "--verify",
                "--quiet",
            ]
        )
        == 0
    )
    assert "verified" in capsys.readouterr().out
    import fusion_kernels.streaming.host as host

    monkeypatch.setattr(host, "checksum", lambda tensor: 12345)
    with pytest.raises(CheckpointError, match="reads back with other bytes"):
        merge_checkpoints(
            base, tuned, tmp_path / "bad", params_for("ties"), progress=False, verify=True
        )
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []


#: Whom the unwritable-directory test runs as when the suite runs as root (root writes anywhere).
NOBODY = 65534


def _merge_in_child(argv: list[str], uid: int | None) -> tuple[int, str]:
    """Run the merge command in a forked child, as ``uid`` when given; its status and stderr.
    Forked, not executed: the interpreter and every module are already loaded, so the child
    needs no access to where Python lives, only to the checkpoints."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status, err = 1, io.StringIO()
        try:
            os.close(read_end)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            with contextlib.redirect_stderr(err):
                status = main(argv)
        except BaseException:
            err.write(traceback.format_exc())
        finally:
            os.write(write_end, err.getvalue().encode())
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, wait = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait), text


def test_unwritable_output_parent_is_a_clear_error():
    # Outside pytest's directories (only their owner may enter them), so that nobody can read
    # the inputs when the suite runs as root.
    work = Path(tempfile.mkdtemp(prefix="fusion-unwritable-"))
    try:
        work.chmod(0o755)
        base, tuned = tiny_pair(work / "in")
        args = ["--base", str(base), "--tuned", str(tuned), "--quiet", "--out"]
        assert main([*args, str(work / "warm-up")]) == 0  # loads what the command imports
        locked = work / "locked"
        locked.mkdir(mode=0o555)
        uid = NOBODY if os.geteuid() == 0 else None
        status, err = _merge_in_child([*args, str(locked / "o")], uid)
        assert status == 2, err
        assert err.splitlines() == [f"error: --out {locked / 'o'}: {locked} is not writable"]
        assert not (locked / "o").exists()
    finally:
        shutil.rmtree(work)
