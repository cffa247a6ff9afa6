"""The memory budget, and tensors larger than it streamed through the op and the writer in chunks.

A merge holds at most ``--memory-budget`` bytes of tensor data at once: inputs and output
buffers. The budget counts six buffers in flight (the current pair and its output, the next
pair read ahead, the previous output being written; on CPU without direct reads the pair read
ahead sits in the page cache, not in the process, and a third output takes its place), so a
tensor whose six copies fit (plus the scratch its method needs) is merged whole, and a larger
one goes through the op in chunks of whole rows, each a sixth of the budget: every pass of the
kernel (``csrc/chunked.h``) reads the tensor chunk by chunk, the reader thread reading the next
chunk into the page cache while the op reads this one (mapped in when its turn comes, released
once used), and the write pass hands each merged chunk to the writer thread while it computes
the next. The bytes are those of a whole-tensor merge.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import torch

from ..errors import FusionError, NonFiniteDeltaError, ParameterError
from ..io.checkpoint import Checkpoint, TensorInfo
from ..ops import KernelStats, TensorStats
from ..ops.contract import matrix_shape, plan_tensor
from ..params import MergeParams
from ..plan.planner import TensorTask

#: Default ``--memory-budget``: exactly six buffers of Llama-3-8B's largest matrix (4096 x 14336
#: bf16, 112 MiB), so such a model merges every matrix whole; its embeddings and
#: anything larger stream in chunks.
DEFAULT_MEMORY_BUDGET = 672 * 2**20
#: Buffers the driver holds at once, each the size of one tensor (or chunk).
BUFFERS_IN_FLIGHT = 6
#: What a chunked merge's selection may hold per cut of the SPEC order it selects: the keys
#: inside the cut's bracket (the kernel's default ``collect_cap``, 2**22 keys of 8 bytes, and
#: never more than one key an entry). The chunks make room for it; a whole tensor's brackets
#: are a small share of its entries.
BRACKET_KEY_BYTES = 8 * 2**22
#: The fewest entries a chunk holds when six of them fit the budget. Every chunk costs each
#: pass a fixed price (the kernel's parallel region on every core, the read-ahead's system
#: calls): 1-row chunks of a 4 MiB embedding took 2 s where the whole tensor takes 5 ms. At
#: 2**18 entries (the size below which the whole-tensor kernel does not use threads) that price
#: is small beside the chunk's work. Under a budget too small for a selection's bracket keys,
#: the keys then come on top of the chunks, not out of them.
MIN_CHUNK_ENTRIES = 2**18


@dataclass(frozen=True)
class Budget:
    """How many bytes of tensor data a merge may hold at once, and what that implies."""

    nbytes: int = DEFAULT_MEMORY_BUDGET

    def __post_init__(self):
        if self.nbytes <= 0:
            raise ParameterError(f"--memory-budget must be positive, got {self.nbytes} bytes")

    def whole(self, task: TensorTask, params: MergeParams) -> bool:
        """Whether the task is merged (or copied) whole: its buffers fit the budget."""
        if task.tuned.nbytes == 0:
            return True
        return (
            BUFFERS_IN_FLIGHT * task.tuned.nbytes + _scratch(task, params) * _numel(task)
            <= self.nbytes
        )

    def chunk_rows(self, task: TensorTask, params: MergeParams, cuts: int = 0) -> int:
        """Rows per chunk: as many as the budget holds besides the bracket keys of ``cuts``
        cuts (:attr:`~fusion_kernels.ops.contract.TensorPlan.active_cuts`), but never fewer
        than :data:`MIN_CHUNK_ENTRIES` entries while six such chunks fit the budget, and at
        least one row."""
        rows, cols = matrix_shape(task.tuned.shape)
        width = task.tuned.nbytes // max(rows * cols, 1)
        per_row = max(cols * (BUFFERS_IN_FLIGHT * width + _scratch(task, params)), 1)
        keys = cuts * min(BRACKET_KEY_BYTES, 8 * rows * cols)
        floor = min(-(-MIN_CHUNK_ENTRIES // max(cols, 1)), self.nbytes // per_row)
        return max(1, (self.nbytes - keys) // per_row, floor)

    def chunking(self, task: TensorTask, params: MergeParams) -> tuple[int, int, int] | None:
        """For a task merged in chunks: ``(rows per chunk, chunks, passes at least)``; None
        for a task merged whole. The passes: the first and the write pass, a selection's
        (one when its sampled bracket holds, more when it falls back to a radix select) and,
        for restore=rescale, the pass that sums the kept change per neuron."""
        if self.whole(task, params):
            return None
        rows, _ = matrix_shape(task.tuned.shape)
        if task.action != "merge":
            step = self.chunk_rows(task, params)
            return step, -(-rows // step), 1
        shape = (
            task.tuned.shape
            if task.merge_rows is None
            else (task.merge_rows, *task.tuned.shape[1:])
        )
        plan = plan_tensor(params, shape, task.axis, task.name)
        step = self.chunk_rows(task, params, plan.active_cuts)
        passes = (
            2 + (plan.active_cuts > 0) + (plan.restored_neurons > 0 and params.restore == "rescale")
        )
        return step, -(-rows // step), passes


def _scratch(task: TensorTask, params: MergeParams) -> int:
    """Bytes per entry the kernel holds besides the six buffers: della's per-entry scale."""
    return 4 if task.action == "merge" and params.suppress == "della" else 0


