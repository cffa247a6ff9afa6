"""Pairing on its own: each tuned tensor's base tensor, what counts as the language model, and
the one-to-one check with the message it fails with."""

import pytest
import torch
from checkpoints import write_single

from fusion_kernels.errors import PlanError
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.plan.layermap import LayerMap
from fusion_kernels.plan.namemap import NameMap
from fusion_kernels.plan.pairing import Pair, pair_all

LLM = [
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]
#: The identity layer map under base's layer prefix, as the planner builds it for a Llama base.
LAYERS = LayerMap(prefix="model.")


def checkpoint(path, names) -> Checkpoint:
    return Checkpoint(write_single(path, {n: torch.zeros(2, 2) for n in names}))


def test_same_names_pair_one_to_one(tmp_path):
    base, tuned = checkpoint(tmp_path / "b", LLM), checkpoint(tmp_path / "t", LLM)
    pairs, structure = pair_all(base, tuned, NameMap(), LAYERS, strict=True)
    assert pairs == {n: Pair(n) for n in LLM}
    assert structure.language_model == ("model.",)
    assert structure.as_dict()["unpaired_base"] == []


def test_a_wrapped_language_model_pairs_and_the_rest_is_copied(tmp_path):
    wrapped = [f"language_model.{n}" for n in LLM] + ["vision_tower.patch.weight"]
    base, tuned = checkpoint(tmp_path / "b", LLM), checkpoint(tmp_path / "t", wrapped)
    rules = NameMap((("language_model.", ""),))
    pairs, structure = pair_all(base, tuned, rules, LAYERS, strict=True)
    assert pairs["language_model.model.layers.1.mlp.up_proj.weight"].base == LLM[2]
    assert pairs["vision_tower.patch.weight"] == Pair(None, "outside the language model")
    assert structure.language_model == ("language_model.", "language_model.model.")


def test_a_base_tensor_without_partner_is_refused_naming_it_and_the_way_out(tmp_path):
    base = checkpoint(tmp_path / "b", [*LLM, "model.layers.2.mlp.up_proj.weight"])
    tuned = checkpoint(tmp_path / "t", LLM)
    with pytest.raises(PlanError) as refused:
        pair_all(base, tuned, NameMap(), LAYERS, strict=True)
    message = str(refused.value)
    assert (
        "base tensors without a tuned counterpart: 'model.layers.2.mlp.up_proj.weight'" in message
    )
    assert "--allow-unpaired" in message
    _, structure = pair_all(base, tuned, NameMap(), LAYERS, strict=False)
    assert structure.unpaired_base == ["model.layers.2.mlp.up_proj.weight"]
    assert not structure.strict


def test_an_unpaired_tuned_language_model_tensor_is_refused(tmp_path):
    base = checkpoint(tmp_path / "b", LLM)
    tuned = checkpoint(tmp_path / "t", [*LLM, "model.layers.1.mlp.extra.weight"])
    with pytest.raises(PlanError, match="tuned language-model tensors without a base counterpart"):
        pair_all(base, tuned, NameMap(), LAYERS, strict=True)
    pairs, structure = pair_all(base, tuned, NameMap(), LAYERS, strict=False)
    assert pairs["model.layers.1.mlp.extra.weight"] == Pair(None, "no base counterpart")
    assert structure.unpaired_tuned == ["model.layers.1.mlp.extra.weight"]


def test_a_new_layer_is_copied_and_the_others_shift(tmp_path):
    base = checkpoint(tmp_path / "b", [n for n in LLM if "layers.1" not in n])
    tuned = checkpoint(tmp_path / "t", LLM)
    layers = LayerMap((None, 0), "--layer-map new,0", "model.")
    pairs, structure = pair_all(base, tuned, NameMap(), layers, strict=True)
    assert pairs["model.layers.0.mlp.up_proj.weight"].base is None
    assert pairs["model.layers.0.mlp.up_proj.weight"].reason.startswith("new layer")
    assert pairs["model.layers.1.mlp.up_proj.weight"].base == "model.layers.0.mlp.up_proj.weight"
    assert structure.new == ["model.layers.0.mlp.up_proj.weight"]


def test_a_tied_base_embedding_may_pair_twice_anything_else_may_not(tmp_path):
    tied = [n for n in LLM if n != "lm_head.weight"]
    base, tuned = checkpoint(tmp_path / "b", tied), checkpoint(tmp_path / "t", LLM)
    rules = NameMap((("lm_head.", "model.embed_tokens."),))
    _, structure = pair_all(base, tuned, rules, LAYERS, strict=True)
    assert structure.paired_twice == []
    twice = NameMap((("model.norm.", "model.layers.0.mlp.up_proj."),))
    base = checkpoint(tmp_path / "b2", [n for n in LLM if n != "model.norm.weight"])
    with pytest.raises(PlanError, match="base tensors paired more than once"):
        pair_all(base, tuned, twice, LAYERS, strict=True)
