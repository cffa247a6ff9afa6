"""Real checkpoints: tiny transformers Llama models saved with save_pretrained, merged by the CLI,
loaded back with from_pretrained and run."""

import subprocess
import sys

import pytest
import torch
from checkpoints import TINY, tiny_llama_config
from conftest import assert_tensors_equal

from fusion_kernels import merge_tensor, params_for
from fusion_kernels.demo import generate_pair
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.merge import main

transformers = pytest.importorskip("transformers", reason="installed by the test extra")


def tiny_llama_pair(root, dtype=torch.bfloat16):
    config = tiny_llama_config()
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


def test_the_demo_pair_and_its_merge_tokenize_and_generate(tmp_path):
    """The demo pair is complete: transformers loads its tokenizer (built locally, no download)
    from base, tuned and the merge, and the merged model generates from a prompt."""
    base, tuned = generate_pair(tmp_path / "demo", TINY)
    out = tmp_path / "merged"
    assert main(["--base", str(base), "--tuned", str(tuned), "--out", str(out), "--quiet"]) == 0
    for model in (base, tuned, out):
        tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        assert max(tokenizer.get_vocab().values()) < TINY.vocab
    prompt = tokenizer("The cat sat on the", return_tensors="pt")
    assert tokenizer.unk_token_id not in prompt.input_ids[0].tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt.input_ids.shape[1] + 4
    assert tokenizer.decode(generated[0]).startswith("the cat sat on the")


def test_the_mergekit_launcher_copies_the_demo_pairs_tokenizer(tmp_path):
    """mergekit copies the base's tokenizer; without one it printed a traceback (and exited 0)."""
    pytest.importorskip("mergekit", reason="installed by the test extra")
    base, tuned = generate_pair(tmp_path / "demo", TINY)
    config = tmp_path / "ties.yml"
    config.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {tuned}\n"
        "    parameters: {density: 0.2, weight: 1.0}\ndtype: bfloat16\n"
    )
    out = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-m", "fusion_kernels.mergekit", str(config), str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stderr
    assert transformers.AutoTokenizer.from_pretrained(out).get_vocab()
