"""Stage trace of one CLI merge: where the driver's three threads spend the wall time.

Wraps the pipeline's stages (reading a tensor or chunk in, the kernel, writing out, the shard
syncs, the main thread's waits for the reader and the writer) with timers, runs the merge in this
process with the CLI's arguments, and prints each stage's total and how much of the kernel's time
the reader and the writer overlapped. Run:

    python bench/trace_pipeline.py --base B --tuned T --out O --method ties --density 0.2 \
        --backend cpp --overwrite --quiet
"""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

from fusion_kernels import merge
from fusion_kernels.io import directio, writer
from fusion_kernels.ops import cpp
from fusion_kernels.streaming import chunks, host, loop

EVENTS: list[tuple[str, float, float]] = []
_lock = threading.Lock()


def _timed(stage: str, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            with _lock:
                EVENTS.append((stage, start, time.perf_counter()))

    return wrapper


def _install() -> None:
    """Time every stage; a wait is the main thread blocked on the reader or the writer."""
    host.HostTransport.load = _timed("read", host.HostTransport.load)
    host.HostTransport.ready = _timed("map in", host.HostTransport.ready)
    host.HostTransport.release = _timed("release", host.HostTransport.release)
    host.HostTransport.output = _timed("output buffer", host.HostTransport.output)
    host.HostTransport.store = _timed("write", host.HostTransport.store)
    chunks.RowSource.load = _timed("read chunk", chunks.RowSource.load)
    chunks.RowSource.release = _timed("release", chunks.RowSource.release)
    loop.MergeLoop._compute = _timed("kernel", loop.MergeLoop._compute)
    cpp.ChunkedMergeCpp.feed = _timed("kernel chunk", cpp.ChunkedMergeCpp.feed)
    writer.CheckpointWriter.write_range = _timed("write chunk", writer.CheckpointWriter.write_range)
    directio.OffsetFile.close = _timed("fsync", directio.OffsetFile.close)
    submit, result = ThreadPoolExecutor.submit, Future.result

    def tagged_submit(self, *args, **kwargs):
        future = submit(self, *args, **kwargs)
        future.stage = self._thread_name_prefix
        return future

    def timed_result(self, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return result(self, *args, **kwargs)
        return _timed(f"main waits {getattr(self, 'stage', '?')}", result)(self, *args, **kwargs)

    ThreadPoolExecutor.submit = tagged_submit
    Future.result = timed_result


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, stop in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    total = 0.0
    for start, stop in a:
        for s, e in b:
            total += max(0.0, min(stop, e) - max(start, s))
    return total


def summary(wall: float) -> str:
    by_stage: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for stage, start, stop in EVENTS:
        by_stage[stage].append((start, stop))
    lines = [f"wall {wall:.2f} s"]
    for stage, spans in sorted(by_stage.items()):
        busy = sum(b - a for a, b in _union(spans))
        lines.append(f"  {stage:22s} {busy:7.2f} s  ({len(spans)} calls)")
    reading = _union(by_stage["read"] + by_stage["read chunk"])
    kernel = _union(by_stage["kernel"] + by_stage["kernel chunk"])
    writing = _union(by_stage["write"] + by_stage["write chunk"] + by_stage["fsync"])
    lines.append(f"  kernel overlapped by reading {_overlap(kernel, reading):.2f} s, "
                 f"by writing {_overlap(kernel, writing):.2f} s; "
                 f"reading overlapped by writing {_overlap(reading, writing):.2f} s")  # fmt: skip
    idle = wall - sum(b - a for a, b in _union(reading + writing))
    lines.append(f"  neither reading nor writing: {idle:.2f} s")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    _install()
    start = time.perf_counter()
    status = merge.main(argv)
    print(summary(time.perf_counter() - start), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
