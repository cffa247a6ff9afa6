"""The README's guarantees for every kind of input and output the merge takes: Hub ids (a cache of
``snapshots/REV/*`` links into ``blobs/``), ``MODEL+ADAPTER`` (a LoRA adapter directory), ``.bin``
shards and their index, the tuned model card, ``--text-model-out``, and a shard truncated while it
is read. Each input is kept out of reach of every output and only read; each bad one is exit 2
with one line and nothing written."""

import json
import os
import sys
import textwrap

import pytest
import torch
from checkpoints import cache_repo, tiny_pair, tree_digest
from commands import merge, partials, refused, run
from safetensors.torch import save_file

from fusion_kernels.io.outputs import MARKER_NAME
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint


@pytest.fixture
def pair(tmp_path):
    base, tuned = tiny_pair(tmp_path / "in")
    return base, tuned


# --- Hub ids ----------------------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, pair):
    pytest.importorskip("huggingface_hub")
    base, tuned = pair
    cache = tmp_path / "hf"
    cache_repo(cache, "org/tuned", tuned)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return base, cache, env


@pytest.mark.parametrize(
    "target",
    ["blobs", "blobs/BLOB", "snapshots", "snapshots/REV", "snapshots/REV/x", "refs", "."],
)
def test_no_file_of_a_hub_id_is_in_reach_of_out(hub, target):
    base, cache, env = hub
    folder = cache / "models--org--tuned"
    blob = next((folder / "blobs").iterdir()).name
    revision = next((folder / "snapshots").iterdir()).name
    out = folder / target.replace("BLOB", blob).replace("REV", revision)
    before = tree_digest(cache)
    done = run(merge("--base", base, "--tuned", "org/tuned", "--out", out, "--overwrite"), env=env)
    refused(done, "overlaps the input")
    assert tree_digest(cache) == before
    assert all(link.resolve().is_file() for link in (folder / "snapshots").rglob("*.json"))


def test_a_hub_id_as_text_model_out_source_stays_out_of_reach(hub, tmp_path):
    base, cache, env = hub
    before = tree_digest(cache)
    text = cache / "models--org--tuned" / "blobs" / "text"
    args = ["--base", base, "--tuned", "org/tuned", "--out", tmp_path / "o"]
    done = run(merge(*args, "--text-model-out", text), env=env)
    refused(done, "--text-model-out")
    assert tree_digest(cache) == before and not (tmp_path / "o").exists()


# --- MODEL+ADAPTER ----------------------------------------------------------------------------


def adapter_for(model, directory, **config):
    """A PEFT-layout LoRA adapter (rank 2) on model's q_proj of layer 0."""
    info = Checkpoint(model).info("model.layers.0.self_attn.q_proj.weight")
    rows, cols = info.shape
    directory.mkdir(parents=True)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.full((2, cols), 0.01),
            f"{prefix}.lora_B.weight": torch.full((rows, 2), 0.01),
        },
        str(directory / "adapter_model.safetensors"),
    )
    settings = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}
    (directory / "adapter_config.json").write_text(json.dumps(settings))
    return directory


@pytest.mark.parametrize("target", ["adapter", "adapter/merged", "."])
def test_the_adapter_of_model_plus_adapter_is_out_of_reach(pair, tmp_path, target):
    base, tuned = pair
    adapter = adapter_for(tuned, tmp_path / "in" / "adapter")
    before = tree_digest(tmp_path / "in")
    out = tmp_path / "in" / target
    done = run(merge("--base", base, "--tuned", f"{tuned}+{adapter}", "--out", out, "--overwrite"))
    refused(done, "overlaps the input")
    assert tree_digest(tmp_path / "in") == before


@pytest.mark.parametrize(
    "config,fragment",
    [
        ({"lora_alpha": "four"}, "lora_alpha must be a finite number"),
        ({"lora_alpha": 1e300}, "lora_alpha must be a finite number"),
        ({"lora_alpha": 10**400}, "lora_alpha must be a finite number"),
        ({"alpha_pattern": {"(": 3}}, "bad regular expression"),
        ({"alpha_pattern": ["q_proj"]}, "alpha_pattern must map"),
    ],
)
def test_bad_adapter_configs_are_one_line(pair, tmp_path, config, fragment):
    base, tuned = pair
    adapter = adapter_for(tuned, tmp_path / "adapter", **config)
    if config.get("lora_alpha") == 10**400:  # JSON has no limit on integers; json.dumps agrees
        assert "0" * 400 in (adapter / "adapter_config.json").read_text()
    done = run(merge("--base", base, "--tuned", f"{tuned}+{adapter}", "--out", tmp_path / "o"))
    refused(done, fragment)
    assert not (tmp_path / "o").exists() and partials(tmp_path) == []


