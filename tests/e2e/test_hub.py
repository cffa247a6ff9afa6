"""Hub ids (``org/name``, ``org/name@revision``) as --base/--tuned and in --config, resolved offline
from a local Hugging Face cache laid out as the real one (snapshots/REV/ of symlinks into blobs/,
refs/): same output as the local paths, the cache only read, and a clear error when an id is not
cached. Nothing here touches the network (HF_HUB_OFFLINE=1)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import COMMIT, cache_repo, tiny_pair, tree_digest
from safetensors.torch import save_file

from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.merge import main

pytest.importorskip("huggingface_hub", reason="installed with the package")

OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A cache holding org/base and org/tuned (main = COMMIT; OLD_COMMIT only by hash)."""
    base, tuned = tiny_pair(tmp_path / "src")
    (tuned / "README.md").write_text("---\nlicense: mit\n---\nA tuned model.\n")
    cache = tmp_path / "hf" / "hub"
    cache_repo(cache, "org/base", base)
    cache_repo(cache, "org/tuned", tuned)
    old_base, _ = tiny_pair(tmp_path / "old", seed=5)
    cache_repo(cache, "org/base", old_base, commit=OLD_COMMIT, ref=None)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return base, tuned, cache, old_base


def weights(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


@pytest.mark.parametrize("base_id", ["org/base", "org/base@main", f"org/base@{COMMIT}"])
def test_hub_ids_merge_like_local_paths(tmp_path, hub, base_id):
    base, tuned, cache, _ = hub
    before = tree_digest(cache)
    assert (
        main(["--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "a"), "--quiet"])
        == 0
    )
    assert (
        main(["--base", base_id, "--tuned", "org/tuned", "--out", str(tmp_path / "b"), "--quiet"])
        == 0
    )
    assert weights(tmp_path / "a") == weights(tmp_path / "b")
    report = json.loads((tmp_path / "b" / "fusion_report.json").read_text())
    assert report["base_model"] == base_id and report["tuned_model"] == "org/tuned"
    assert (tmp_path / "b" / "config.json").read_bytes() == (tuned / "config.json").read_bytes()
    assert not (tmp_path / "b" / "config.json").is_symlink()
    card = (tmp_path / "b" / "README.md").read_text()
    assert f"- {base_id}" in card and "license: mit" in card
    assert tree_digest(cache) == before
    assert all(p.is_symlink() for p in cache.rglob("snapshots/*/*"))


def test_a_revision_selects_its_snapshot(tmp_path, hub):
    _, tuned, _, old_base = hub
    out_old = tmp_path / "old_out"
    assert (
        main(
            [
                "--base",
                f"org/base@{OLD_COMMIT}",
                "--tuned",
                "org/tuned",
                "--out",
                str(out_old),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "--base",
                str(old_base),
                "--tuned",
                str(tuned),
                "--out",
                str(tmp_path / "ref"),
                "--quiet",
            ]
        )
        == 0
    )
    assert weights(out_old) == weights(tmp_path / "ref")


@pytest.mark.parametrize("reference", ["org/missing", "org/base@v9", f"org/base@{'9' * 40}"])
def test_an_id_neither_cached_nor_reachable_is_one_line(tmp_path, hub, capsys, reference):
    out = tmp_path / "out"
    assert main(["--base", reference, "--tuned", "org/tuned", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and reference in err
    assert "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    assert not out.exists()


def test_output_inside_the_cache_is_refused(hub, capsys):
    _, _, cache, _ = hub
    before = tree_digest(cache)
    out = cache / "models--org--tuned" / "merged"
    assert main(["--base", "org/base", "--tuned", "org/tuned", "--out", str(out)]) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert tree_digest(cache) == before and not out.exists()


def test_config_file_names_hub_ids(tmp_path, hub):
    base, tuned, _, _ = hub
    config = tmp_path / "ties.yml"
    config.write_text(
        "merge_method: ties\nbase_model: org/base@main\n"
        "models:\n  - model: org/tuned\n    parameters: {weight: 1.0, density: 0.3}\n"
    )
    assert main(["--config", str(config), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    args = ["--method", "ties", "--density", "0.3", "--quiet"]
    assert (
        main(["--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "a"), *args]) == 0
    )
    assert weights(tmp_path / "a") == weights(tmp_path / "b")


def test_cli_process_honours_the_environment(tmp_path, hub):
    cache = hub[2]
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "fusion_kernels.merge",
        "--base",
        "org/base",
        "--tuned",
        "org/tuned",
    ]
    done = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "merged" in done.stdout
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    done = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_model_plus_adapter_from_the_hub(tmp_path, hub):
    base, _, cache, _ = hub
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    )
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    shape = Checkpoint(base).info("model.layers.0.self_attn.q_proj.weight").shape
    gen = torch.Generator().manual_seed(3)
    lora = {
        f"{name}.lora_A.weight": torch.randn(2, shape[1], generator=gen),
        f"{name}.lora_B.weight": torch.randn(shape[0], 2, generator=gen),
    }
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    cache_repo(cache, "org/adapter", adapter)
    local = ["--base", str(base), "--tuned", f"{base}+{adapter}", "--out", str(tmp_path / "a")]
    hubbed = ["--base", "org/base", "--tuned", "org/base+org/adapter", "--out", str(tmp_path / "b")]
    assert main([*local, "--quiet"]) == 0 and main([*hubbed, "--quiet"]) == 0
    assert weights(tmp_path / "a") == weights(tmp_path / "b")
    report = json.loads((tmp_path / "b" / "fusion_report.json").read_text())
    assert report["tuned_model"] == "org/base+org/adapter"
