"""Every multimodal family merges each language tensor with its own base tensor, or refuses.

Each family (see ``families.py``) is saved by transformers in both layouts; tuned's language
weights are base's plus small changes (and a few large ones), its other tensors its own. The
merge must pair each tensor with the base tensor the test says it came from, copy everything else
byte for byte, and give a checkpoint the family's class loads and generates from an image with.
Pairings the tool cannot be sure of (a base of another depth or family, Mllama without the config
that says which layers are new) exit 2 with one line and write nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_tensors_equal
from safetensors.torch import load_file, save_file

from fusion_kernels import merge_tensor, params_for
from fusion_kernels.errors import PlanError
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.locate import locate_checkpoints
from fusion_kernels.merge import main

# save_original_format, get_image_features and the newer families (Gemma3, Mistral3, InternVL).
transformers = pytest.importorskip("transformers", minversion="5.0", reason="needs transformers 5")

from families import FAMILIES, TEXT, VOCAB  # noqa: E402 (needs transformers)

LAYOUTS = ("original", "newer")
METHOD = "neu-p-ties"


def _perturb(family, layout: str, tuned_dir, base_weights: dict) -> None:
    """Rewrite tuned's language tensors as base's plus changes; the rest stays as saved."""
    path = tuned_dir / "model.safetensors"
    weights = load_file(path)
    gen = torch.Generator().manual_seed(1)
    used = set()
    for name, value in weights.items():
        base_name = family.base_name(layout, name)
        if base_name is None:
            continue
        used.add(base_name)
        base = base_weights[base_name]
        new = base.float() + 0.002 * torch.randn(base.shape, generator=gen)
        if name.endswith("mlp.up_proj.weight"):
            new[:3] += 0.3 * torch.randn(new[:3].shape, generator=gen)
        weights[name] = torch.cat([new.to(value.dtype), value[base.shape[0] :]])
    assert used == base_weights.keys(), f"{family.name}: the test pairs every base tensor"
    save_file(weights, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(name)``: the family's base and tuned directories (one per layout), made once."""
    cache = {}

    def build(name: str):
        if name not in cache:
            family = FAMILIES[name]
            root = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            family.base().to(torch.bfloat16).save_pretrained(root / "base")
            base_weights = load_file(root / "base" / "model.safetensors")
            tuned = family.tuned().to(torch.bfloat16)
            for layout in LAYOUTS:
                tuned.save_pretrained(root / layout, save_original_format=layout == "original")
                _perturb(family, layout, root / layout, base_weights)
            cache[name] = root
        return cache[name]

    return build


def _run(*args) -> int:
    return main([*map(str, args), "--quiet"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_merges_each_language_tensor_with_its_own_base_tensor(
    built, tmp_path, name, layout, capsys
):
    family, root = FAMILIES[name], built(name)
    base_dir, tuned_dir, out = root / "base", root / layout, tmp_path / "merged"
    assert _run("--base", base_dir, "--tuned", tuned_dir, "--dry-run") == 0
    layer_line = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("layer map")
    )
    assert ("0,new,1,new,2" if family.layers else "identity") in layer_line
    assert _run("--base", base_dir, "--tuned", tuned_dir, "--out", out, "--method", METHOD) == 0

    base, tuned, merged = Checkpoint(base_dir), Checkpoint(tuned_dir), Checkpoint(out)
    assert merged.names() == tuned.names()
    report = json.loads((out / "fusion_report.json").read_text())
    entries = {t["name"]: t for t in report["tensors"]}
    assert report["pairing"]["strict"] is True
    assert report["layer_map"]["layers"] == (list(family.layers) if family.layers else None)
    params, grown = params_for(METHOD), 0
    for tensor in tuned.names():
        got, want = merged.read(tensor), tuned.read(tensor)
        base_name = family.base_name(layout, tensor)
        if base_name is None:
            assert_tensors_equal(got, want, f"{tensor} (not language: tuned's bytes)")
            assert entries[tensor]["action"] == "copy"
            continue
        assert entries[tensor].get("base_name", tensor) == base_name
        b = base.read(base_name)
        rows = b.shape[0]
        expected, _ = merge_tensor(b, want[:rows], tensor, params=params, backend="torch")
        assert_tensors_equal(got[:rows], expected, f"{tensor} merged with base {base_name}")
        assert_tensors_equal(got[rows:], want[rows:], f"{tensor} added rows")
        grown += rows < want.shape[0]
    assert grown >= 1, "every family here grows its embedding"
    stored_heads = [n for n in (*base.names(), *tuned.names()) if n.endswith("lm_head.weight")]
    assert not stored_heads if family.tied else len(stored_heads) == 2

    model_cls = getattr(
        transformers, json.loads((out / "config.json").read_text())["architectures"][0]
    )
    model = model_cls.from_pretrained(out, dtype=torch.float32).eval()
    inputs = family.image(model)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)


