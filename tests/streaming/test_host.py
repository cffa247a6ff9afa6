"""The host transport's memory: what it maps in place and what it keeps in buffers stays within
the budget's count of input buffers together, whether the inputs are in the page cache or not."""

from collections import defaultdict

import torch
from checkpoints import write_single

from fusion_kernels.io.checkpoint import DIRECT_SLACK
from fusion_kernels.io.reader import SafetensorsCheckpoint
from fusion_kernels.streaming.buffers import InputBuffers
from fusion_kernels.streaming.host import HostTransport

#: Each input tensor: 64 KiB, the budget's share.
SHARE = 64 * 2**10


class PartlyCached(SafetensorsCheckpoint):
    """A checkpoint whose ``cold`` tensors read direct (as from disk) and the rest are in the
    page cache (a direct read declines them), counting the bytes mapped into this process."""

    def __init__(self, path, cold):
        super().__init__(path)
        self.cold = set(cold)
        self.mapped: dict[str, int] = defaultdict(int)

    def read_direct(self, name, buffer):
        if name not in self.cold:
            return None
        info = self.info(name)
        raw = buffer[: info.nbytes]
        self.read_into(name, 0, raw.numpy())
        return raw.view(info.torch_dtype).view(info.shape)

    def populate(self, name, begin=0, end=None):
        end = self.info(name).nbytes if end is None else end
        self.mapped[name] += end - begin
        super().populate(name, begin, end)

    def release(self, name, begin=0, end=None):
        end = self.info(name).nbytes if end is None else end
        self.mapped[name] = max(self.mapped[name] - (end - begin), 0)
        super().release(name, begin, end)


def held(transport: HostTransport, ckpt: PartlyCached) -> int:
    """Input bytes in this process: buffers kept (free or holding a tensor) and mapped pages."""
    return transport._inputs.nbytes + sum(ckpt.mapped.values())


def test_cached_inputs_mapped_in_place_stay_within_the_input_buffers_count(tmp_path):
    names = [f"t{i}" for i in range(12)]
    tensors = {n: torch.full((SHARE // 4,), float(i)) for i, n in enumerate(names)}
    path = write_single(tmp_path / "m", tensors)
    # The first pairs come from disk, the later ones from the page cache.
    ckpt = PartlyCached(path, cold=names[:4])
    transport = HostTransport(torch.device("cpu"), keep_bytes=SHARE, direct=True)
    pairs = [names[i : i + 2] for i in range(0, len(names), 2)]
    peak = 0

    def load(pair):
        for name in pair:
            transport.prefetch(ckpt, ckpt.info(name))
        return [transport.load(ckpt, ckpt.info(name)) for name in pair]

    # As the driver runs: the next pair loads while the current one is merged, then released.
    current = load(pairs[0])
    for index, pair in enumerate(pairs):
        following = load(pairs[index + 1]) if index + 1 < len(pairs) else []
        for name, tensor in zip(pair, current, strict=True):
            transport.ready(tensor)
            assert torch.equal(tensor, tensors[name])
        peak = max(peak, held(transport, ckpt))
        for name in pair:
            transport.release(ckpt, ckpt.info(name))
        current = following
    transport.close()
    # Two pairs in flight, each tensor a buffer or a mapping of at most the share (and slack).
    assert peak <= InputBuffers.IN_FLIGHT * (SHARE + DIRECT_SLACK)
    assert sum(ckpt.mapped.values()) == 0


def test_a_tensor_mapped_in_place_takes_a_free_buffers_place():
    buffers = InputBuffers(keep_bytes=SHARE)
    taken = [buffers.take(SHARE) for _ in range(InputBuffers.IN_FLIGHT)]
    for buffer in taken:
        buffers.give(buffer)
    assert buffers.nbytes == InputBuffers.IN_FLIGHT * SHARE
    buffers.hold((1, "a"), None)
    buffers.hold((1, "b"), None)
    assert buffers.nbytes == (InputBuffers.IN_FLIGHT - 2) * SHARE
    # Its release is the caller's to do (False), and gives the place back.
    assert buffers.release((1, "a")) is False
    buffers.hold((1, "c"), buffers.take(SHARE))
    assert buffers.nbytes == (InputBuffers.IN_FLIGHT - 2) * SHARE
    assert buffers.release((1, "c")) is True
    assert buffers.release((1, "b")) is False and buffers.release((1, "b")) is False
