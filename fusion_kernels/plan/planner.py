"""Planner: decide, before any output is written, what happens to every tensor and where it goes.

Each tuned tensor is paired with its base tensor (:mod:`~fusion_kernels.plan.pairing`: same name,
or the name under the checkpoints' :class:`~fusion_kernels.plan.namemap.NameMap` and
:class:`~fusion_kernels.plan.layermap.LayerMap`): ``merge`` (float in both, same shape and dtype;
with its neuron axis), or ``copy`` (outside the language model, a new layer, or not a float dtype).
An embedding or lm_head whose vocabulary grew in tuned merges its leading rows and copies the rest.
Pairing is one to one or the plan fails; with ``strict=False``, base-only tensors are skipped with
a warning and unpaired tuned ones copied. Output shards keep tuned's grouping, or are regrouped by
``max_shard_size``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..dtypes import MERGEABLE, dtype_mismatch
from ..errors import PlanError
from ..io.checkpoint import Checkpoint, TensorInfo
from ..neurons import NeuronRules
from ..sizes import format_size
from .layermap import LayerMap, layer_map_for
from .namemap import NameMap, layer_prefix
from .pairing import Structure, pair_all


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: ``merge`` with ``axis``, or ``copy`` from tuned (``reason`` says why).

    ``merge_rows`` is set when tuned's vocabulary grew: only the leading rows that base has merge.
    """

    name: str
    action: str
    tuned: TensorInfo
    base: TensorInfo | None = None
    axis: str = "none"
    reason: str = ""
    merge_rows: int | None = None


@dataclass
class ShardPlan:
    """One output file and the tensors it holds, in write order."""

    filename: str
    names: list[str]


@dataclass
class MergePlan:
    """Every output tensor's task, the output shards, and the base-only names that are skipped."""

    tasks: dict[str, TensorTask]
    shards: list[ShardPlan]
    skipped: list[str] = field(default_factory=list)
    name_map: NameMap = field(default_factory=NameMap)
    layer_map: LayerMap = field(default_factory=LayerMap)
    structure: Structure = field(default_factory=Structure)

    @property
    def merge_count(self) -> int:
        return sum(t.action == "merge" for t in self.tasks.values())

    @property
    def nbytes(self) -> int:
        return sum(t.tuned.nbytes for t in self.tasks.values())

    def describe(self) -> str:
        """The plan as text, one line per tensor, for ``--dry-run``."""
        lines = [
            f"name map (tuned -> base): {'; '.join(self.name_map.describe())}",
            f"layer map (tuned layer -> base layer): {self.layer_map.describe()}",
        ]
        if not self.structure.strict:
            lines.append(
                f"--allow-unpaired: {len(self.structure.unpaired_tuned)} tuned language-model "
                f"tensors without a base counterpart are copied, {len(self.skipped)} base tensors "
                "skipped"
            )
        for shard in self.shards:
            lines.append(f"{shard.filename}:")
            for name in shard.names:
                task = self.tasks[name]
                what = (
                    f"merge axis={task.axis}" if task.action == "merge" else f"copy ({task.reason})"
                )
                if task.base is not None and task.base.name != name:
                    what += f" with {task.base.name}"
                lines.append(f"  {name}  {list(task.tuned.shape)} {task.tuned.dtype}  {what}")
        lines.extend(f"skip (only in base): {name}" for name in self.skipped)
        lines.append(
            f"{len(self.tasks)} tensors: {self.merge_count} merged, "
            f"{len(self.tasks) - self.merge_count} copied, {len(self.skipped)} skipped; "
            f"{len(self.shards)} shard(s), {format_size(self.nbytes)}"
        )
        return "\n".join(lines)


def output_shard_name(filename: str) -> str:
    """The safetensors file a merge writes for an input shard: ``pytorch_model-00001-of-00002.bin``
    → ``model-00001-of-00002.safetensors``; a ``.safetensors`` name stays as it is."""
    if not filename.endswith(".bin"):
        return filename
    stem = filename.removesuffix(".bin")
    return (
        "model" + stem.removeprefix("pytorch_model") if stem.startswith("pytorch_model") else stem
    ) + ".safetensors"


def build_plan(
    base: Checkpoint,
    tuned: Checkpoint,
    rules: NeuronRules | None = None,
    max_shard_size: int | None = None,
    name_map: NameMap | None = None,
    layer_map: LayerMap | None = None,
    strict: bool = True,
) -> MergePlan:
    """Pair tuned with base tensors and lay out the output shards. Raises PlanError on mismatch.

    ``layer_map``: default, what tuned's config implies (else the identity); ``strict``: refuse a
    pairing that is not one to one."""
    rules = rules or NeuronRules()
    name_map = name_map or NameMap()
    layer_map = layer_map or layer_map_for(tuned, None, layer_prefix(base))
    pairs, structure = pair_all(base, tuned, name_map, layer_map, strict)
    names = tuned.names()
    tasks = {}
    for name in names:
        found = pairs[name]
        other = found.base and base.info(found.base)
        tasks[name] = _task(name, tuned.info(name), other, rules, found.reason)
    skipped = structure.unpaired_base
    if max_shard_size is None:
        shards = [
            ShardPlan(
                output_shard_name(file.name), [n for n in names if tuned.info(n).file == file]
            )
            for file in tuned.files
        ]
    else:
        shards = regroup(names, tuned, max_shard_size)
    shards = [s for s in shards if s.names]
    return MergePlan(tasks, shards, skipped, name_map, layer_map, structure)


# Tensors whose first dimension is the vocabulary, which a multimodal fine-tune may grow.
_VOCAB = re.compile(r"(embed_tokens|lm_head|embed_out|wte|word_embeddings)\.weight$")


def _task(
    name: str, info: TensorInfo, other: TensorInfo | None, rules: NeuronRules, why: str
) -> TensorTask:
    if other is None:
        return TensorTask(name, "copy", info, reason=why)
    merge_rows = None
    if other.shape != info.shape:
        grown = (
            len(info.shape) == 2
            and info.shape[1:] == other.shape[1:]
            and info.shape[0] > other.shape[0]
            and _VOCAB.search(name) is not None
        )
        if not grown:
            raise PlanError(
                f"tensor {name!r}: shape {list(info.shape)} in tuned ({info.file}) but "
                f"{list(other.shape)} in base {other.name!r} ({other.file}); the two must share "
                "an architecture"
            )
        merge_rows = other.shape[0]
    mixed = dtype_mismatch(name, info.dtype, other.dtype, f" ({info.file})", f" ({other.file})")
    if mixed:
        raise PlanError(mixed)
    if info.dtype not in MERGEABLE:
        return TensorTask(name, "copy", info, other, reason=_copy_reason(info))
    axis = rules.axis_for(other.name, info.shape)
    return TensorTask(name, "merge", info, other, axis=axis, merge_rows=merge_rows)


def regroup(names: list[str], tuned: Checkpoint, max_bytes: int) -> list[ShardPlan]:
    """Output shards of at most ``max_bytes`` each (a larger tensor alone in its shard), holding
    ``names`` in order; one ``model.safetensors`` when they all fit."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tuned.info(name).nbytes
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return [ShardPlan("model.safetensors", groups[0])]
    total = len(groups)
    return [
        ShardPlan(f"model-{i:05d}-of-{total:05d}.safetensors", group)
        for i, group in enumerate(groups, start=1)
    ]


def _copy_reason(info: TensorInfo) -> str:
    if info.torch_dtype.is_floating_point:
        return f"{info.dtype} is not a merge dtype ({', '.join(MERGEABLE)})"
    return f"{info.dtype} is not a float dtype"
