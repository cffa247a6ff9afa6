"""A text-only base merged into its LLaVA fine-tune: name mapping, grown vocabulary, vision tower
kept, and the output loads and generates as the same multimodal model."""

import json

import pytest
import torch
from checkpoints import TINY_TEXT, tiny_llama_config
from conftest import assert_tensors_equal
from safetensors.torch import load_file, save_file

from fusion_kernels import merge_tensor, params_for
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.merge import main

transformers = pytest.importorskip("transformers", reason="installed by the test extra")

VOCAB, ADDED = 128, 2
IMAGE_TOKEN, PATCHES = VOCAB, 4
# Classic LLaVA names (what save_pretrained writes) -> the newer transformers layout.
NEWER_LAYOUT = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]


def text_config(kind: str):
    if kind == "mistral":
        return transformers.MistralConfig(vocab_size=VOCAB, sliding_window=16, **TINY_TEXT)
    return tiny_llama_config(vocab_size=VOCAB)


def build_pair(root, kind: str, layout: str):
    torch.manual_seed(0)
    config = text_config(kind)
    base_cls = (
        transformers.MistralForCausalLM if kind == "mistral" else transformers.LlamaForCausalLM
    )
    base = base_cls(config).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    base_weights = load_file(root / "base" / "model.safetensors")

    config.vocab_size = VOCAB + ADDED
    llava_config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=30,
            patch_size=15,
        ),
        text_config=config,
        image_token_index=IMAGE_TOKEN,
        pad_token_id=VOCAB + 1,
    )
    tuned = transformers.LlavaForConditionalGeneration(llava_config).to(torch.bfloat16)
    tuned.save_pretrained(root / "tuned")
    weights = load_file(root / "tuned" / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for name, value in base_weights.items():
        tuned_name = (
            name.replace("model.", "language_model.model.", 1)
            if name.startswith("model.")
            else "language_model." + name
        )
        new = value.float() + 0.002 * torch.randn(value.shape, generator=gen)
        if name.endswith("mlp.up_proj.weight"):
            new[:3] += 0.3 * torch.randn(new[:3].shape, generator=gen)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            new = torch.cat([new, weights[tuned_name][VOCAB:].float()])
        assert weights[tuned_name].shape == new.shape, tuned_name
        weights[tuned_name] = new.to(torch.bfloat16)
    if layout == "newer":
        renamed = {}
        for name, value in weights.items():
            for old, new in NEWER_LAYOUT:
                if name.startswith(old):
                    name = new + name[len(old) :]
                    break
            renamed[name] = value
        weights = renamed
    save_file(weights, str(root / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    (root / "tuned" / "preprocessor_config.json").write_text(json.dumps({"image_size": 30}))
    return root / "base", root / "tuned"


def language_names(names, layout):
    prefix = "language_model." if layout == "classic" else "model.language_model."
    return [n for n in names if n.startswith(prefix) or n == "lm_head.weight"]


@pytest.mark.parametrize(
    "kind,layout", [("llama", "classic"), ("llama", "newer"), ("mistral", "newer")]
)
def test_llava_merge_keeps_vision_and_merges_language(tmp_path, kind, layout, capsys):
    base_dir, tuned_dir = build_pair(tmp_path, kind, layout)
    out = tmp_path / "merged"
    args = ["--base", str(base_dir), "--tuned", str(tuned_dir), "--quiet"]
    assert main([*args, "--dry-run"]) == 0
    plan_text = capsys.readouterr().out
    expected_map = (
        "language_model.model. -> model."
        if layout == "classic"
        else "model.language_model. -> model."
    )
    assert expected_map in plan_text
    assert main([*args, "--out", str(out), "--method", "neu-p-ties"]) == 0

    model = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    ids = torch.tensor([[1, *[IMAGE_TOKEN] * PATCHES, 5, 6]])
    generated = model.generate(
        input_ids=ids, pixel_values=torch.randn(1, 3, 30, 30), max_new_tokens=3, do_sample=False
    )
    assert generated.shape == (1, ids.shape[1] + 3)

    base, tuned, merged = Checkpoint(base_dir), Checkpoint(tuned_dir), Checkpoint(out)
    assert merged.names() == tuned.names()
    report = json.loads((out / "fusion_report.json").read_text())
    entries = {t["name"]: t for t in report["tensors"]}
    params = params_for("neu-p-ties")
    lm = set(language_names(tuned.names(), layout))
    for name in tuned.names():
        got = merged.read(name)
        if name not in lm:
            assert_tensors_equal(
                got, tuned.read(name), f"{name} (vision/projector: kept from tuned)"
            )
            assert entries[name]["action"] == "copy"
            continue
        base_name = entries[name].get("base_name", name)
        b, t = base.read(base_name), tuned.read(name)
        rows = b.shape[0]
        expected, _ = merge_tensor(b, t[:rows], name, params=params)
        assert_tensors_equal(got[:rows], expected, name)
        assert_tensors_equal(got[rows:], t[rows:], f"{name} added rows")
        if rows != t.shape[0]:
            assert entries[name]["rows_from_tuned"] == ADDED
    up = next(n for n in lm if n.endswith("layers.0.mlp.up_proj.weight"))
    assert entries[up]["axis"] == "row" and torch.equal(merged.read(up)[:3], tuned.read(up)[:3])
    assert report["name_map"]["detected"] is True
    assert (out / "preprocessor_config.json").exists()


def test_wrong_map_is_a_clear_error(tmp_path, capsys):
    base_dir, tuned_dir = build_pair(tmp_path, "llama", "classic")
    status = main(
        [
            "--base",
            str(base_dir),
            "--tuned",
            str(tuned_dir),
            "--out",
            str(tmp_path / "o"),
            "--map",
            "text_model.=model.",
            "--quiet",
        ]
    )
    assert status == 2
    assert "--map text_model.=model. pairs no tuned tensor" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    status = main(
        [
            "--base",
            str(base_dir),
            "--tuned",
            str(tuned_dir),
            "--out",
            str(tmp_path / "o"),
            "--map",
            "language_model.model.=model.",
            "--map",
            "language_model.=",
            "--quiet",
        ]
    )
    assert status == 0


def test_a_partial_map_names_the_tensors_no_rule_pairs(tmp_path, capsys):
    base_dir, tuned_dir = build_pair(tmp_path, "llama", "classic")
    args = ["--base", str(base_dir), "--tuned", str(tuned_dir), "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert main([*args, "--map", "language_model.model.=model.", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
    assert "another architecture" not in err
    assert "no rule pairs tuned 'language_model.lm_head.weight' with base 'lm_head.weight'" in err
    assert "--map language_model.= : an empty BASE_PREFIX is the top level" in err


def test_base_with_tied_embeddings_merges_tuned_lm_head_against_embed_tokens(tmp_path):
    torch.manual_seed(0)
    config = text_config("llama")
    config.tie_word_embeddings = True
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    base = Checkpoint(tmp_path / "base")
    assert "lm_head.weight" not in base.tensors, "a tied base stores no lm_head"
    tuned_weights = {n: base.read(n).clone() for n in base.names()}
    tuned_weights["lm_head.weight"] = base.read("model.embed_tokens.weight") + 0.01
    save_file(tuned_weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "tuned").mkdir()
    (tmp_path / "model.safetensors").rename(tmp_path / "tuned" / "model.safetensors")
    out = tmp_path / "out"
    assert (
        main(
            [
                "--base",
                str(tmp_path / "base"),
                "--tuned",
                str(tmp_path / "tuned"),
                "--out",
                str(out),
                "--method",
                "ties",
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((out / "fusion_report.json").read_text())
    head = next(t for t in report["tensors"] if t["name"] == "lm_head.weight")
    assert head["action"] == "merge" and head["base_name"] == "model.embed_tokens.weight"
