"""PyTorch ``.bin`` checkpoints (single and sharded) merge exactly as their safetensors copy; a
pickle that is not plain tensors is refused with one line and never run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from checkpoints import tiny_pair, tree_digest

from fusion_kernels.errors import CheckpointError
from fusion_kernels.io.binreader import BinCheckpoint
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.merge import main
from fusion_kernels.plan.planner import output_shard_name


def to_bin(source, target, legacy=False):
    """The safetensors checkpoint ``source`` saved with torch.save, shard for shard."""
    ckpt = Checkpoint(source)
    target.mkdir(parents=True)
    weight_map = {}
    for file in ckpt.files:
        name = output_shard_name(file.name)  # model-0000k-of-0000n.safetensors
        bin_name = "pytorch_model" + name.removeprefix("model").removesuffix(".safetensors")
        bin_name += ".bin"
        state = {n: ckpt.read(n) for n in ckpt.names() if ckpt.info(n).file == file}
        torch.save(state, target / bin_name, _use_new_zipfile_serialization=not legacy)
        weight_map.update(dict.fromkeys(state, bin_name))
    if len(ckpt.files) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (target / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    for extra in source.iterdir():
        if extra.suffix == ".json" and "index" not in extra.name:
            (target / extra.name).write_text(extra.read_text())
    return target


@pytest.mark.parametrize("shards", [1, 2])
def test_bin_merge_equals_safetensors_merge(tmp_path, shards):
    base, tuned = tiny_pair(tmp_path / "st", shards=shards)
    base_bin, tuned_bin = (
        to_bin(base, tmp_path / "bin" / "base"),
        to_bin(tuned, tmp_path / "bin" / "tuned"),
    )
    before = tree_digest(tmp_path / "bin")
    common = ["--method", "neu-s-ties", "--quiet"]
    assert (
        main(["--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "a"), *common])
        == 0
    )
    out_b = tmp_path / "b"
    assert (
        main(["--base", str(base_bin), "--tuned", str(tuned_bin), "--out", str(out_b), *common])
        == 0
    )
    written = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert written == sorted(p.name for p in out_b.glob("*.safetensors"))
    for name in written:
        assert (tmp_path / "a" / name).read_bytes() == (out_b / name).read_bytes(), name
    assert not list(out_b.glob("*.bin"))
    assert tree_digest(tmp_path / "bin") == before


def test_mixed_formats_and_legacy_pickles_read_the_same_tensors(tmp_path):
    base, tuned = tiny_pair(tmp_path / "st", shards=1)
    legacy = BinCheckpoint(to_bin(tuned, tmp_path / "legacy", legacy=True))
    reference = Checkpoint(tuned)
    assert legacy.names() == reference.names()
    for name in reference.names():
        assert torch.equal(legacy.view(name), reference.read(name))
        assert legacy.info(name).shape == reference.info(name).shape
    out = tmp_path / "out"
    assert (
        main(
            ["--base", str(base), "--tuned", str(tmp_path / "legacy"), "--out", str(out), "--quiet"]
        )
        == 0
    )


class _Payload:
    """Pickles as a call to os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_without_running(tmp_path, capsys):
    base, _ = tiny_pair(tmp_path / "st", shards=1)
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "ran"
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(2), "x": _Payload(marker)},
        evil / "pytorch_model.bin",
    )
    status = main(["--base", str(base), "--tuned", str(evil), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "refused without running it" in err and str(evil / "pytorch_model.bin") in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_pickle_with_code_is_refused_by_the_cli_subprocess(tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "ran"
    torch.save({"w": _Payload(marker)}, evil / "pytorch_model.bin")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusion_kernels.merge",
            "--base",
            str(evil),
            "--tuned",
            str(evil),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload,needle",
    [
        ({"model": {"w": torch.zeros(2)}, "epoch": 3}, "not a plain state dict"),
        ([torch.zeros(2)], "not a plain state dict"),
    ],
)
def test_non_state_dict_pickles_are_refused(tmp_path, payload, needle):
    (tmp_path / "m").mkdir()
    torch.save(payload, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=needle):
        BinCheckpoint(tmp_path / "m")


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    _, tuned = tiny_pair(tmp_path / "st", shards=2)
    target = to_bin(tuned, tmp_path / "bin")
    next(target.glob("pytorch_model-00002*.bin")).unlink()
    with pytest.raises(CheckpointError, match="which does not exist"):
        BinCheckpoint(target)


def test_output_shard_names():
    assert output_shard_name("pytorch_model.bin") == "model.safetensors"
    assert (
        output_shard_name("pytorch_model-00001-of-00002.bin") == "model-00001-of-00002.safetensors"
    )
    assert output_shard_name("model.safetensors") == "model.safetensors"


def test_malformed_bin_index_is_an_error(tmp_path):
    _, tuned = tiny_pair(tmp_path / "st", shards=2)
    target = to_bin(tuned, tmp_path / "bin")
    (target / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(CheckpointError, match="not a valid index file"):
        BinCheckpoint(target)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_budgeted_bin_merge_streams_rows_and_matches(tmp_path, legacy):
    # Every tensor in chunks of one row: mapped rows released as they go (a legacy file is
    # read into memory, and its rows copied out instead).
    pytest.importorskip("fusion_kernels._cpp", reason="chunked merges run on the cpp backend")
    base, tuned = tiny_pair(tmp_path / "st", shards=2)
    base_bin = to_bin(base, tmp_path / "bin" / "base", legacy=legacy)
    tuned_bin = to_bin(tuned, tmp_path / "bin" / "tuned", legacy=legacy)
    common = ["--method", "neu-s-ties", "--backend", "cpp", "--verify", "--quiet"]
    args = ["--base", str(base_bin), "--tuned", str(tuned_bin), *common]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "chunked"), "--memory-budget", "1"]) == 0
    whole, chunked = (tree_digest(tmp_path / d) for d in ("whole", "chunked"))
    assert {k: v for k, v in chunked.items() if k.endswith(".safetensors")} == {
        k: v for k, v in whole.items() if k.endswith(".safetensors")
    }


