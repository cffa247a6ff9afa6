"""--text-model-out: the merged language model of a LLaVA or Qwen2-VL fine-tune, alone, under the
base's names with the base's config and tokenizer files, loadable by AutoModelForCausalLM."""

import json

import pytest
import torch
from checkpoints import TINY_TEXT

from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.merge import main

transformers = pytest.importorskip("transformers", reason="installed by the test extra")

VOCAB, ADDED = 128, 2
TEXT = TINY_TEXT


def llava(text_config):
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=30,
        patch_size=15,
    )
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text_config, image_token_index=VOCAB
    )
    return transformers.LlavaForConditionalGeneration(config)


def qwen2_vl(text_config):
    text = {**text_config.to_dict(), "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]}}
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=64,
        num_heads=2,
        mlp_ratio=2,
        patch_size=2,
        spatial_merge_size=1,
        temporal_patch_size=1,
    )
    config = transformers.Qwen2VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False
    )
    return transformers.Qwen2VLForConditionalGeneration(config)


KINDS = {
    "llava": (transformers.LlamaConfig, transformers.LlamaForCausalLM, llava),
    "qwen2-vl": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, qwen2_vl),
}


def build(root, kind):
    """base/ (a causal LM with a tokenizer file), tuned/ (the multimodal model around it, its
    language model moved and its vocabulary grown by ADDED rows)."""
    config_cls, base_cls, multimodal = KINDS[kind]
    torch.manual_seed(0)
    base = base_cls(config_cls(vocab_size=VOCAB, **TEXT)).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    (root / "base" / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    tuned = multimodal(config_cls(vocab_size=VOCAB + ADDED, **TEXT)).to(torch.bfloat16)
    language = tuned.model.language_model
    with torch.no_grad():
        pairs = [(language, base.model), (tuned.lm_head, base.lm_head)]
        for target_module, source_module in pairs:
            for name, source in source_module.named_parameters():
                target = target_module.get_parameter(name)
                target[: source.shape[0]] = source + 0.002 * torch.randn_like(source)
                if name.endswith("up_proj.weight"):
                    target[:3] += 0.3 * torch.randn_like(target[:3])
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


@pytest.mark.parametrize("kind", list(KINDS))
def test_text_model_loads_as_the_base_architecture(tmp_path, kind):
    base, tuned = build(tmp_path, kind)
    out, text = tmp_path / "merged", tmp_path / "text"
    args = ["--base", str(base), "--tuned", str(tuned), "--out", str(out), "--quiet"]
    assert main([*args, "--text-model-out", str(text), "--method", "neu-p-ties"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(text)
    assert type(model) is KINDS[kind][1]
    logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, VOCAB) and bool(torch.isfinite(logits).all())

    report = json.loads((out / "fusion_report.json").read_text())
    merged, exported, base_ckpt = Checkpoint(out), Checkpoint(text), Checkpoint(base)
    assert set(exported.tensors) == set(base_ckpt.tensors)
    pairs = {
        t.get("base_name", t["name"]): t["name"]
        for t in report["tensors"]
        if t["action"] == "merge"
    }
    assert set(pairs) == set(base_ckpt.tensors)
    for base_name, merged_name in pairs.items():
        rows = base_ckpt.info(base_name).shape[0]
        assert torch.equal(exported.read(base_name), merged.read(merged_name)[:rows]), base_name
    assert (text / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert (text / "tokenizer.json").is_file() and (text / "generation_config.json").is_file()
    assert not any("visual" in n or "vision" in n for n in exported.tensors)


def test_text_model_out_is_checked_before_the_merge(tmp_path, capsys):
    base, tuned = build(tmp_path, "qwen2-vl")
    (tmp_path / "taken").mkdir()
    out = tmp_path / "merged"
    args = ["--base", str(base), "--tuned", str(tuned), "--out", str(out)]
    capsys.readouterr()
    assert main([*args, "--text-model-out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--text-model-out", str(base / "text")]) == 2
    assert "overlaps the input" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--text-model-out", str(out / "text")]) == 2
    assert "overlaps --out" in capsys.readouterr().err and not out.exists()
