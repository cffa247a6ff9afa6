"""Which CUDA device and stream each launch, stream, event and copy uses, checked without a GPU.

``--device cuda:N`` must work when N is not the current device: Triton launches on the current
device, and streams and events belong to the device current when they are made. Here a stand-in
for ``torch.cuda`` records the current device and stream at every call, so the placement rules
are tested on any machine; the ``cuda`` tests and ``bench/gpu_check.sh`` run the real thing.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from fusion_kernels.streaming import staged

DEVICE = torch.device("cuda", 1)


class FakeStream:
    def __init__(self, cuda, device, name):
        self.device, self.name, self.waited = device, name, []
        self.made_on = cuda.current

    def wait_event(self, event):
        self.waited.append(event)


class FakeEvent:
    def __init__(self, cuda, blocking=False):
        self.cuda, self.blocking, self.recorded_on = cuda, blocking, []
        cuda.events.append(self)

    def record(self, stream):
        self.recorded_on.append((stream, self.cuda.current))

    def synchronize(self):
        assert self.recorded_on, "synchronized on an event that was never recorded"


class FakeCuda:
    """Records the current device and stream; device 0 is current until a guard says otherwise."""

    def __init__(self):
        self.current, self.active, self.events = 0, None, []
        self.compute = {}
        self.allocations = []  # (device, current stream) of each CUDA allocation
        self.record_stream_calls = []

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = previous

    @contextlib.contextmanager
    def stream(self, stream):
        assert stream.device.index == self.current, "a stream used off its device"
        previous, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = previous

    def current_stream(self, device):
        index = torch.device(device).index
        return self.compute.setdefault(index, FakeStream(self, torch.device("cuda", index), "c"))

    def install(self, monkeypatch):
        fake = self
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        monkeypatch.setattr(torch.cuda, "current_stream", self.current_stream)
        monkeypatch.setattr(torch.cuda, "Event", lambda blocking=False: FakeEvent(fake, blocking))
        monkeypatch.setattr(
            torch.cuda, "Stream", lambda device=None: FakeStream(fake, torch.device(device), "s")
        )
        real_empty = torch.empty

        def empty(*shape, device=None, pin_memory=False, **kwargs):
            if device is not None and torch.device(device).type == "cuda":
                fake.allocations.append((torch.device(device), fake.active))
                device = "cpu"
            return real_empty(*shape, device=device, **kwargs)

        monkeypatch.setattr(torch, "empty", empty)
        monkeypatch.setattr(
            torch.Tensor,
            "record_stream",
            lambda tensor, stream: fake.record_stream_calls.append(stream),
            raising=False,
        )


@pytest.fixture
def cuda(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    return fake


def test_every_triton_launch_runs_on_the_tensors_device(cuda):
    triton_job = pytest.importorskip("fusion_kernels.ops.triton.job")
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append((cuda.current, grid, meta["enable_fp_fusion"]))

    job = object.__new__(triton_job._Job)
    job.state = types.SimpleNamespace(device=DEVICE)
    job.tuning = triton_job.CUDA_TUNING
    job.launch(Kernel(), (3, 2), 1, 2, BLOCK=4)
    assert seen == [(1, (3, 2), False)]
    assert cuda.current == 0  # the guard is undone afterwards


class FakeCheckpoint:
    def __init__(self, data: bytes):
        self.data = data

    def read_into(self, name, offset, array):
        array[:] = list(self.data[offset : offset + len(array)])


class FakeWriter:
    def __init__(self):
        self.chunks = {}

    def position(self, name):
        return 4096 * 3 + 100

    def write_range(self, name, offset, chunk):
        self.chunks[offset] = bytes(chunk)


def test_staged_transport_streams_and_events_live_on_the_merge_device(cuda):
    data = bytes(range(256)) * 3 + bytes(range(18))
    info = types.SimpleNamespace(
        name="w", nbytes=len(data), torch_dtype=torch.int16, shape=(len(data) // 2,)
    )
    transport = staged.StagedTransport(DEVICE, staging_bytes=100)
    streams = (transport.uploads.stream, transport.downloads.stream)
    assert all(s.device == DEVICE and s.made_on == 1 for s in streams)

    loaded = transport.load(FakeCheckpoint(data), info)
    assert bytes(loaded.view(torch.uint8).numpy()) == data
    # The upload target is allocated on the upload stream, on the merge device.
    assert cuda.allocations == [(DEVICE, transport.uploads.stream)]
    transport.ready(loaded)
    compute = cuda.compute[1]
    (uploaded,) = compute.waited
    assert uploaded.recorded_on == [(transport.uploads.stream, 1)]
    assert cuda.record_stream_calls == [compute]  # used on the compute stream: kept till done

    after = transport.computed()
    assert after.recorded_on[0][0] is compute
    writer = FakeWriter()
    transport.store(writer, "w", loaded, want_crc=False, after=after)
    assert transport.downloads.stream.waited == [after]
    assert b"".join(writer.chunks[k] for k in sorted(writer.chunks)) == data

    # Every event: blocking (the host sleeps on it), recorded once, on a device-1 stream while
    # device 1 was current (except the compute event, which is on device 1's compute stream).
    assert cuda.events and all(e.blocking for e in cuda.events)
    assert all(len(e.recorded_on) == 1 for e in cuda.events)
    assert all(e.recorded_on[0][0].device == DEVICE for e in cuda.events)
    copies = [e for e in cuda.events if e.recorded_on[0][0] is not compute]
    assert all(e.recorded_on[0][1] == 1 for e in copies)
