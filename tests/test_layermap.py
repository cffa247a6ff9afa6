"""The layer map (tuned language-model layer -> base layer) and the one-to-one pairing check."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from fusion_kernels.errors import ParameterError, PlanError
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.plan.layermap import (
    LayerMap,
    format_layers,
    from_config,
    layer_map_for,
    parse_layers,
)
from fusion_kernels.plan.namemap import NameMap
from fusion_kernels.plan.planner import build_plan

# Llama-3.2-11B-Vision: 40 text layers, cross-attention every fifth from layer 3.
CROSS_11B = [3, 8, 13, 18, 23, 28, 33, 38]


def test_config_inserted_layers_are_new_and_the_others_shift_down():
    layers = from_config(
        {"text_config": {"num_hidden_layers": 40, "cross_attention_layers": CROSS_11B}}
    )
    assert layers.new_layers == CROSS_11B
    assert [b for b in layers.layers if b is not None] == list(range(32))
    assert layers.layers[:5] == (0, 1, 2, None, 3)
    assert format_layers(layers.layers).startswith("0-2,new,3-6,new,7-10,new")
    assert layers.source == "config.json text_config.cross_attention_layers"


def test_configs_without_inserted_layers_give_the_identity():
    assert from_config({"text_config": {"num_hidden_layers": 4}}).is_identity
    assert from_config({"num_hidden_layers": 4, "cross_attention_layers": []}).is_identity
    assert from_config({}).describe() == "identity"


@given(st.lists(st.booleans(), min_size=1, max_size=30))
def test_format_and_parse_are_inverse(new_flags):
    layers, base = [], 0
    for new in new_flags:
        layers.append(None if new else base)
        base += not new
    assert parse_layers(format_layers(tuple(layers))) == tuple(layers)


def test_parse_accepts_ranges_new_and_identity():
    assert parse_layers(" 0-2, new ,5") == (0, 1, 2, None, 5)
    assert parse_layers("identity") is None


@pytest.mark.parametrize(
    "text,message",
    [
        ("0,x", "'x' is not a base layer"),
        ("3-1", "'3-1' is not a base layer"),
        ("0,,1", "'' is not a base layer"),
        ("0-2,1", "pairs base layer 1 more than once"),
    ],
)
def test_bad_layer_maps_are_parameter_errors(text, message):
    with pytest.raises(ParameterError, match=message):
        parse_layers(text)


def test_rename_moves_layers_under_the_prefix_only():
    layers = LayerMap((0, None, 1), "--layer-map", "model.")
    assert layers.rename("model.layers.2.mlp.up_proj.weight") == "model.layers.1.mlp.up_proj.weight"
    assert layers.rename("model.layers.1.cross_attn_attn_gate") is None
    assert layers.rename("vision.layers.1.fc.weight") == "vision.layers.1.fc.weight"
    assert layers.rename("lm_head.weight") == "lm_head.weight"
    with pytest.raises(PlanError, match="lists 3 tuned layers but tuned has layer 3"):
        layers.rename("model.layers.3.mlp.up_proj.weight")


def _write(path, names, config=None):
    path.mkdir(parents=True)
    save_file(
        {n: torch.full((2, 2), float(i)) for i, n in enumerate(names)},
        str(path / "model.safetensors"),
    )
    if config is not None:
        (path / "config.json").write_text(config)


def test_tuned_config_sets_the_map_and_a_flag_overrides_it(tmp_path):
    config = json.dumps({"text_config": {"num_hidden_layers": 3, "cross_attention_layers": [1]}})
    _write(tmp_path / "tuned", ["model.layers.0.w"], config)
    tuned = Checkpoint(tmp_path / "tuned")
    assert layer_map_for(tuned, None, "model.").layers == (0, None, 1)
    assert layer_map_for(tuned, "identity", "model.").is_identity
    assert layer_map_for(tuned, "1,new,0", "model.").source == "--layer-map"
    (tmp_path / "tuned" / "config.json").write_text("{not json")
    with pytest.raises(PlanError, match=r"config\.json: not valid JSON"):
        layer_map_for(Checkpoint(tmp_path / "tuned"), None, "model.")


def _layers(*indices, suffixes=("a.weight", "b.weight")):
    return [f"model.layers.{i}.{s}" for i in indices for s in suffixes]


def test_a_tied_base_embedding_may_pair_with_tuned_embedding_and_lm_head(tmp_path):
    _write(tmp_path / "base", ["model.embed_tokens.weight", *_layers(0)])
    _write(tmp_path / "tuned", ["model.embed_tokens.weight", "lm_head.weight", *_layers(0)])
    rules = NameMap((("lm_head.", "model.embed_tokens."),))
    plan = build_plan(Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "tuned"), name_map=rules)
    assert plan.tasks["lm_head.weight"].base.name == "model.embed_tokens.weight"
    assert plan.structure.paired_twice == []


def test_two_tuned_tensors_on_one_base_tensor_are_refused(tmp_path):
    _write(tmp_path / "base", _layers(0))
    _write(
        tmp_path / "tuned",
        [*_layers(0), *(f"extra.layers.0.{s}" for s in ("a.weight", "b.weight"))],
    )
    rules = NameMap((("extra.", "model."),))
    with pytest.raises(
        PlanError, match=r"base tensors paired more than once: 'model\.layers\.0\.a\.weight'"
    ):
        build_plan(Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "tuned"), name_map=rules)


def test_new_layers_are_copied_and_the_rest_pairs_shifted(tmp_path):
    _write(tmp_path / "base", _layers(0, 1))
    names = [*_layers(0, 2), "model.layers.1.gate", "vision.w"]
    _write(tmp_path / "tuned", names)
    layers = LayerMap((0, None, 1), "--layer-map", "model.")
    plan = build_plan(
        Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "tuned"), layer_map=layers
    )
    assert plan.tasks["model.layers.2.a.weight"].base.name == "model.layers.1.a.weight"
    assert plan.tasks["model.layers.1.gate"].reason == "new layer per --layer-map"
    assert plan.tasks["vision.w"].reason == "outside the language model"
    assert plan.structure.new == ["model.layers.1.gate"]


def test_a_base_that_pairs_little_is_called_the_wrong_base(tmp_path):
    _write(tmp_path / "base", ["model.layers.0.a.weight", *(f"other.{i}" for i in range(4))])
    _write(tmp_path / "tuned", _layers(0))
    with pytest.raises(PlanError, match=r"likely the wrong base \(1 of its 5 tensors pair"):
        build_plan(Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "tuned"))