def test_a_rank_zero_adapter_is_one_line(pair, tmp_path):
    base, tuned = pair
    adapter = adapter_for(tuned, tmp_path / "adapter")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    empty = {f"{prefix}.lora_A.weight": torch.zeros(0, 32), f"{prefix}.lora_B.weight": None}
    empty[f"{prefix}.lora_B.weight"] = torch.zeros(32, 0)
    save_file(empty, str(adapter / "adapter_model.safetensors"))
    done = run(merge("--base", base, "--tuned", f"{tuned}+{adapter}", "--out", tmp_path / "o"))
    refused(done, "rank 0")


# --- .bin checkpoints -------------------------------------------------------------------------


def bin_copy(source, target, shard_names=None):
    """``source`` saved as .bin shards (named ``shard_names``) with a bin index."""
    ckpt = Checkpoint(source)
    target.mkdir(parents=True)
    weight_map = {}
    names = shard_names or [f"pytorch_model-{i}.bin" for i in range(len(ckpt.files))]
    for file, name in zip(ckpt.files, names, strict=True):
        state = {n: ckpt.read(n) for n in ckpt.names() if ckpt.info(n).file == file}
        torch.save(state, target / name)
        weight_map.update(dict.fromkeys(state, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (target / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (target / "config.json").write_text((source / "config.json").read_text())
    return target


def test_bin_shards_and_their_index_are_out_of_reach(pair, tmp_path):
    base, tuned = pair
    tuned_bin = bin_copy(tuned, tmp_path / "bin")
    before = tree_digest(tuned_bin)
    for out in (tuned_bin, tuned_bin / "pytorch_model-0.bin", tuned_bin / "merged"):
        done = run(merge("--base", base, "--tuned", tuned_bin, "--out", out, "--overwrite"))
        refused(done, "overlaps the input")
    assert tree_digest(tuned_bin) == before
    assert run(merge("--base", base, "--tuned", tuned_bin, "--out", tmp_path / "o")).returncode == 0


def test_a_bin_index_naming_a_file_the_writer_creates_is_refused(pair, tmp_path):
    base, tuned = pair
    tuned_bin = bin_copy(tuned, tmp_path / "bin", ["config.json", "pytorch_model-1.bin"])
    done = run(merge("--base", base, "--tuned", tuned_bin, "--out", tmp_path / "o"))
    refused(done, "is not a .bin file name")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("which", ["pytorch_model-1.bin", "pytorch_model.bin.index.json"])
def test_a_fifo_in_a_bin_checkpoint_is_refused_not_waited_on(pair, tmp_path, which):
    base, tuned = pair
    tuned_bin = bin_copy(tuned, tmp_path / "bin")
    (tuned_bin / which).unlink()
    os.mkfifo(tuned_bin / which)
    done = run(merge("--base", base, "--tuned", tuned_bin, "--out", tmp_path / "o"))
    refused(done, "not a regular file (a named pipe)")


def test_a_fifo_as_adapter_weights_or_tuned_card_is_not_waited_on(pair, tmp_path):
    base, tuned = pair
    adapter = adapter_for(tuned, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    os.mkfifo(adapter / "adapter_model.safetensors")
    done = run(merge("--base", base, "--tuned", f"{tuned}+{adapter}", "--out", tmp_path / "o"))
    refused(done, "not a regular file (a named pipe)")
    os.mkfifo(tuned / "README.md")
    done = run(merge("--base", base, "--tuned", tuned, "--out", tmp_path / "o2"))
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "o2" / "README.md").is_fifo()


@pytest.mark.parametrize("kind", ["fifo", "broken link"])
def test_a_tuned_side_file_that_is_not_a_file_is_refused_before_writing(pair, tmp_path, kind):
    # Copying would skip it, and an output without config.json does not load.
    base, tuned = pair
    (tuned / "config.json").unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(tuned / "config.json")
    else:
        (tuned / "config.json").symlink_to(tmp_path / "gone.json")
    done = run(merge("--base", base, "--tuned", tuned, "--out", tmp_path / "o"))
    line = refused(done, f"{tuned / 'config.json'}:")
    assert ("named pipe" if kind == "fifo" else "cannot be read") in line
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


# --- the tuned model card ---------------------------------------------------------------------


def test_an_alias_bomb_in_the_tuned_card_is_not_expanded(pair, tmp_path):
    base, tuned = pair
    # 9^10 entries once expanded: the card's license, written out as text, would be gigabytes.
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    card = "---\n" + "\n".join(levels) + "\nlicense: *a9\n---\nA card.\n"
    (tuned / "README.md").write_text(card)
    done = run(merge("--base", base, "--tuned", tuned, "--out", tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    written = (tmp_path / "o" / "README.md").read_text()
    assert "A card." in written and len(written) < 100_000


# --- --text-model-out -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["base", "tuned/text", "out", "out/text", "in"])
def test_text_model_out_is_clear_of_inputs_and_out(pair, tmp_path, where):
    base, tuned = pair
    out = tmp_path / "out"
    text = {"base": base, "tuned/text": tuned / "text", "out": out, "out/text": out / "text"}
    text["in"] = tmp_path / "in"
    before = tree_digest(tmp_path / "in")
    args = ["--base", base, "--tuned", tuned, "--out", out, "--overwrite"]
    done = run(merge(*args, "--text-model-out", text[where]))
    refused(done, "--text-model-out")
    assert tree_digest(tmp_path / "in") == before and not out.exists()


def test_text_model_out_replaces_only_an_earlier_export(pair, tmp_path):
    base, tuned = pair
    foreign = tmp_path / "text"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    args = merge("--base", base, "--tuned", tuned, "--out", tmp_path / "o", "--overwrite")
    done = run([*args, "--text-model-out", str(foreign)])
    refused(done, "not an earlier merge output")
    assert (foreign / "notes.txt").read_text() == "mine" and not (tmp_path / "o").exists()
    text = tmp_path / "text2"
    for _ in range(2):  # the second run replaces the first export: it is one of ours
        assert run([*args, "--text-model-out", str(text)]).returncode == 0
    assert (text / "fusion_report.json").is_file() and not (text / MARKER_NAME).exists()
    assert partials(tmp_path) == []


def test_text_model_out_stale_workspaces_are_cleaned_by_marker_only(pair, tmp_path):
    base, tuned = pair
    text = tmp_path / "text"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    ours = tmp_path / f".text.partial-{dead}"
    ours.mkdir()
    (ours / MARKER_NAME).write_text(json.dumps({"output": "text", "pid": dead}))
    lookalike = tmp_path / f".text.partial-{dead + 1}"
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("not ours")
    args = merge("--base", base, "--tuned", tuned, "--out", tmp_path / "o")
    assert run([*args, "--text-model-out", str(text)]).returncode == 0
    assert not ours.exists() and (lookalike / "keep.txt").read_text() == "not ours"


# --- a shard truncated while the merge reads it -------------------------------------------------

TRUNCATE_DURING_MERGE = textwrap.dedent(
    """
    import sys
    from fusion_kernels.io import reader

    view, seen = reader.SafetensorsCheckpoint.view, []

    def truncating_view(self, name, *args, **kwargs):
        tensor = view(self, name, *args, **kwargs)
        seen.append(name)
        if len(seen) == 4:  # another program truncates the shard while it is in use
            with open(self.tensors[name].file, "r+b") as fh:
                fh.truncate(64)
        return tensor

    reader.SafetensorsCheckpoint.view = truncating_view
    from fusion_kernels.merge import cli

    sys.argv = ["merge", *sys.argv[1:]]
    cli()
    """
)


def test_a_shard_truncated_during_the_merge_is_one_line_not_sigbus(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "out"
    args = ["--base", base, "--tuned", tuned, "--out", out, "--backend", "torch", "--quiet"]
    done = run([sys.executable, "-c", TRUNCATE_DURING_MERGE, *map(str, args)])
    assert done.returncode == 2, (done.returncode, done.stderr)
    refused(done, "shrank while being read")
    assert not out.exists() and partials(tmp_path) == []