def _numel(task: TensorTask) -> int:
    return math.prod(task.tuned.shape)


class RowSource:
    """Rows of one tensor of a checkpoint, mapped in chunk by chunk and released after use.

    The rows are read where :meth:`~fusion_kernels.io.checkpoint.Checkpoint.row_origin` says
    (a LoRA view's untouched or replaced tensors: the model's or the adapter's file) and cast
    to ``info``'s dtype, elementwise as the whole tensor's cast is.
    """

    def __init__(self, ckpt: Checkpoint, info: TensorInfo):
        origin = ckpt.row_origin(info.name)
        if origin is None:
            raise ValueError(f"tensor {info.name!r} of {ckpt.path} cannot be read in rows")
        self.ckpt, self.info = origin
        self.dtype = info.torch_dtype
        self.rows, self.cols = matrix_shape(info.shape)
        self.row_bytes = info.nbytes // max(self.rows, 1)  # as delivered (and written)
        self._source_row_bytes = self.info.nbytes // max(self.rows, 1)
        self.mapped = self.ckpt.mappable(self.info.name)
        view = self.ckpt.view(self.info.name, populate=False) if self.mapped else None
        self._view = None if view is None else view.reshape(self.rows, self.cols)

    def load(self, first: int, stop: int) -> torch.Tensor:
        """Rows ``[first, stop)``, read into the page cache now but mapped in only by
        :meth:`map` (or copied out when the tensor's bytes are not aligned to its dtype), so
        the chunk read ahead is not in this process's memory."""
        begin, end = first * self._source_row_bytes, stop * self._source_row_bytes
        if self.mapped:
            self.ckpt.warm(self.info.name, begin, end)
            rows = self._view[first:stop]
        else:
            raw = torch.empty(end - begin, dtype=torch.uint8)
            self.ckpt.read_into(self.info.name, begin, raw.numpy())
            rows = raw.view(self.info.torch_dtype).view(stop - first, self.cols)
        return rows if rows.dtype == self.dtype else rows.to(self.dtype)

    def map(self, first: int, stop: int) -> None:
        """Map loaded rows ``[first, stop)`` in (from the page cache), before the op reads them."""
        if self.mapped:
            step = self._source_row_bytes
            self.ckpt.populate(self.info.name, first * step, stop * step)

    def release(self, first: int, stop: int) -> None:
        if self.mapped:
            step = self._source_row_bytes
            self.ckpt.release(self.info.name, first * step, stop * step)


