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

import ctypes
import math
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass

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
#: inside the cut's bracket (the kernel's default ``collect_cap``, 2**22 keys of 8 bytes).
#: The chunks make room for it; a whole tensor's brackets are a small share of its entries.
BRACKET_KEY_BYTES = 8 * 2**22


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
        cuts (:attr:`~fusion_kernels.ops.contract.TensorPlan.active_cuts`), at least one."""
        rows, cols = matrix_shape(task.tuned.shape)
        width = task.tuned.nbytes // max(rows * cols, 1)
        per_row = cols * (BUFFERS_IN_FLIGHT * width + _scratch(task, params))
        room = self.nbytes - cuts * BRACKET_KEY_BYTES
        return max(1, room // max(per_row, 1))


#: glibc's ``mallopt`` parameters (malloc.h).
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def return_freed_memory_promptly() -> None:
    """Make this process's C allocator (glibc) give freed blocks of 1 MiB or more back at
    once, and serve all threads from two heaps at most.

    By default glibc raises its threshold for separate mappings as large blocks come and go
    and keeps freed memory in a heap per thread: tens of MB held past the budget. Process-wide,
    so for processes this package owns (the command line), not a library's caller.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 2**20)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        return  # not glibc: its own policy stands


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
        chunked = ChunkedTask(task, (base, tuned), budget.chunk_rows(task, params), **io)
        chunked.copy_rows(0, tuned.rows)
        stats = TensorStats(kept=0, name=task.name, numel=task.tuned.numel, action="copy")
        return stats, chunked.crc
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
    stats = TensorStats(
        **vars(kernel_stats),
        name=task.name,
        backend="cpp",
        axis=task.axis,
        numel=math.prod(shape),
        action=action,
        seconds=time.perf_counter() - start,
    )
    return stats, chunked.crc
