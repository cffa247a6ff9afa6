"""``--tuned MODEL+ADAPTER``: a PEFT LoRA adapter merged in while streaming gives exactly the merge
of the checkpoint PEFT's ``merge_and_unload`` materializes (rsLoRA, fan_in_fan_out, alpha_pattern,
embeddings and modules_to_save included); bad adapters are one-line errors."""

import json

import pytest
import torch
from checkpoints import tiny_llama_config, tree_digest
from safetensors.torch import load_file, save_file

from fusion_kernels.errors import CheckpointError
from fusion_kernels.io.lora import LoraCheckpoint
from fusion_kernels.io.sources import open_checkpoint
from fusion_kernels.merge import main

transformers = pytest.importorskip("transformers", reason="installed by the test extra")
peft = pytest.importorskip("peft", reason="installed by the test extra")


def llama(dtype):
    return transformers.LlamaForCausalLM(tiny_llama_config()).to(dtype)


def gpt2(dtype):
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(config).to(dtype)


VARIANTS = {
    "llama-bf16": (
        llama,
        torch.bfloat16,
        dict(
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
            modules_to_save=["lm_head"],
        ),
    ),
    "llama-f32-rslora-embed": (
        llama,
        torch.float32,
        dict(
            target_modules=["q_proj", "o_proj", "embed_tokens"],
            use_rslora=True,
            alpha_pattern={"o_proj": 32},
            rank_pattern={"o_proj": 2},
        ),
    ),
    "gpt2-fan-in-fan-out": (
        gpt2,
        torch.float16,
        dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
}


def build(root, variant):
    """base/ (the model), adapter/ (a trained-looking LoRA), full/ (PEFT's merge_and_unload)."""
    make, dtype, options = VARIANTS[variant]
    torch.manual_seed(0)
    make(dtype).save_pretrained(root / "base")
    model = type(make(dtype)).from_pretrained(root / "base", dtype=dtype)
    config = peft.LoraConfig(r=4, lora_alpha=12, init_lora_weights=False, **options)
    tuned = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_" in name:
                param.mul_(0.5)
            elif "modules_to_save" in name:
                param.add_(0.01 * torch.randn_like(param))
    tuned.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", peft_merge(root, variant, root / "adapter", "full")


def peft_merge(root, variant, adapter, out):
    """``root/out``: PEFT's ``merge_and_unload`` of ``adapter`` into ``root/base``."""
    make, dtype, _ = VARIANTS[variant]
    fresh = type(make(dtype)).from_pretrained(root / "base", dtype=dtype)
    merged = peft.PeftModel.from_pretrained(fresh, adapter).merge_and_unload()
    merged.save_pretrained(root / out)
    return root / out


def assert_view_is_merge_and_unload(base, adapter, full):
    view = open_checkpoint(f"{base}+{adapter}")
    materialized = load_file(full / "model.safetensors")
    assert isinstance(view, LoraCheckpoint) and view.pairs
    assert set(view.tensors) == set(materialized)
    for name, expected in materialized.items():
        got = view.read(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
        assert torch.equal(view.view(name), expected), name


def edit_config(adapter, **changes):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_view_equals_merge_and_unload(tmp_path, variant):
    assert_view_is_merge_and_unload(*build(tmp_path, variant))


# PEFT ignores fan_in_fan_out: it transposes for a Conv1D (GPT-2's c_attn, c_proj, c_fc; the
# attention's c_proj is square) and never for an nn.Linear (Llama's q_proj is square, v_proj not).
@pytest.mark.parametrize(
    "variant,flag",
    [("llama-bf16", True), ("llama-bf16", "false"), ("gpt2-fan-in-fan-out", False)],
)
def test_fan_in_fan_out_follows_the_module_class_as_peft_does(tmp_path, variant, flag):
    base, adapter, _ = build(tmp_path, variant)
    edit_config(adapter, fan_in_fan_out=flag)
    assert_view_is_merge_and_unload(base, adapter, peft_merge(tmp_path, variant, adapter, "peft"))


def test_a_square_weight_of_unknown_class_with_fan_in_fan_out_is_refused(tmp_path):
    base, adapter, _ = build(tmp_path, "gpt2-fan-in-fan-out")
    (base / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"attn\.c_proj.*config\.json"):
        open_checkpoint(f"{base}+{adapter}")


@pytest.mark.parametrize("variant", ["llama-bf16", "gpt2-fan-in-fan-out"])
def test_merge_with_adapter_equals_merge_of_materialized(tmp_path, variant):
    base, adapter, full = build(tmp_path, variant)
    before = tree_digest(tmp_path)
    common = ["--base", str(base), "--method", "neu-p-ties", "--quiet"]
    assert main([*common, "--tuned", str(full), "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--tuned", f"{base}+{adapter}", "--out", str(tmp_path / "b")]) == 0
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()
    report = json.loads((tmp_path / "b" / "fusion_report.json").read_text())
    assert report["tuned_model"] == f"{base}+{adapter}"
    # GPT-2's c_attn/c_fc are not neuron-rule names; Llama's projections are.
    assert (report["totals"]["restored_neurons"] > 0) == variant.startswith("llama")
    after = tree_digest(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before


def test_staged_reads_of_a_lora_tensor_match_whole_reads(tmp_path):
    base, adapter, _ = build(tmp_path, "llama-bf16")
    view = open_checkpoint(f"{base}+{adapter}")
    name = "model.layers.0.self_attn.q_proj.weight"
    whole = view.read(name).reshape(-1).view(torch.uint8).numpy()
    import numpy as np

    parts = []
    for offset in range(0, whole.size, 1000):
        out = np.empty(min(1000, whole.size - offset), np.uint8)
        view.read_into(name, offset, out)
        parts.append(out)
    assert np.array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("variant", ["llama-bf16", "llama-f32-rslora-embed"])
def test_a_budgeted_merge_streams_what_the_adapter_leaves_and_matches(
    tmp_path, monkeypatch, variant
):
    pytest.importorskip("fusion_kernels._cpp", reason="chunked merges run on the cpp backend")
    from fusion_kernels import merge_checkpoints, params_for
    from fusion_kernels.streaming import loop

    base, adapter, _ = build(tmp_path, variant)
    weights = load_file(adapter / "adapter_model.safetensors")
    # A replaced tensor stored in another dtype: its rows are cast as the whole tensor is.
    for key in [k for k in weights if "modules_to_save" in k]:
        weights[key] = weights[key].float()
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    streamed = []
    chunked = loop.merge_task_in_chunks

    def spy(task, *args):
        streamed.append(task.name)
        return chunked(task, *args)

    monkeypatch.setattr(loop, "merge_task_in_chunks", spy)
    tuned, params = f"{base}+{adapter}", params_for("neu-p-ties")
    for out, budget in (("whole", None), ("chunked", 1)):
        merge_checkpoints(
            base, tuned, tmp_path / out, params, backend="cpp", memory_budget=budget,
            progress=False, verify=True,
        )  # fmt: skip
    whole, chunks = (tmp_path / d / "model.safetensors" for d in ("whole", "chunked"))
    assert whole.read_bytes() == chunks.read_bytes()
    # Tensors a LoRA pair updates are computed whole (row_origin says why); the rest stream.
    view = open_checkpoint(tuned)
    assert set(streamed) == set(view.tensors) - set(view.pairs)
    assert view.replaced.keys() - view.pairs.keys() <= set(streamed)


def test_adapter_for_another_model_is_a_clear_error(tmp_path, capsys):
    base, adapter, _ = build(tmp_path, "llama-bf16")
    weights = load_file(adapter / "adapter_model.safetensors")
    for key in [k for k in weights if "layers.0.self_attn.q_proj.lora_" in k]:
        weights[key.replace("layers.0", "layers.9")] = weights.pop(key)
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["--base", str(base), "--tuned", f"{base}+{adapter}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "layers.9" in err and "does not have" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "change,needle",
    [({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "IA3"), ({"lora_bias": True}, "bias")],
)
def test_unsupported_adapter_configs_are_refused(tmp_path, change, needle):
    base, adapter, _ = build(tmp_path, "llama-bf16")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=needle):
        open_checkpoint(f"{base}+{adapter}")


def test_shape_mismatch_and_adapter_as_model_are_errors(tmp_path):
    base, adapter, _ = build(tmp_path, "llama-bf16")
    with pytest.raises(CheckpointError, match="MODEL\\+"):
        open_checkpoint(adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in weights if "q_proj.lora_B" in k)
    weights[key] = torch.zeros(5, 4, dtype=weights[key].dtype)
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit"):
        open_checkpoint(f"{base}+{adapter}")
    with pytest.raises(CheckpointError, match="no '\\+' splits"):
        open_checkpoint(f"{base}+{tmp_path / 'missing'}")


def test_config_file_takes_model_plus_adapter(tmp_path):
    base, adapter, full = build(tmp_path, "llama-bf16")
    config = tmp_path / "ties.yml"
    config.write_text(
        f"merge_method: ties\nbase_model: {base}\n"
        f"models:\n  - model: {base}+{adapter}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
    )
    assert main(["--config", str(config), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    args = ["--base", str(base), "--tuned", str(full), "--method", "ties", "--density", "0.3"]
    assert main([*args, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()


def resave(adapter, change):
    """Rewrite the adapter's weights with ``change(weights)`` applied."""
    weights = load_file(adapter / "adapter_model.safetensors")
    change(weights)
    save_file(weights, str(adapter / "adapter_model.safetensors"))


@pytest.mark.parametrize("shape", [(130, 64), (128, 65)])
def test_a_saved_module_of_another_shape_is_refused_naming_the_adapter(tmp_path, capsys, shape):
    base, adapter, _ = build(tmp_path, "llama-bf16")

    def reshape(weights):
        (key,) = [k for k in weights if "lm_head" in k]  # modules_to_save: the whole lm_head
        weights[key] = torch.zeros(shape, dtype=weights[key].dtype)

    resave(adapter, reshape)
    with pytest.raises(RuntimeError, match="size mismatch"):  # PEFT refuses it too
        peft_merge(tmp_path, "llama-bf16", adapter, "peft")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["--base", str(base), "--tuned", f"{base}+{adapter}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not out.exists()
    assert err.startswith(f"error: {adapter / 'adapter_model.safetensors'}: ") and "lm_head" in err


def test_a_rank_pattern_the_tensors_contradict_is_refused(tmp_path):
    base, adapter, _ = build(tmp_path, "llama-bf16")
    edit_config(adapter, rank_pattern={"q_proj": 2})  # the saved q_proj tensors have rank 4
    with pytest.raises(RuntimeError, match="size mismatch"):  # PEFT refuses it too
        peft_merge(tmp_path, "llama-bf16", adapter, "peft")
    with pytest.raises(CheckpointError, match=r"q_proj' has rank 4 but .* rank 2"):
        open_checkpoint(f"{base}+{adapter}")
