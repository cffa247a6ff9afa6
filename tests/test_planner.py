"""Planner (planner.py): what happens to every tensor and which shard it goes to."""

from __future__ import annotations

import pytest
import torch
from checkpoints import write_single

from fusion_kernels.errors import PlanError
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.neurons import NeuronRule, NeuronRules
from fusion_kernels.plan.namemap import NameMap
from fusion_kernels.plan.planner import build_plan


def checkpoint(path, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    return Checkpoint(write_single(path, tensors))


BASE = {
    "model.layers.0.mlp.up_proj.weight": torch.zeros(6, 4),
    "model.layers.0.mlp.down_proj.weight": torch.zeros(4, 6),
    "model.embed_tokens.weight": torch.zeros(10, 4),
    "model.norm.weight": torch.zeros(4),
    "position_ids": torch.zeros(5, dtype=torch.int64),
    "only_in_base": torch.zeros(2),
}


def test_tasks_axes_copies_and_skips(tmp_path):
    tuned = {k: v for k, v in BASE.items() if k != "only_in_base"}
    tuned["extra.weight"] = torch.zeros(3)
    plan = build_plan(
        checkpoint(tmp_path / "b", BASE), checkpoint(tmp_path / "t", tuned), strict=False
    )
    tasks = plan.tasks
    assert tasks["model.layers.0.mlp.up_proj.weight"].axis == "row"
    assert tasks["model.layers.0.mlp.down_proj.weight"].axis == "col"
    assert tasks["model.norm.weight"].axis == "none"
    assert tasks["position_ids"].action == "copy"
    assert tasks["position_ids"].reason == "I64 is not a float dtype"
    assert tasks["extra.weight"].action == "copy"
    assert tasks["extra.weight"].reason == "outside the language model"
    assert plan.skipped == ["only_in_base"]
    assert plan.merge_count == 4
    assert len(plan.shards) == 1 and sorted(plan.shards[0].names) == sorted(tuned)
    # Strict pairing (the default) refuses the base tensor nothing pairs with.
    with pytest.raises(PlanError, match="only_in_base"):
        build_plan(checkpoint(tmp_path / "b", BASE), checkpoint(tmp_path / "t", tuned))


def test_neuron_rules_come_before_the_defaults(tmp_path):
    rules = NeuronRules([NeuronRule(r"up_proj", "none")])
    plan = build_plan(checkpoint(tmp_path / "b", BASE), checkpoint(tmp_path / "t", BASE), rules)
    assert plan.tasks["model.layers.0.mlp.up_proj.weight"].axis == "none"
    assert plan.tasks["model.layers.0.mlp.down_proj.weight"].axis == "col"


def test_a_grown_vocabulary_merges_the_rows_base_has(tmp_path):
    tuned = {**BASE, "model.embed_tokens.weight": torch.zeros(13, 4)}
    plan = build_plan(checkpoint(tmp_path / "b", BASE), checkpoint(tmp_path / "t", tuned))
    task = plan.tasks["model.embed_tokens.weight"]
    assert task.action == "merge" and task.merge_rows == 10


@pytest.mark.parametrize(
    "name,tensor,message",
    [
        ("model.layers.0.mlp.up_proj.weight", torch.zeros(7, 4), "share an architecture"),
        ("model.embed_tokens.weight", torch.zeros(8, 4), "share an architecture"),
        ("model.norm.weight", torch.zeros(4, dtype=torch.float16), "dtypes agree"),
    ],
)
def test_mismatches_are_plan_errors_naming_the_tensor(tmp_path, name, tensor, message):
    tuned = {**BASE, name: tensor}
    with pytest.raises(PlanError, match=message) as info:
        build_plan(checkpoint(tmp_path / "b", BASE), checkpoint(tmp_path / "t", tuned))
    assert name in str(info.value)


def test_max_shard_size_regroups_in_order(tmp_path):
    tensors = {f"w{i}": torch.zeros(256) for i in range(5)}  # 1 KiB each in float32
    tuned = checkpoint(tmp_path / "t", tensors)
    plan = build_plan(checkpoint(tmp_path / "b", tensors), tuned, max_shard_size=2048)
    assert [s.filename for s in plan.shards] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert [n for s in plan.shards for n in s.names] == tuned.names()
    assert all(len(s.names) <= 2 for s in plan.shards)
    one = build_plan(checkpoint(tmp_path / "b2", tensors), tuned, max_shard_size=10**6)
    assert [s.filename for s in one.shards] == ["model.safetensors"]


def test_name_map_pairs_renamed_tensors(tmp_path):
    tuned = {f"language_model.{k}": v for k, v in BASE.items()}
    mapping = NameMap((("language_model.", ""),))
    plan = build_plan(
        checkpoint(tmp_path / "b", BASE), checkpoint(tmp_path / "t", tuned), name_map=mapping
    )
    task = plan.tasks["language_model.model.layers.0.mlp.up_proj.weight"]
    assert task.base.name == "model.layers.0.mlp.up_proj.weight" and task.axis == "row"


def test_a_tie_mismatch_is_named_not_called_another_architecture(tmp_path):
    # Base keeps lm_head as its own tensor; tuned ties it to the embeddings, so stores none.
    tuned = {k: v for k, v in BASE.items() if k != "only_in_base"}
    base = {**tuned, "lm_head.weight": torch.zeros(10, 4)}
    with pytest.raises(PlanError) as info:
        build_plan(checkpoint(tmp_path / "b", base), checkpoint(tmp_path / "t", tuned))
    message = str(info.value)
    assert "'lm_head.weight'" in message and "a base of another architecture" not in message
    assert "tie_word_embeddings is false in base" in message and "true in tuned" in message
    assert "tie_word_embeddings false so that its lm_head is written" in message