def _base_variant(root, name: str, model):
    """Another base beside a family's: saved once under ``root/name``."""
    if not (root / name).exists():
        torch.manual_seed(0)
        model.to(torch.bfloat16).save_pretrained(root / name)
    return root / name


def _text_config(config_cls, layers: int):
    return config_cls(
        **{**TEXT, "vocab_size": VOCAB, "tie_word_embeddings": False, "num_hidden_layers": layers}
    )


def _refused(capsys, out, *args) -> str:
    """Run a merge that must refuse: exit 2, one line, nothing written; returns the line."""
    capsys.readouterr()  # drop what building the fixtures printed
    assert _run(*args, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return err


def test_mllama_without_its_config_refuses(built, tmp_path, capsys):
    root = built("mllama")
    bare = root / "original" / "model.safetensors"  # a bare file: no config says what is new
    err = _refused(capsys, tmp_path / "o", "--base", root / "base", "--tuned", bare)
    assert "language_model.model.layers.1.cross_attn" in err
    assert "different depth (base has 3 layers, tuned's language model 5" in err
    err = _refused(
        capsys, tmp_path / "o", "--base", root / "base", "--tuned", root / "newer", "--layer-map",
        "identity",
    )  # fmt: skip
    assert "model.language_model.layers.1.cross_attn" in err


def test_mllama_layer_map_by_hand_pairs_a_bare_file(built, tmp_path):
    root = built("mllama")
    bare, out = root / "original" / "model.safetensors", tmp_path / "o"
    assert (
        _run("--base", root / "base", "--tuned", bare, "--out", out, "--layer-map", "0,new,1,new,2")
        == 0
    )
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["layer_map"] == {
        "source": "--layer-map",
        "spec": "0,new,1,new,2",
        "layers": [0, None, 1, None, 2],
    }
    entries = {t["name"]: t for t in report["tensors"]}
    assert entries["language_model.model.layers.2.mlp.up_proj.weight"]["base_name"] == (
        "model.layers.1.mlp.up_proj.weight"
    )
    gate = entries["language_model.model.layers.3.cross_attn_attn_gate"]
    assert gate["action"] == "copy" and gate["reason"].startswith("new layer")


def test_mllama_with_a_base_of_its_own_depth_refuses(built, tmp_path, capsys):
    root = built("mllama")
    deep = _base_variant(
        root, "base5", transformers.LlamaForCausalLM(_text_config(transformers.LlamaConfig, 5))
    )
    err = _refused(capsys, tmp_path / "o", "--base", deep, "--tuned", root / "original")
    assert "'model.layers.3." in err and "besides 2 new ones" in err


def test_base_with_fewer_layers_refuses_or_merges_when_allowed(built, tmp_path, capsys):
    root = built("llava")
    shallow = _base_variant(
        root, "base1", transformers.LlamaForCausalLM(_text_config(transformers.LlamaConfig, 1))
    )
    err = _refused(capsys, tmp_path / "o", "--base", shallow, "--tuned", root / "original")
    assert "'language_model.model.layers.1." in err
    assert "different depth (base has 1 layer, tuned's language model 2" in err
    out = tmp_path / "lenient"
    assert (
        _run("--base", shallow, "--tuned", root / "original", "--out", out, "--allow-unpaired") == 0
    )
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["pairing"]["strict"] is False
    assert "language_model.model.layers.1.mlp.up_proj.weight" in report["pairing"]["unpaired_tuned"]
    tuned, merged = Checkpoint(root / "original"), Checkpoint(out)
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    assert_tensors_equal(merged.read(name), tuned.read(name), "unpaired: copied")


def test_base_of_another_family_refuses(built, tmp_path, capsys):
    root = built("llava")
    qwen = _base_variant(
        root, "qwen2", transformers.Qwen2ForCausalLM(_text_config(transformers.Qwen2Config, 2))
    )
    err = _refused(capsys, tmp_path / "o", "--base", qwen, "--tuned", root / "newer")
    assert "base tensors without a tuned counterpart: 'model.layers.0.self_attn.k_proj.bias'" in err
    assert "another family" in err and "--allow-unpaired" in err


def test_locate_pairs_layers_like_the_merge(built):
    root = built("mllama")
    bare = root / "original" / "model.safetensors"
    with pytest.raises(PlanError, match="do not pair one to one"):
        locate_checkpoints(root / "base", bare, progress=False)
    result = locate_checkpoints(root / "base", bare, layer_map="0,new,1,new,2", progress=False)
    entries = {e["name"]: e for e in result["tensors"]}
    assert entries["language_model.model.layers.4.mlp.up_proj.weight"]["base_name"] == (
        "model.layers.2.mlp.up_proj.weight"
    )
    assert not any(".layers.3." in name for name in entries)
