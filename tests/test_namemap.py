"""Name mapping (namemap.py): tuned names to base names, given (--map) or detected."""

from __future__ import annotations

import pytest
import torch
from checkpoints import write_single

from fusion_kernels.errors import ParameterError, PlanError
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.plan.namemap import NameMap, detect, parse_map, user_map


def checkpoint(path, names: dict[str, tuple[int, ...]]) -> Checkpoint:
    return Checkpoint(write_single(path, {n: torch.zeros(s) for n, s in names.items()}))


LAYERS = {
    "model.layers.0.mlp.up_proj.weight": (6, 4),
    "model.layers.1.mlp.up_proj.weight": (6, 4),
    "model.embed_tokens.weight": (10, 4),
}


def test_base_name_takes_the_first_rule_that_lands_on_a_base_name():
    mapping = NameMap((("language_model.model.", "model."), ("language_model.", "")))
    base = {"model.norm.weight", "lm_head.weight", "vision.proj"}
    assert mapping.base_name("language_model.model.norm.weight", base) == "model.norm.weight"
    assert mapping.base_name("language_model.lm_head.weight", base) == "lm_head.weight"
    assert mapping.base_name("vision.proj", base) == "vision.proj", "identity is the last resort"
    assert mapping.base_name("vision_tower.conv", base) is None
    assert not mapping.is_identity and NameMap().is_identity
    assert NameMap().describe() == ["identity"]
    assert NameMap((("a.", ""),)).describe() == ["a. -> (top level)"]


def test_parse_map_needs_an_equals_sign_and_allows_empty_sides():
    assert parse_map("language_model.=") == ("language_model.", "")
    assert parse_map("=model.") == ("", "model.")
    with pytest.raises(ParameterError, match=r"TUNED_PREFIX=BASE_PREFIX \(either may be empty"):
        parse_map("language_model.")


def test_detect_is_the_identity_for_an_llm_pair(tmp_path):
    base = checkpoint(tmp_path / "b", LAYERS)
    tuned = checkpoint(tmp_path / "t", LAYERS)
    mapping = detect(base, tuned)
    assert mapping.rules == () and not mapping.detected


def test_detect_finds_the_llava_prefix_and_the_top_level_head(tmp_path):
    base = checkpoint(tmp_path / "b", {**LAYERS, "lm_head.weight": (10, 4)})
    wrapped = {f"language_model.{n}": s for n, s in LAYERS.items()}
    tuned = checkpoint(
        tmp_path / "t",
        {**wrapped, "language_model.lm_head.weight": (12, 4), "vision_tower.w": (3, 3)},
    )
    mapping = detect(base, tuned)
    assert mapping.detected
    assert set(mapping.rules) == {("language_model.model.", "model."), ("language_model.", "")}
    names = base.tensors
    assert mapping.base_name("language_model.lm_head.weight", names) == "lm_head.weight"
    assert mapping.base_name("language_model.model.layers.1.mlp.up_proj.weight", names) == (
        "model.layers.1.mlp.up_proj.weight"
    )


def test_detect_refuses_two_equally_good_prefixes(tmp_path):
    base = checkpoint(tmp_path / "b", LAYERS)
    layers = {n: s for n, s in LAYERS.items() if "layers" in n}
    twice = {f"{p}.{n}": s for p in ("a", "b") for n, s in layers.items()}
    with pytest.raises(PlanError, match="two prefixes"):
        detect(base, checkpoint(tmp_path / "t", twice))


def test_a_user_map_rule_that_pairs_nothing_is_an_error(tmp_path):
    base = checkpoint(tmp_path / "b", LAYERS)
    tuned = checkpoint(tmp_path / "t", {f"lm.{n}": s for n, s in LAYERS.items()})
    assert user_map(base, tuned, ["lm.="]).rules == (("lm.", ""),)
    with pytest.raises(PlanError, match="pairs no tuned tensor"):
        user_map(base, tuned, ["llm.="])
