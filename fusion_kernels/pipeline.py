"""Driver: stream a planned merge from the input shards through the op into the writer.

Three stages overlap: a reader thread loads the next tensor pairs while the current one is merged,
and a writer thread writes the previous results. On CPU (transfer.py), the next pair is read
from disk straight into reused buffers and one result waits for the writer; where direct reads
are off, pairs are read ahead into the page cache only (up to the budget's worth) and mapped into
the process when their turn comes, and up to two results wait. Memory holds a few tensors
whatever the model size. A tensor too large for the memory budget streams in chunks of rows
(chunks.py) through a reader thread of its own and the same writer. Such tensors go first: after
their first pass they are read again from the page cache, and while those passes compute, the
reader fetches the tensors after them from disk (last, nothing would be left to read meanwhile).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .errors import BackendUnavailableError, CheckpointError, FusionError
from .io.outputs import check_output_path
from .io.reader import Checkpoint
from .io.safeload import MAX_INDEX_BYTES, read_bytes
from .io.sources import open_checkpoint
from .io.writer import CheckpointWriter, check_side_files
from .modelcard import CARD_NAME, model_card
from .neurons import NeuronRules
from .ops import TensorStats, merge_tensor, requested_backend, select_backend
from .ops.cpp import ChunkedMergeCpp
from .ops.known_answer import check_device
from .params import MergeParams, TensorParams
from .plan.layermap import layer_map_for
from .plan.namemap import detect, layer_prefix, user_map
from .plan.planner import MergePlan, TensorTask, build_plan
from .streaming.chunks import (
    BUFFERS_IN_FLIGHT,
    DEFAULT_MEMORY_BUDGET,
    Budget,
    merge_task_in_chunks,
    row_origin,
)
from .streaming.transfer import HostTransport, make_transport, parse_device
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
        chunking = _chunks_enabled(backend, torch_device, transport)
        try:
            stats = _run(
                plan, base_ckpt, tuned_ckpt, writer, params, backend, transport, progress,
                checksums, budget if chunking else None,
            )  # fmt: skip
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


def _chunks_enabled(backend: str | None, device: torch.device, transport) -> bool:
    """Whether tensors over the budget stream in chunks: CPU merges on the cpp backend."""
    if device.type != "cpu" or not isinstance(transport, HostTransport):
        return False
    try:
        return select_backend(backend, "cpu").name == "cpp"
    except BackendUnavailableError:
        return False  # the merge itself says why


def _card(report: dict[str, Any], out_dir: Path, tuned_ckpt) -> str:
    """The model card; a tuned (or adapter) README.md is kept inside it, not copied over it."""
    model_dir = tuned_ckpt.directory if tuned_ckpt.path.is_dir() else None
    folders = [getattr(tuned_ckpt, "adapter_dir", None), model_dir]
    cards = [f / CARD_NAME for f in folders if f is not None and (f / CARD_NAME).is_file()]
    raw = read_bytes(cards[0], MAX_INDEX_BYTES, CheckpointError) if cards else None
    tuned_card = raw.decode("utf-8", errors="replace") if raw is not None else None
    return model_card(report, str(out_dir), tuned_card)


def _run(
    plan, base_ckpt, tuned_ckpt, writer, params, backend, transport, progress, checksums,
    budget: Budget | None,
) -> list[TensorStats]:  # fmt: skip
    """Every task, the stats in output order; with a ``budget``, the tasks it cannot hold whole
    stream in chunks, first (see the module's docstring), while the pairs after them are read
    ahead. Each tensor is written at its own offset, so the order of the work is free."""
    order = [plan.tasks[name] for shard in plan.shards for name in shard.names]

    streamed = {
        task.name
        for task in order
        if budget is not None
        and not budget.whole(task, params.for_tensor(task.name))
        and _rows_readable(task, base_ckpt, tuned_ckpt)
    }

    def whole(task: TensorTask) -> bool:
        return task.name not in streamed

    output_order = {task.name: index for index, task in enumerate(order)}
    order = [t for t in order if not whole(t)] + [t for t in order if whole(t)]

    def load(task: TensorTask) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not whole(task):
            return None, None
        # Both tensors' reads queued at once: the disk reads them in parallel.
        transport.prefetch(tuned_ckpt, task.tuned)
        if task.action == "merge":
            transport.prefetch(base_ckpt, task.base)
        tuned = transport.load(tuned_ckpt, task.tuned)
        base = transport.load(base_ckpt, task.base) if task.action == "merge" else None
        return base, tuned

    def release(task: TensorTask) -> None:
        transport.release(tuned_ckpt, task.tuned)
        if task.action == "merge":
            transport.release(base_ckpt, task.base)

    def store(task: TensorTask, merged: torch.Tensor, after) -> None:
        crc = transport.store(writer, task.name, merged, checksums is not None, after)
        if checksums is not None:
            checksums[task.name] = crc
        # A copied tensor is written straight from its input view.
        if task.action == "copy":
            release(task)

    def stream(task: TensorTask, chunk_reader: Executor, out: Executor) -> TensorStats:
        io = _chunk_io(task, transport, writer, chunk_reader, out, checksums is not None)
        tensor_params = params.for_tensor(task.name)
        stats, crc = merge_task_in_chunks(
            task, base_ckpt, tuned_ckpt, tensor_params, budget, io, ChunkedMergeCpp
        )
        if checksums is not None:
            checksums[task.name] = crc
        return stats

    results: list[TensorStats] = []
    bar = tqdm(
        total=plan.nbytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc="merging",
        disable=not progress,
        dynamic_ncols=True,
    )
    with (
        bar,
        ThreadPoolExecutor(1, "fk-read") as reader,
        ThreadPoolExecutor(1, "fk-chunks") as chunk_reader,
        ThreadPoolExecutor(1, "fk-write") as out,
    ):
        ahead = _ReadAhead(order, whole, lambda i: reader.submit(load, order[i]), transport)
        # Stores not yet done, oldest first; each holds one of the transport's output buffers.
        in_flight: deque[Future] = deque()
        ring = getattr(transport, "outputs", 2)
        for position, task in enumerate(order):
            base, tuned = ahead.take(position)
            if not whole(task):
                # Its chunks reuse the output buffers: the earlier stores must be done.
                while in_flight:
                    in_flight.popleft().result()
                results.append(stream(task, chunk_reader, out))
                ahead.fill(position)
                bar.update(task.tuned.nbytes)
                continue
            ahead.fill(position)
            for tensor in (base, tuned):
                if tensor is not None:
                    transport.ready(tensor)
            tensor_params = params.for_tensor(task.name)
            merged, stats = _compute(task, base, tuned, tensor_params, backend, transport, writer)
            done = transport.computed()
            if task.action == "merge":
                release(task)
            results.append(stats)
            # The next compute reuses the output of the oldest store still in flight when the
            # ring is full: wait for that store first.
            while len(in_flight) >= ring - 1:
                in_flight.popleft().result()
            in_flight.append(out.submit(store, task, merged, done))
            bar.update(task.tuned.nbytes)
            bar.set_postfix_str(f"tensors {position + 1}/{len(order)}", refresh=False)
        while in_flight:
            in_flight.popleft().result()
    return sorted(results, key=lambda stats: output_order[stats.name])


class _ReadAhead:
    """The loads submitted ahead of the merge: always the next task's, and more while the
    whole tasks ahead total at most the transport's ``read_ahead_bytes``. A task that streams
    in chunks loads nothing ahead (its chunks are read when its turn comes) and counts for
    nothing, so the pairs after it are read while it runs."""

    def __init__(self, order, whole, submit, transport):
        """``submit(index)`` submits task ``index``'s load and returns its future."""
        self.order, self.whole, self.submit = order, whole, submit
        self.limit = transport.read_ahead_bytes
        self.loads: dict[int, Future] = {}
        self.next = 0
        self.fill(-1)

    def take(self, position: int):
        """The loaded ``(base, tuned)`` of task ``position``."""
        return self.loads.pop(position).result()

    def fill(self, position: int) -> None:
        """Submit loads after task ``position`` (being merged, or done) as the limit allows."""
        while self.next < len(self.order):
            if self.next > position + 1:
                tasks = self.order[position + 1 : self.next + 1]
                ahead = sum(task.tuned.nbytes for task in tasks if self.whole(task))
                if 2 * ahead > self.limit:
                    return
            self.loads[self.next] = self.submit(self.next)
            self.next += 1


def _rows_readable(task: TensorTask, base_ckpt, tuned_ckpt) -> bool:
    """Whether the task's inputs can be read in rows; a tensor a LoRA adapter updates is
    computed whole (:meth:`~fusion_kernels.io.lora.LoraCheckpoint.row_origin` says why), so its
    merge is whole too, over the budget."""
    readable = row_origin(tuned_ckpt, task.tuned) is not None
    if task.action == "merge":
        readable = readable and row_origin(base_ckpt, task.base) is not None
    if not readable:
        log.info("tensor %r is merged whole: a LoRA update is computed whole", task.name)
    return readable


def _chunk_io(task, transport, writer, reader, out, want_crc) -> dict:
    """The I/O a chunked task uses: the transport's output buffers, the writer, the threads."""
    return dict(
        output=transport.output,
        write=lambda offset, data: writer.write_range(task.name, offset, data),
        position=writer.position(task.name),
        reader=reader,
        writer=out,
        want_crc=want_crc,
    )


def _compute(
    task, base, tuned, params, backend, transport, writer
) -> tuple[torch.Tensor, TensorStats]:
    """Merge one task's tensors where they are (host or device); copies pass through.

    A merged result never shares memory with base or tuned (the caller releases them after
    this); a copy is tuned itself."""
    if task.action == "copy":
        return tuned, TensorStats(kept=0, name=task.name, numel=task.tuned.numel, action="copy")
    start = time.perf_counter()
    # A grown vocabulary merges the rows base has; the added rows come from tuned as they are.
    block = tuned if task.merge_rows is None else tuned[: task.merge_rows]
    try:
        out = transport.output(block.shape, base.dtype, writer.position(task.name))
        merged, stats = merge_tensor(
            base, block, task.name, axis=task.axis, backend=backend, params=params, out=out
        )
    except FusionError as exc:
        # Name the file too: the user has to find the bad tensor on disk.
        exc.args = (f"{task.tuned.file}: {exc}",)
        raise
    if task.merge_rows is not None:
        merged = torch.cat([merged, tuned[task.merge_rows :]])
    stats.seconds = time.perf_counter() - start
    return merged, stats


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
        "base_model": getattr(base_ckpt, "reference", str(base_ckpt.path)),
        "tuned_model": getattr(tuned_ckpt, "reference", str(tuned_ckpt.path)),
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