class ChunkedTask:
    """One task streamed in chunks: the reader and writer threads, the output buffers and the
    checksum of what was written.

    Args:
        task: the planned tensor.
        sources: ``(base, tuned)`` row sources (base None for a copy).
        rows_per_chunk: from :meth:`Budget.chunk_rows`.
        output: ``output(shape, dtype, position)`` gives a buffer to merge a chunk into
            (the transport's ring of two; a buffer is reused two chunks later).
        write: ``write(offset, uint8 array)`` writes bytes of the tensor at an offset.
        reader, writer: single-thread executors for loads and writes.
        want_crc: accumulate the crc32 of the bytes written, in order.
    """

    def __init__(self, task, sources, rows_per_chunk, output, write, position, reader, writer,
                 want_crc):  # fmt: skip
        self.task = task
        self.base, self.tuned = sources
        self.step = rows_per_chunk
        self.output: Callable = output
        self.write: Callable = write
        self.position = position
        self.reader: Executor = reader
        self.writer: Executor = writer
        self.crc: int | None = 0 if want_crc else None
        self.passes: list[str] = []  # the passes run over the chunks, in order

    def ranges(self, first: int, stop: int) -> list[tuple[int, int]]:
        return [(r, min(r + self.step, stop)) for r in range(first, stop, self.step)]

    def stream(self, ranges: list[tuple[int, int]], with_base: bool) -> Iterator[tuple]:
        """``(first, stop, base rows, tuned rows)`` per chunk, the next one loading meanwhile;
        each chunk's pages are released when the caller asks for the next."""

        def load(first: int, stop: int):
            base = self.base.load(first, stop) if with_base else None
            return base, self.tuned.load(first, stop)

        pending: Future | None = self.reader.submit(load, *ranges[0]) if ranges else None
        for index, (first, stop) in enumerate(ranges):
            base, tuned = pending.result()
            if index + 1 < len(ranges):
                pending = self.reader.submit(load, *ranges[index + 1])
            if with_base:
                self.base.map(first, stop)
            self.tuned.map(first, stop)
            yield first, stop, base, tuned
            if with_base:
                self.base.release(first, stop)
            self.tuned.release(first, stop)

    def store(self, first: int, data: torch.Tensor, previous: Future | None) -> Future:
        """Write ``data`` (whole rows from ``first``) on the writer thread, after ``previous``."""
        if previous is not None:
            previous.result()
        raw = data.reshape(-1).view(torch.uint8).numpy()
        offset = first * self.tuned.row_bytes
        if self.crc is not None:
            self.crc = zlib.crc32(raw, self.crc)
        return self.writer.submit(self.write, offset, raw)

    def copy_rows(self, first: int, stop: int) -> None:
        """Copy tuned's rows ``[first, stop)`` to the output as they are."""
        self.passes.append("copy")
        in_flight: Future | None = None
        for row, _, _, tuned in self.stream(self.ranges(first, stop), with_base=False):
            in_flight = self.store(row, tuned, in_flight)
            # The write reads the mapped pages: wait before they are released.
            in_flight.result()
        if in_flight is not None:
            in_flight.result()

    def merge(self, op, rows: int) -> None:
        """Run every pass of ``op`` (a :class:`~fusion_kernels.ops.cpp.ChunkedMergeCpp`) over
        rows ``[0, rows)``, writing the merged rows in the write pass."""
        dtype = self.base.dtype
        for name in op.passes():
            self.passes.append(name)
            write = name == "write"
            in_flight: Future | None = None
            for first, stop, base, tuned in self.stream(self.ranges(0, rows), with_base=True):
                out = None
                if write:
                    at = self.position + first * self.tuned.row_bytes
                    out = self.output((stop - first, self.tuned.cols), dtype, at)
                op.feed(base, tuned, out, first)
                if write:
                    in_flight = self.store(first, out, in_flight)
            if in_flight is not None:
                in_flight.result()


