"""Real checkpoints: tiny transformers Llama models saved with save_pretrained, merged by the CLI,
loaded back with from_pretrained and run."""

import pytest
import torch
from conftest import assert_tensors_equal

from fusion_kernels import merge_tensor, params_for
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.merge import main

transformers = pytest.importorskip("transformers", reason="installed by the test extra")


def tiny_llama_pair(root, dtype=torch.bfloat16):
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(dtype)
    base.save_pretrained(root / "base")
    with torch.no_grad():
        for name, param in base.named_parameters():
            param.add_(0.002 * torch.randn_like(param))
            if name.endswith("mlp.up_proj.weight"):
                param[:3].add_(0.2 * torch.randn_like(param[:3]))
    base.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


@pytest.mark.parametrize("method", ["neu-p-ties", "neu-s-bread", "dare"])
def test_merged_tiny_llama_loads_and_runs(tmp_path, method):
    base, tuned = tiny_llama_pair(tmp_path)
    out = tmp_path / "merged"
    assert (
        main(
            [
                "--base",
                str(base),
                "--tuned",
                str(tuned),
                "--out",
                str(out),
                "--method",
                method,
                "--quiet",
            ]
        )
        == 0
    )
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, 128) and bool(torch.isfinite(logits).all())
    params = params_for(method)
    b, t, o = Checkpoint(base), Checkpoint(tuned), Checkpoint(out)
    assert o.names() == t.names()
    for name in t.names():
        expected, _ = merge_tensor(b.read(name), t.read(name), name, params=params)
        assert_tensors_equal(o.read(name), expected, name)
    if method == "neu-p-ties":
        up_t = t.read("model.layers.0.mlp.up_proj.weight")
        up_o = o.read("model.layers.0.mlp.up_proj.weight")
        assert torch.equal(up_o[:3], up_t[:3]), "the large-change neurons are restored"
