"""Direct reads: a tensor whose pages are not in the page cache is read with O_DIRECT into a
reused buffer. The bytes are the mapping's, a tensor already cached is read from the cache, a
shard that shrank is an error naming it, and a whole merge writes the same files either way."""

import os

import pytest
import torch
from checkpoints import tiny_pair

from fusion_kernels import merge_checkpoints, params_for
from fusion_kernels.errors import CheckpointError
from fusion_kernels.io.checkpoint import DIRECT_SLACK
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.streaming.buffers import InputBuffers
from fusion_kernels.streaming.choose import make_transport
from fusion_kernels.streaming.host import HostTransport

NAME = "model.embed_tokens.weight"
#: Embeddings of 512 KiB: a tensor of a page or two shares the page of the header, which
#: opening the checkpoint reads into the page cache, so it is read from there.
VOCAB = 8192


def evict(*directories) -> None:
    """Drop the files' pages from the page cache (written back first)."""
    os.sync()
    for directory in directories:
        for path in directory.iterdir():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def read_direct(ckpt: Checkpoint, name: str) -> torch.Tensor | None:
    return ckpt.read_direct(name, torch.empty(ckpt.direct_bytes(name), dtype=torch.uint8))


@pytest.fixture
def cold_tuned(tmp_path):
    _, tuned = tiny_pair(tmp_path / "in", vocab=VOCAB)
    evict(tuned)
    ckpt = Checkpoint(tuned)
    if read_direct(ckpt, NAME) is None:
        pytest.skip("this file system refuses direct reads (or keeps the pages cached)")
    evict(tuned)
    return tuned, ckpt


def test_a_direct_read_gives_the_bytes_of_the_mapping(cold_tuned):
    _, ckpt = cold_tuned
    for name in ckpt.names():
        evict(ckpt.directory)
        got = read_direct(ckpt, name)
        want = ckpt.read(name)
        if got is None:  # it shares a cached page (the header's) with others
            assert want.nbytes < 2 * 4096, name
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))


def test_a_tensor_in_the_page_cache_is_read_from_there(cold_tuned):
    tuned, ckpt = cold_tuned
    for path in tuned.iterdir():
        path.read_bytes()
    assert read_direct(ckpt, NAME) is None


def test_a_shard_that_shrank_is_an_error_naming_it(cold_tuned):
    _, ckpt = cold_tuned
    shard = ckpt.info(NAME).file
    os.truncate(shard, os.path.getsize(shard) // 2)
    with pytest.raises(CheckpointError, match=str(shard)):
        read_direct(ckpt, NAME)


def test_host_transport_reuses_its_input_buffers(cold_tuned):
    _, ckpt = cold_tuned
    transport = HostTransport(torch.device("cpu"), keep_bytes=1 << 20, direct=True)
    info = ckpt.info(NAME)
    transport.prefetch(ckpt, info)
    first = transport.load(ckpt, info)
    assert torch.equal(first.view(torch.int16), ckpt.read(NAME).view(torch.int16))
    pointer = first.untyped_storage().data_ptr()
    transport.release(ckpt, info)
    evict(ckpt.directory)
    again = transport.load(ckpt, info)
    assert again.untyped_storage().data_ptr() == pointer
    transport.close()


def test_direct_reads_are_off_with_the_environment(monkeypatch):
    monkeypatch.setenv("FUSION_KERNELS_DIRECT_IO", "0")
    host = make_transport(torch.device("cpu"), None, 672 * 2**20)
    assert not host.direct and host.outputs == 3 and host.read_ahead_bytes > 0
    host.close()


def test_input_buffers_hold_two_pairs_at_most():
    pool = InputBuffers(keep_bytes=1000)
    sizes = [100, 900, 900, 50, 900, 900, 10, 10, 600]
    held = []
    for step, size in enumerate(sizes):
        buffer = pool.take(size)
        assert buffer.numel() >= size
        pool.hold((0, str(step)), buffer)
        held.append(str(step))
        if len(held) > 2:  # the pair before last is released once the next pair is loaded
            pool.release((0, held.pop(0)))
        assert len(pool._free) + len(pool._held) <= InputBuffers.IN_FLIGHT


def test_a_cold_merge_reads_direct_and_writes_the_same_files(tmp_path, monkeypatch):
    base, tuned = tiny_pair(tmp_path / "in", vocab=VOCAB)
    params = params_for("neu-s-ties")
    monkeypatch.setenv("FUSION_KERNELS_DIRECT_IO", "0")
    merge_checkpoints(base, tuned, tmp_path / "cached", params, progress=False)
    monkeypatch.delenv("FUSION_KERNELS_DIRECT_IO")
    direct = []
    original = Checkpoint.read_direct

    def counted(self, name, buffer):
        tensor = original(self, name, buffer)
        direct.append(tensor is not None)
        return tensor

    monkeypatch.setattr(Checkpoint, "read_direct", counted)
    evict(base, tuned)
    merge_checkpoints(base, tuned, tmp_path / "direct", params, progress=False, verify=True)
    if not any(direct):
        pytest.skip("this file system refuses direct reads")
    for path in (tmp_path / "cached").glob("*.safetensors"):
        assert path.read_bytes() == (tmp_path / "direct" / path.name).read_bytes(), path.name


def test_an_input_buffer_of_the_budget_share_serves_a_smaller_tensor_next():
    # A tensor of exactly the share whose bytes straddle one more page than they fill needs
    # the most slack direct_bytes adds; its buffer is still within the share.
    share, page = 1 << 20, 4096
    pool = InputBuffers(keep_bytes=share)
    large = pool.take(share + DIRECT_SLACK - 2)
    pool.hold((0, "large"), large)
    pool.release((0, "large"))
    assert pool.take(page).data_ptr() == large.data_ptr()
