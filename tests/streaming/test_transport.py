"""Both transports implement the whole transport interface: each moves a tensor from a
checkpoint to the merge and a result to the writer with the same bytes."""

import zlib

import pytest
import torch
from checkpoints import tiny_pair

from fusion_kernels.io.reader import SafetensorsCheckpoint
from fusion_kernels.streaming.choose import make_transport
from fusion_kernels.streaming.host import HostTransport
from fusion_kernels.streaming.staged import StagedTransport
from fusion_kernels.streaming.transport import Transport

CPU = torch.device("cpu")
TRANSPORTS = {
    "host-direct": lambda: HostTransport(CPU, keep_bytes=1 << 20, direct=True),
    "host-page-cache": lambda: HostTransport(CPU, keep_bytes=1 << 20, outputs=3),
    "staged": lambda: StagedTransport(CPU, staging_bytes=1000),
}


class Recorder:
    """A writer that keeps what it is given, at its offsets."""

    def __init__(self):
        self.data: dict[str, bytearray] = {}

    def position(self, name: str) -> int:
        return 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.data[name] = bytearray(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())

    def write_range(self, name: str, offset: int, data) -> None:
        target = self.data.setdefault(name, bytearray())
        target[len(target) :] = bytes(max(offset + len(data) - len(target), 0))
        target[offset : offset + len(data)] = bytes(data)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_every_transport_moves_tensors_in_and_results_out(tmp_path, kind):
    _, tuned = tiny_pair(tmp_path / "in")
    ckpt = SafetensorsCheckpoint(tuned)
    transport = TRANSPORTS[kind]()
    assert isinstance(transport, Transport) and not type(transport).__abstractmethods__
    assert transport.outputs >= 2 and transport.read_ahead_bytes >= 0
    assert transport.streams_chunks == (kind != "staged")
    writer = Recorder()
    for name in ckpt.names():
        info = ckpt.info(name)
        transport.prefetch(ckpt, info)
        tensor = transport.load(ckpt, info)
        transport.ready(tensor)
        want = ckpt.read(name)
        assert torch.equal(tensor, want), name
        out = transport.output(want.shape, want.dtype, writer.position(name))
        result = want if out is None else out.copy_(want)
        done = transport.computed()
        transport.release(ckpt, info)
        crc = transport.store(writer, name, result, want_crc=True, after=done)
        raw = want.reshape(-1).view(torch.uint8).numpy()
        assert bytes(writer.data[name]) == raw.tobytes() and crc == zlib.crc32(raw), name
        assert transport.store(Recorder(), name, result, want_crc=False) is None
    transport.close()
    ckpt.close()


def test_make_transport_picks_by_device_and_staging(monkeypatch):
    assert isinstance(make_transport(CPU, 4096, 6 << 20), StagedTransport)
    monkeypatch.setenv("FUSION_KERNELS_DIRECT_IO", "0")
    host = make_transport(CPU, None, 6 << 20)
    assert isinstance(host, HostTransport) and not host.direct and host.outputs == 3
    assert host.keep_bytes == 1 << 20
    assert host.read_ahead_bytes == 6 * host.keep_bytes
