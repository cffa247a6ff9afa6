"""The merge loop: every task of a plan from the input shards through the op into the writer.

Three stages overlap: a reader thread loads the next tensor pairs while the current one is merged,
and a writer thread writes the previous results. On CPU (:mod:`.host`), the next pair is read
from disk straight into reused buffers and one result waits for the writer; where direct reads
are off, pairs are read ahead into the page cache only (up to the budget's worth) and mapped into
the process when their turn comes, and up to two results wait. Memory holds a few tensors
whatever the model size. A tensor too large for the memory budget streams in chunks of rows
(:mod:`.chunks`) through a reader thread of its own and the same writer. Such tensors go first:
after their first pass they are read again from the page cache, and while those passes compute,
the reader fetches the tensors after them from disk (last, nothing would be left to read
meanwhile). Each tensor is written at its own offset, so the order of the work is free.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import torch
from tqdm import tqdm

from ..errors import FusionError
from ..io.checkpoint import Checkpoint
from ..io.writer import CheckpointWriter
from ..ops import TensorStats, merge_tensor
from ..ops.registry import ChunkedOpFactory
from ..params import TensorParams
from ..plan.planner import MergePlan, TensorTask
from .chunks import Budget, merge_task_in_chunks
from .transport import Transport

log = logging.getLogger("fusion_kernels")


class MergeLoop:
    """Runs a plan's tasks: :meth:`run` returns their stats in output order.

    Args:
        plan: what to merge.
        base, tuned: the checkpoints it reads.
        writer: where results go.
        params: per-tensor parameters.
        backend: the backend asked for (None: auto).
        transport: how tensors move (:mod:`.transport`).
        checksums: filled with each tensor's crc32 when given (for ``--verify``).
        budget: with ``chunked``, tasks this budget cannot hold whole stream in chunks.
        chunked: the backend's chunked op (:data:`~fusion_kernels.ops.registry.ChunkedOpFactory`).
        progress: show a progress bar on stderr.
    """

    def __init__(
        self,
        plan: MergePlan,
        base: Checkpoint,
        tuned: Checkpoint,
        writer: CheckpointWriter,
        params: TensorParams,
        backend: str | None,
        transport: Transport,
        *,
        checksums: dict[str, int] | None = None,
        budget: Budget | None = None,
        chunked: ChunkedOpFactory | None = None,
        progress: bool = False,
    ):
        self.plan, self.base, self.tuned, self.writer = plan, base, tuned, writer
        self.params, self.backend, self.transport = params, backend, transport
        self.checksums, self.budget, self.chunked = checksums, budget, chunked
        self.progress = progress
        output_order = [plan.tasks[name] for shard in plan.shards for name in shard.names]
        self._output_index = {task.name: i for i, task in enumerate(output_order)}
        self.streamed = {task.name for task in output_order if self._streams(task)}
        self.order = [t for t in output_order if not self.whole(t)]
        self.order += [t for t in output_order if self.whole(t)]

    # Ordering policy --------------------------------------------------------------------------

    def whole(self, task: TensorTask) -> bool:
        """Whether the task is loaded and merged whole (else it streams in chunks)."""
        return task.name not in self.streamed

    def _streams(self, task: TensorTask) -> bool:
        """Whether the task streams in chunks: the budget cannot hold it whole and its inputs
        can be read in rows."""
        if self.budget is None or self.chunked is None:
            return False
        if self.budget.whole(task, self.params.for_tensor(task.name)):
            return False
        return self._rows_readable(task)

    def _rows_readable(self, task: TensorTask) -> bool:
        """Whether the task's inputs can be read in rows; a tensor a LoRA adapter updates is
        computed whole (:meth:`~fusion_kernels.io.lora.LoraCheckpoint.row_origin` says why),
        so its merge is whole too, over the budget."""
        readable = self.tuned.row_origin(task.tuned.name) is not None
        if task.action == "merge":
            readable = readable and self.base.row_origin(task.base.name) is not None
        if not readable:
            log.info("tensor %r is merged whole: a LoRA update is computed whole", task.name)
        return readable

    def _in_output_order(self, results: list[TensorStats]) -> list[TensorStats]:
        return sorted(results, key=lambda stats: self._output_index[stats.name])

    # The loop ---------------------------------------------------------------------------------

    def run(self) -> list[TensorStats]:
        """Every task, the stats in output order."""
        results: list[TensorStats] = []
        with (
            self._progress_bar() as bar,
            ThreadPoolExecutor(1, "fk-read") as reader,
            ThreadPoolExecutor(1, "fk-chunks") as chunk_reader,
            ThreadPoolExecutor(1, "fk-write") as out,
        ):
            ahead = ReadAhead(
                self.order, self.whole, lambda i: reader.submit(self._load, self.order[i]),
                self.transport.read_ahead_bytes,
            )  # fmt: skip
            # Stores not yet done, oldest first; each holds one of the transport's output buffers.
            in_flight: deque[Future] = deque()
            for position, task in enumerate(self.order):
                base, tuned = ahead.take(position)
                if self.whole(task):
                    ahead.fill(position)
                    results.append(self._merge(task, base, tuned, in_flight, out))
                else:
                    # Its chunks reuse the output buffers: the earlier stores must be done.
                    _drain(in_flight)
                    results.append(self._stream(task, chunk_reader, out))
                    ahead.fill(position)
                bar.update(task.tuned.nbytes)
                bar.set_postfix_str(f"tensors {position + 1}/{len(self.order)}", refresh=False)
            _drain(in_flight)
        return self._in_output_order(results)

    def _progress_bar(self) -> tqdm:
        return tqdm(
            total=self.plan.nbytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc="merging",
            disable=not self.progress,
            dynamic_ncols=True,
        )

    # One task ---------------------------------------------------------------------------------

    def _load(self, task: TensorTask) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A whole task's ``(base, tuned)`` (base None for a copy); nothing for a streamed one."""
        if not self.whole(task):
            return None, None
        # Both tensors' reads queued at once: the disk reads them in parallel.
        self.transport.prefetch(self.tuned, task.tuned)
        if task.action == "merge":
            self.transport.prefetch(self.base, task.base)
        tuned = self.transport.load(self.tuned, task.tuned)
        base = self.transport.load(self.base, task.base) if task.action == "merge" else None
        return base, tuned

    def _release(self, task: TensorTask) -> None:
        self.transport.release(self.tuned, task.tuned)
        if task.action == "merge":
            self.transport.release(self.base, task.base)

    def _merge(self, task, base, tuned, in_flight: deque[Future], out: Executor) -> TensorStats:
        """Merge (or pass through) a whole task and submit its store, once the ring of output
        buffers has room for its result."""
        for tensor in (base, tuned):
            if tensor is not None:
                self.transport.ready(tensor)
        tensor_params = self.params.for_tensor(task.name)
        merged, stats = self._compute(task, base, tuned, tensor_params)
        done = self.transport.computed()
        if task.action == "merge":
            self._release(task)
        # The next compute reuses the output of the oldest store still in flight when the
        # ring is full: wait for that store first.
        while len(in_flight) >= self.transport.outputs - 1:
            in_flight.popleft().result()
        in_flight.append(out.submit(self._store, task, merged, done))
        return stats

    def _store(self, task: TensorTask, merged: torch.Tensor, after) -> None:
        want_crc = self.checksums is not None
        crc = self.transport.store(self.writer, task.name, merged, want_crc, after)
        if self.checksums is not None:
            self.checksums[task.name] = crc
        # A copied tensor is written straight from its input view.
        if task.action == "copy":
            self._release(task)

    def _stream(self, task: TensorTask, chunk_reader: Executor, out: Executor) -> TensorStats:
        """Merge (or copy) a task over the budget chunk by chunk."""
        want_crc = self.checksums is not None
        io = dict(
            output=self.transport.output,
            write=lambda offset, data: self.writer.write_range(task.name, offset, data),
            position=self.writer.position(task.name),
            reader=chunk_reader,
            writer=out,
            want_crc=want_crc,
        )
        tensor_params = self.params.for_tensor(task.name)
        stats, crc = merge_task_in_chunks(
            task, self.base, self.tuned, tensor_params, self.budget, io, self.chunked
        )
        if self.checksums is not None:
            self.checksums[task.name] = crc
        return stats

    def _compute(self, task, base, tuned, params) -> tuple[torch.Tensor, TensorStats]:
        """Merge one task's tensors where they are (host or device); copies pass through.

        A merged result never shares memory with base or tuned (the caller releases them after
        this); a copy is tuned itself."""
        if task.action == "copy":
            stats = TensorStats(kept=0, name=task.name, numel=task.tuned.numel, action="copy")
            return tuned, stats
        start = time.perf_counter()
        # A grown vocabulary merges the rows base has; the added rows come from tuned as they are.
        block = tuned if task.merge_rows is None else tuned[: task.merge_rows]
        try:
            out = self.transport.output(block.shape, base.dtype, self.writer.position(task.name))
            merged, stats = merge_tensor(
                base, block, task.name, axis=task.axis, backend=self.backend, params=params,
                out=out,
            )  # fmt: skip
        except FusionError as exc:
            # Name the file too: the user has to find the bad tensor on disk.
            exc.args = (f"{task.tuned.file}: {exc}",)
            raise
        if task.merge_rows is not None:
            merged = torch.cat([merged, tuned[task.merge_rows :]])
        stats.seconds = time.perf_counter() - start
        return merged, stats


def _drain(in_flight: deque[Future]) -> None:
    """Wait for every store in flight, oldest first."""
    while in_flight:
        in_flight.popleft().result()


class ReadAhead:
    """The loads submitted ahead of the merge: always the next task's, and more while the
    whole tasks ahead total at most ``limit`` bytes (the transport's ``read_ahead_bytes``). A
    task that streams in chunks loads nothing ahead (its chunks are read when its turn comes)
    and counts for nothing, so the pairs after it are read while it runs."""

    def __init__(self, order, whole, submit, limit: int):
        """``submit(index)`` submits task ``index``'s load and returns its future."""
        self.order, self.whole, self.submit = order, whole, submit
        self.limit = limit
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