def test_released_bin_pages_read_back_the_file(tmp_path):
    base, _ = tiny_pair(tmp_path / "st")
    ckpt = BinCheckpoint(to_bin(base, tmp_path / "bin"))
    name = max(ckpt.names(), key=lambda n: ckpt.info(n).nbytes)
    want = ckpt.read(name)
    assert ckpt.mappable(name)
    view = ckpt.view(name, populate=False)
    ckpt.populate(name, 0, 100)
    ckpt.release(name, 3, ckpt.info(name).nbytes - 5)
    assert torch.equal(view, want)
    ckpt.release(name)
    assert torch.equal(ckpt.view(name), want)
    # Staged reads (a GPU merge) release what they copied out, too.
    staged = np.empty(ckpt.info(name).nbytes, np.uint8)
    for offset in range(0, staged.size, 1000):
        ckpt.read_into(name, offset, staged[offset : offset + 1000])
    assert np.array_equal(staged, want.reshape(-1).view(torch.uint8).numpy())
    assert torch.equal(view, want)


@pytest.mark.parametrize(
    "odd", [lambda t: torch.empty_like(t, device="meta"), lambda t: t.to_sparse()]
)
def test_a_meta_or_sparse_tensor_is_one_line_naming_file_and_tensor(tmp_path, capsys, odd):
    base, tuned = tiny_pair(tmp_path / "st")
    tuned_bin = to_bin(tuned, tmp_path / "bin")
    file = sorted(tuned_bin.glob("*.bin"))[0]
    state = torch.load(file, weights_only=True)
    name = next(n for n, t in state.items() if t.dim() == 2)
    state[name] = odd(state[name])
    torch.save(state, file)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["--base", str(base), "--tuned", str(tuned_bin), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not out.exists()
    assert err.startswith(f"error: {file}: tensor {name!r}")
