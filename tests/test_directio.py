"""Direct (O_DIRECT) writes: whole pages from memory to disk, the rest through the page cache.

Whatever mix of the two a write takes (or a filesystem that refuses direct writes), the file
holds exactly the bytes written."""

import errno
import os

import numpy as np
import pytest
import torch
from checkpoints import tiny_pair

from fusion_kernels import merge_checkpoints, params_for
from fusion_kernels.io.directio import ENV_DIRECT_IO, PAGE, OffsetFile, page_offset
from fusion_kernels.streaming.host import HostTransport

SIZE = 7 * PAGE + 123


def _aligned_for(position: int, length: int) -> np.ndarray:
    """Random bytes lying at ``position``'s offset within a page, as the CPU path lays them."""
    backing = np.empty(length + 2 * PAGE, dtype=np.uint8)
    start = (page_offset(position) - backing.ctypes.data) % PAGE
    data = backing[start : start + length]
    data[:] = np.random.default_rng(length + position).integers(0, 256, length, dtype=np.uint8)
    return data


def _direct_supported(path) -> bool:
    probe = OffsetFile(path)
    supported = probe.direct_fd >= 0
    probe.close(sync=False)
    return supported


@pytest.mark.parametrize("position", [0, 1, 8, PAGE - 1, PAGE, PAGE + 4000, 3 * PAGE + 17])
@pytest.mark.parametrize("length", [0, 1, PAGE - 1, PAGE, 2 * PAGE + 1, SIZE])
def test_write_at_any_offset_and_length_lands_exactly(tmp_path, position, length):
    path = tmp_path / "out.bin"
    file = OffsetFile(path)
    file.truncate(position + length + 99)
    data = _aligned_for(position, length)
    file.write_at(data, position)
    file.close()
    raw = path.read_bytes()
    assert raw[position : position + length] == data.tobytes()
    assert raw[:position] == bytes(position) and raw[position + length :] == bytes(99)


def test_aligned_whole_pages_go_direct_and_misaligned_data_does_not(tmp_path):
    if not _direct_supported(tmp_path / "probe"):
        pytest.skip("this filesystem has no O_DIRECT")
    file = OffsetFile(tmp_path / "out.bin")
    file.truncate(4 * SIZE)
    file.write_at(_aligned_for(100, SIZE), 100)
    assert file.direct_bytes == (SIZE - (PAGE - 100)) // PAGE * PAGE
    before = file.direct_bytes
    misaligned = _aligned_for(101, SIZE)
    file.write_at(misaligned, 2 * SIZE)
    assert file.direct_bytes == before
    file.close()


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    file = OffsetFile(path)
    if file.direct_fd < 0:
        pytest.skip("this filesystem has no O_DIRECT")
    direct_fd, real_pwrite = file.direct_fd, os.pwrite

    def refuse_direct(fd, data, offset):
        if fd == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    file.truncate(SIZE)
    data = _aligned_for(0, SIZE)
    file.write_at(data, 0)
    assert file.direct_fd == -1 and file.direct_bytes == 0
    file.close()
    assert path.read_bytes() == data.tobytes()


def test_the_environment_variable_turns_direct_writes_off(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIRECT_IO, "0")
    file = OffsetFile(tmp_path / "out.bin")
    assert file.direct_fd == -1
    file.close(sync=False)


def test_host_outputs_start_at_the_files_offset_within_a_page():
    transport = HostTransport(torch.device("cpu"))
    for position in (0, 2, 4094, 4096 + 64, 12345 * 2):
        out = transport.output(torch.Size([33, 101]), torch.bfloat16, position)
        assert out.data_ptr() % PAGE == position % PAGE
    # A float32 tensor at an offset that is not a multiple of 4 cannot be placed to match.
    out = transport.output(torch.Size([9]), torch.float32, 6)
    assert out.data_ptr() % 4 == 0


@pytest.mark.parametrize("staging_bytes", [None, 2 * PAGE], ids=["host", "staged"])
def test_merges_with_and_without_direct_writes_are_byte_identical(
    tmp_path, monkeypatch, staging_bytes
):
    base, tuned = tiny_pair(tmp_path / "in", hidden=96, intermediate=200, vocab=301)
    params = params_for("neu-p-ties")
    direct_bytes = []
    real_close = OffsetFile.close

    def close_and_count(self, sync=True):
        direct_bytes.append(self.direct_bytes)
        real_close(self, sync)

    monkeypatch.setattr(OffsetFile, "close", close_and_count)
    merge_checkpoints(
        base,
        tuned,
        tmp_path / "direct",
        params,
        progress=False,
        verify=True,
        staging_bytes=staging_bytes,
    )
    if _direct_supported(tmp_path / "probe"):
        assert sum(direct_bytes) > 0, "the CPU path's results should go direct"
    monkeypatch.setenv(ENV_DIRECT_IO, "0")
    merge_checkpoints(base, tuned, tmp_path / "cached", params, progress=False)
    files = sorted((tmp_path / "direct").glob("*.safetensors"))
    assert len(files) == 2
    for path in files:
        assert path.read_bytes() == (tmp_path / "cached" / path.name).read_bytes(), path.name
