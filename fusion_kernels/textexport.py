"""The merged language model alone, as the base model it came from (``--text-model-out DIR``).

A merge of a multimodal fine-tune keeps the tuned model's names and its vision tower. This export
writes the merged language-model tensors under the base's tensor names (vocabulary rows the tuned
model added are dropped, so the embeddings fit the base's tokenizer), every base tensor the tuned
model lacks taken unchanged from the base, and the base's config, generation config and tokenizer
files beside them: ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it, so the recovered
language model can be served or scored without the vision tower. Tensors stream one at a time
from the merged output into the writer, which renames the directory into place when complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import PlanError
from .io.checkpoint import TensorInfo
from .io.outputs import check_output_path, check_target
from .io.sources import open_checkpoint
from .io.writer import MERGE_KIND, REPORT_NAME, CheckpointWriter
from .plan.planner import MergePlan, ShardPlan, TensorTask, regroup

#: Shard size of the export (transformers' own default).
TEXT_SHARD_BYTES = 5 * 10**9

FLAG = "--text-model-out"


def check_text_model_out(
    out: str | os.PathLike,
    inputs: list[str | os.PathLike],
    merged: str | os.PathLike,
    overwrite: bool = False,
) -> None:
    """Refuse, before any work, a ``--text-model-out`` that overlaps the merge's ``inputs`` (its
    references) or its output ``merged``, or that exists (without ``overwrite``, or when it is
    not an earlier output of ours)."""
    check_output_path(out, [merged], FLAG, "--out")
    roots = []
    for reference in inputs:
        checkpoint = open_checkpoint(reference)
        roots += checkpoint.roots
        checkpoint.close()
    check_output_path(out, roots, FLAG)
    check_target(Path(os.path.abspath(out)), overwrite, FLAG, REPORT_NAME, MERGE_KIND)


def export_text_model(
    base: str | os.PathLike,
    merged: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name_map: list[str] | None = None,
    layer_map: str | None = None,
    allow_unpaired: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the language model of the merged checkpoint ``merged`` as ``base`` names it.

    The tensors pair as the merge paired them (``name_map``, ``layer_map`` and
    ``allow_unpaired`` as given to it). Returns a small report (also written as
    ``fusion_report.json``): per base tensor, where its bytes came from.
    """
    from .pipeline import plan_merge

    base_ckpt, merged_ckpt, pairing = plan_merge(
        base, merged, name_map=name_map, layer_map=layer_map, allow_unpaired=allow_unpaired
    )
    try:
        sources = _sources(pairing)
        plan = _plan(base_ckpt, merged_ckpt, sources)
        with CheckpointWriter(out, plan, overwrite, FLAG) as writer:
            for name in base_ckpt.names():
                source, shape = sources.get(name), base_ckpt.info(name).shape
                tensor = merged_ckpt.read(source) if source else base_ckpt.read(name)
                if tuple(tensor.shape) != shape:
                    tensor = tensor[: shape[0]].contiguous()  # rows the tuned vocabulary added
                writer.write(name, tensor)
            report = {
                "text_model_of": str(Path(merged)),
                "base_model": base_ckpt.reference,
                "from_merged": sources,
                "from_base": [n for n in base_ckpt.names() if n not in sources],
            }
            directory = base_ckpt.directory if base_ckpt.path.is_dir() else None
            writer.commit(directory, report)
    finally:
        base_ckpt.close()
        merged_ckpt.close()
    return report


def _sources(pairing: MergePlan) -> dict[str, str]:
    """Base tensor name → the merged tensor that holds it. Two merged tensors on one base tensor
    (a tuned lm_head merged against tied base embeddings) resolve to the one named like it."""
    candidates: dict[str, list[str]] = {}
    for name, task in pairing.tasks.items():
        if task.base is not None:
            candidates.setdefault(task.base.name, []).append(name)
    chosen = {}
    for base_name, names in candidates.items():
        tail = base_name.split(".")[-2:]
        alike = [n for n in names if n.split(".")[-2:] == tail] if len(names) > 1 else names
        if len(alike) != 1:
            raise PlanError(
                f"base tensor {base_name!r} is held by several merged tensors "
                f"({', '.join(names)}); choose with --map"
            )
        chosen[base_name] = alike[0]
    return chosen


def _plan(base, merged, sources: dict[str, str]) -> MergePlan:
    tasks = {}
    for name in base.names():
        info = base.info(name)
        source = sources.get(name)
        if source is not None:
            have = merged.info(source)
            if (
                have.dtype != info.dtype
                or have.shape[1:] != info.shape[1:]
                or (have.shape[:1] < info.shape[:1])
            ):
                raise PlanError(
                    f"merged tensor {source!r} ({have.dtype} {list(have.shape)}) cannot stand "
                    f"for base tensor {name!r} ({info.dtype} {list(info.shape)})"
                )
        entry = TensorInfo(name, info.file, info.dtype, info.shape, 0, info.nbytes)
        tasks[name] = TensorTask(name, "copy", entry, reason="text model")
    shards: list[ShardPlan] = regroup(base.names(), base, TEXT_SHARD_BYTES)
    return MergePlan(tasks, shards)
