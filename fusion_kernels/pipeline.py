"""Driver: open the checkpoints, plan the merge, and run it into an output that appears only
when complete (the loop itself: :mod:`fusion_kernels.streaming.loop`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import BackendUnavailableError, CheckpointError
from .io.checkpoint import Checkpoint
from .io.outputs import check_output_path
from .io.safeload import MAX_INDEX_BYTES, read_bytes
from .io.sources import open_checkpoint
from .io.writer import CheckpointWriter, check_side_files
from .modelcard import CARD_NAME, model_card
from .neurons import NeuronRules
from .ops import requested_backend, select_backend
from .ops.known_answer import check_device
from .ops.registry import ChunkedOpFactory
from .params import MergeParams, TensorParams
from .plan.layermap import layer_map_for
from .plan.namemap import detect, layer_prefix, user_map
from .plan.planner import MergePlan, build_plan
from .streaming.choose import make_transport
from .streaming.chunks import BUFFERS_IN_FLIGHT, DEFAULT_MEMORY_BUDGET, Budget
from .streaming.device import parse_device
from .streaming.loop import MergeLoop
from .streaming.transport import Transport
from .version import __version__

log = logging.getLogger("fusion_kernels")


def plan_merge(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    rules: NeuronRules | None = None,
    max_shard_size: int | None = None,
    name_map: list[str] | None = None,
    layer_map: str | None = None,
    allow_unpaired: bool = False,
) -> tuple[Checkpoint, Checkpoint, MergePlan]:
    """Open both checkpoints and plan the merge; nothing is written.

    ``base`` and ``tuned``: local paths, Hub ids or ``MODEL+ADAPTER`` (see :mod:`.sources`).

    ``name_map``: ``TUNED_PREFIX=BASE_PREFIX`` rewrites; default: detected from names and shapes.
    ``layer_map``: base layer per tuned layer (``0,new,1-2``); default: from tuned's config.
    ``allow_unpaired``: skip base tensors and copy tuned language-model tensors that do not pair
    (default: refuse).
    """
    base_ckpt, tuned_ckpt = open_checkpoint(base), open_checkpoint(tuned)
    mapping = (
        user_map(base_ckpt, tuned_ckpt, name_map) if name_map else detect(base_ckpt, tuned_ckpt)
    )
    layers = layer_map_for(tuned_ckpt, layer_map, layer_prefix(base_ckpt))
    plan = build_plan(
        base_ckpt, tuned_ckpt, rules, max_shard_size, mapping, layers, not allow_unpaired
    )
    return base_ckpt, tuned_ckpt, plan


def merge_checkpoints(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    out: str | os.PathLike,
    params: MergeParams | TensorParams,
    *,
    rules: NeuronRules | None = None,
    backend: str | None = None,
    device: str = "cpu",
    max_shard_size: int | None = None,
    name_map: list[str] | None = None,
    layer_map: str | None = None,
    allow_unpaired: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    verify: bool = False,
    staging_bytes: int | None = None,
    memory_budget: int | None = None,
    model_card: bool = True,
) -> dict[str, Any]:
    """Merge the checkpoint ``tuned`` back with ``base`` into ``out``; returns the report.

    Args:
        base, tuned: checkpoint directories (or single ``.safetensors`` files).
        out: output directory; it appears only when the merge is complete.
        params: what each tensor computes (see :class:`MergeParams`, SPEC.md), or a
            :class:`TensorParams` with per-tensor overrides.
        rules: neuron rules (default: SPEC's rules for Llama/Mistral/Qwen2 names).
        backend: ``auto`` (default), ``torch``, ``cpp`` or ``triton``.
        device: where tensors are merged (``cpu``, ``cuda``, ``cuda:1``).
        max_shard_size: regroup output shards to at most this many bytes (default: tuned's).
        name_map: ``TUNED_PREFIX=BASE_PREFIX`` rewrites (default: detected, e.g. for LLaVA).
        layer_map: base layer per tuned layer, e.g. ``0,new,1-2`` (default: from tuned's config,
            e.g. Mllama's cross-attention layers are new; else the identity).
        allow_unpaired: merge even when base and tuned do not pair one to one (recorded in the
            report); default: refuse before writing anything.
        overwrite: replace an existing ``out``.
        progress: show a progress bar on stderr.
        verify: re-read the written files and check every tensor against what was computed.
        staging_bytes: size of the pinned staging buffers that tensors stream through to and from
            a GPU (default 256 MiB on CUDA, at most a quarter of the memory budget; on CPU,
            giving it streams through staging too).
        memory_budget: the most bytes of tensor data held at once (default
            :data:`~fusion_kernels.streaming.chunks.DEFAULT_MEMORY_BUDGET`); larger tensors
            stream through the cpp backend in chunks (see :mod:`fusion_kernels.streaming.chunks`).
            The torch and triton backends merge whole tensors (triton's host memory stays within the
            staging buffers; the tensors themselves are on the GPU).
        model_card: write ``README.md``, the merged model's card (see :mod:`.modelcard`).
    """
    out_dir = Path(out)
    torch_device = parse_device(device)
    params = params if isinstance(params, TensorParams) else TensorParams(params)
    requested_backend(backend)  # a name no backend has fails now, not at the first tensor
    rules = rules or NeuronRules()
    base_ckpt, tuned_ckpt, plan = plan_merge(
        base, tuned, rules, max_shard_size, name_map, layer_map, allow_unpaired
    )
    check_output_path(out_dir, [*base_ckpt.roots, *tuned_ckpt.roots])
    if tuned_ckpt.path.is_dir():
        check_side_files(tuned_ckpt.directory, (CARD_NAME,) if model_card else ())
    params.check(name for name, task in plan.tasks.items() if task.action == "merge")
    for name in plan.skipped:
        log.warning("tensor %r is only in base (%s); it is not in the output", name, base_ckpt.path)
    for name in plan.structure.unpaired_tuned:
        log.warning("tensor %r has no base counterpart; it is copied from tuned", name)
    device_check = check_device(torch_device, backend, params.default)  # before any tensor
    started = time.perf_counter()
    with CheckpointWriter(out_dir, plan, overwrite=overwrite) as writer:
        checksums: dict[str, int] | None = {} if verify else None
        budget = Budget(memory_budget or DEFAULT_MEMORY_BUDGET)
        transport = make_transport(torch_device, staging_bytes, budget.nbytes)
        loop = MergeLoop(
            plan, base_ckpt, tuned_ckpt, writer, params, backend, transport,
            checksums=checksums, budget=budget, chunked=_chunked_op(backend, transport),
            progress=progress,
        )  # fmt: skip
        try:
            stats = loop.run()
        finally:
            transport.close()
        report = _report(plan, params, rules, base_ckpt, tuned_ckpt, stats, device, started)
        report["memory_budget"] = budget.nbytes
        report["max_shard_size"] = max_shard_size
        report["verified"] = verify
        report["device_check"] = device_check
        card = _card(report, out_dir, tuned_ckpt) if model_card else None
        writer.commit(
            tuned_ckpt.directory if tuned_ckpt.path.is_dir() else None,
            report,
            checksums,
            extra_files={CARD_NAME: card} if card else None,
            verify_chunk_bytes=budget.nbytes // BUFFERS_IN_FLIGHT,
        )
    return report


def _chunked_op(backend: str | None, transport: Transport) -> ChunkedOpFactory | None:
    """The op that streams tensors over the budget in chunks (the cpp backend's), where the
    transport streams chunks (CPU merges); None: every tensor is merged whole."""
    if not transport.streams_chunks:
        return None
    try:
        return select_backend(backend, "cpu").chunked
    except BackendUnavailableError:
        return None  # the merge itself says why


def _card(report: dict[str, Any], out_dir: Path, tuned_ckpt) -> str:
    """The model card; a tuned (or adapter) README.md is kept inside it, not copied over it."""
    model_dir = tuned_ckpt.directory if tuned_ckpt.path.is_dir() else None
    folders = [tuned_ckpt.adapter_dir, model_dir]
    cards = [f / CARD_NAME for f in folders if f is not None and (f / CARD_NAME).is_file()]
    raw = read_bytes(cards[0], MAX_INDEX_BYTES, CheckpointError) if cards else None
    tuned_card = raw.decode("utf-8", errors="replace") if raw is not None else None
    return model_card(report, str(out_dir), tuned_card)


def _report(plan, params, rules, base_ckpt, tuned_ckpt, stats, device, started) -> dict[str, Any]:
    tensors = []
    for item in stats:
        entry = asdict(item)
        task = plan.tasks[item.name]
        if task.reason:
            entry["reason"] = task.reason
        if task.base is not None and task.base.name != item.name:
            entry["base_name"] = task.base.name
        if params.changes_for(item.name) and task.action == "merge":
            entry["params"] = params.changes_for(item.name)
        if task.merge_rows is not None:
            entry["merged_rows"] = task.merge_rows
            entry["rows_from_tuned"] = task.tuned.shape[0] - task.merge_rows
        tensors.append(entry)
    merged = [s for s in stats if s.action == "merge"]
    return {
        "fusion_kernels_version": __version__,
        "base": str(base_ckpt.path),
        "tuned": str(tuned_ckpt.path),
        "base_model": base_ckpt.reference,
        "tuned_model": tuned_ckpt.reference,
        "params": params.default.as_dict(),
        "param_overrides": params.describe(),
        "neuron_rules": [{"pattern": r.pattern, "axis": r.axis} for r in rules.rules],
        "name_map": {
            "detected": plan.name_map.detected,
            "rules": [{"tuned": t, "base": b} for t, b in plan.name_map.rules],
        },
        "layer_map": plan.layer_map.as_dict(),
        "pairing": plan.structure.as_dict(),
        "device": device,
        "backends": sorted({s.backend for s in merged}),
        "totals": {
            "tensors": len(stats),
            "merged": len(merged),
            "copied": sum(s.action.startswith("copy") for s in stats),
            "copied_nonfinite": [s.name for s in stats if s.action == "copy-nonfinite"],
            "skipped_base_only": plan.skipped,
            "bytes": plan.nbytes,
            "kept": sum(s.kept for s in merged),
            "numel_merged": sum(s.numel for s in merged),
            "restored_neurons": sum(s.restored for s in merged),
            "fallbacks": sum(s.fallbacks for s in merged),
            "seconds": round(time.perf_counter() - started, 3),
        },
        "tensors": tensors,
    }