def merge_task_in_chunks(
    task: TensorTask,
    base_ckpt: Checkpoint,
    tuned_ckpt: Checkpoint,
    params: MergeParams,
    budget: Budget,
    io: dict,
    make_op: Callable,
) -> tuple[TensorStats, int | None]:
    """Merge (or copy) one task chunk by chunk; returns its stats and the crc32 of its bytes
    (None unless ``io["want_crc"]``).

    ``io`` holds ``output``, ``write``, ``position``, ``reader``, ``writer`` and ``want_crc``
    (see :class:`ChunkedTask`); ``make_op(plan, params, base_dtype, tuned_dtype, name)`` builds
    the chunked op from the tensor's :func:`~fusion_kernels.ops.contract.plan_tensor`.
    """
    start = time.perf_counter()
    tuned = RowSource(tuned_ckpt, task.tuned)
    base = RowSource(base_ckpt, task.base) if task.action == "merge" else None
    if task.action == "copy":
        step = budget.chunk_rows(task, params)
        chunked = ChunkedTask(task, (base, tuned), step, **io)
        chunked.copy_rows(0, tuned.rows)
        stats = ChunkedStats(kept=0, name=task.name, numel=task.tuned.numel, action="copy")
        return stats.streamed(step, tuned.rows, chunked.passes), chunked.crc
    rows = tuned.rows if task.merge_rows is None else task.merge_rows
    shape = task.tuned.shape
    if task.merge_rows is not None:
        shape = (task.merge_rows, *shape[1:])
    # The plan the whole-tensor merge would build: the chunks change how it is read, not what.
    plan = plan_tensor(params, shape, task.axis, task.name)
    step = budget.chunk_rows(task, params, plan.active_cuts)
    chunked = ChunkedTask(task, (base, tuned), step, **io)
    op = make_op(plan, params, task.base.torch_dtype, task.tuned.torch_dtype, task.name)
    action = "merge"
    try:
        chunked.merge(op, rows)
        kernel_stats = op.stats()
    except NonFiniteDeltaError as exc:
        if not params.allow_nonfinite:
            exc.args = (f"{task.tuned.file}: {exc}",)
            raise
        # The first pass found it, before anything was written.
        chunked.crc = None if chunked.crc is None else 0
        chunked.copy_rows(0, tuned.rows)
        kernel_stats, action = KernelStats(kept=0), "copy-nonfinite"
    except FusionError as exc:
        exc.args = (f"{task.tuned.file}: {exc}",)
        raise
    if action == "merge" and rows < tuned.rows:
        chunked.copy_rows(rows, tuned.rows)
    stats = ChunkedStats(
        **vars(kernel_stats),
        name=task.name,
        backend="cpp",
        axis=task.axis,
        numel=math.prod(shape),
        action=action,
        seconds=time.perf_counter() - start,
    )
    return stats.streamed(step, rows, chunked.passes), chunked.crc


@dataclass
class ChunkedStats(TensorStats):
    """A task's stats when it streamed in chunks, with how (the report's per-tensor entry)."""

    rows_per_chunk: int = 0
    chunks: int = 0
    passes: list[str] = field(default_factory=list)

    def streamed(self, step: int, rows: int, passes: list[str]) -> ChunkedStats:
        """These stats, with ``rows`` read ``step`` at a time in each of ``passes``."""
        self.rows_per_chunk, self.chunks, self.passes = step, -(-rows // step), passes
        return self


def describe_chunks(budget: Budget, tasks: list[TensorTask], params) -> list[str]:
    """``--dry-run``'s lines on the tasks that stream in chunks under ``budget`` (``params``:
    a :class:`~fusion_kernels.params.TensorParams`)."""
    lines = []
    for task in tasks:
        found = budget.chunking(task, params.for_tensor(task.name))
        if found is not None:
            step, chunks, passes = found
            lines.append(f"  {task.name}: {chunks} chunk(s) of {step} rows, read {passes}+ times")
    if lines:
        lines.insert(
            0,
            f"in chunks under --memory-budget {budget.nbytes / 2**20:g}MiB (cpp backend on CPU; "
            "torch and triton merge whole):",
        )
    return lines
