"""Transports. The staged (GPU-style) one: chunked reads into staging buffers and chunked writes
give the same files as whole-tensor I/O, for tensors far larger than a staging buffer. The host
one: zero-copy loads and a ring of two reused output buffers. On a GPU (the ``cuda`` test): whole
merges through the staged transport on every visible device write the CPU merge's files."""

import pytest
import torch
from backends import needs_cuda
from checkpoints import tiny_pair

from fusion_kernels import merge_checkpoints, params_for
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.io.writer import CheckpointWriter
from fusion_kernels.plan.planner import build_plan
from fusion_kernels.streaming.host import HostTransport
from fusion_kernels.streaming.staged import StagedTransport


@pytest.mark.parametrize("staging_bytes", [1, 1000, 4099, 1 << 20])
def test_staged_merge_writes_the_same_files_as_whole_tensor_io(tmp_path, staging_bytes):
    base, tuned = tiny_pair(tmp_path / "in")
    params = params_for("neu-s-ties")
    merge_checkpoints(base, tuned, tmp_path / "whole", params, progress=False)
    merge_checkpoints(
        base,
        tuned,
        tmp_path / "staged",
        params,
        progress=False,
        staging_bytes=staging_bytes,
        verify=True,
    )
    for path in (tmp_path / "whole").glob("*.safetensors"):
        assert path.read_bytes() == (tmp_path / "staged" / path.name).read_bytes(), path.name


def test_staged_load_reassembles_a_tensor_larger_than_the_buffer(tmp_path):
    _, tuned = tiny_pair(tmp_path / "in")
    ckpt = Checkpoint(tuned)
    transport = StagedTransport(torch.device("cpu"), staging_bytes=777)
    info = ckpt.info("model.embed_tokens.weight")
    assert info.nbytes > 777 * 4
    loaded = transport.load(ckpt, info)
    transport.ready(loaded)
    assert torch.equal(loaded.view(torch.int16), ckpt.read(info.name).view(torch.int16))


def test_host_outputs_alternate_between_two_reused_buffers():
    transport = HostTransport(torch.device("cpu"))
    shape = torch.Size([96, 40])
    first = transport.output(shape, torch.bfloat16)
    second = transport.output(shape, torch.bfloat16)
    third = transport.output(torch.Size([50, 40]), torch.bfloat16)
    fourth = transport.output(torch.Size([48, 40]), torch.float32)
    assert first.shape == shape and first.dtype == torch.bfloat16
    assert first.data_ptr() != second.data_ptr()
    # The call before last's buffer comes back when it is big enough and not more than 2x.
    assert third.data_ptr() == first.data_ptr() and third.shape == (50, 40)
    assert fourth.dtype == torch.float32 and fourth.shape == (48, 40)
    assert fourth.data_ptr() == second.data_ptr()
    small = transport.output(torch.Size([3]), torch.bfloat16)
    assert small.data_ptr() != first.data_ptr(), "a buffer far too large is replaced"


def test_host_load_is_a_view_of_the_mapping_and_release_keeps_it_valid(tmp_path):
    _, tuned = tiny_pair(tmp_path / "in")
    ckpt = Checkpoint(tuned)
    transport = HostTransport(torch.device("cpu"))
    info = ckpt.info("model.embed_tokens.weight")
    loaded = transport.load(ckpt, info)
    copy = ckpt.read(info.name)
    transport.release(ckpt, info)
    assert torch.equal(loaded.view(torch.int16), copy.view(torch.int16))


def test_a_shard_is_synced_and_closed_once_its_last_tensor_is_written(tmp_path):
    base, tuned = tiny_pair(tmp_path / "in")
    plan = build_plan(Checkpoint(base), Checkpoint(tuned))
    assert len(plan.shards) > 1
    tuned_ckpt = Checkpoint(tuned)
    with CheckpointWriter(tmp_path / "out", plan) as writer:
        first, second = plan.shards[:2]
        for name in first.names:
            writer.write(name, tuned_ckpt.read(name))
        assert writer.shards[first.names[0]].closed
        assert not writer.shards[second.names[0]].closed
        writer.abort()


def test_staging_buffers_share_the_memory_budget():
    from fusion_kernels.io.directio import PAGE
    from fusion_kernels.streaming.staged import DEFAULT_STAGING_BYTES, staging_size

    assert staging_size(None) == DEFAULT_STAGING_BYTES
    assert staging_size(672 * 2**20) == 168 * 2**20  # four buffers: the whole budget
    assert staging_size(16 * 2**30) == DEFAULT_STAGING_BYTES
    assert staging_size(1) == PAGE


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", ["neu-s-ties", "della", "dare"])
@pytest.mark.parametrize("staging_bytes", [4099, None])
def test_staged_gpu_merge_writes_the_cpu_merge_files(tmp_path, method, staging_bytes):
    # On every visible GPU, so cuda:N is also tried while device 0 is current (when N > 0).
    base, tuned = tiny_pair(tmp_path / "in")
    params = params_for(method)
    merge_checkpoints(base, tuned, tmp_path / "cpu", params, progress=False, backend="torch")
    for device in [f"cuda:{i}" for i in range(torch.cuda.device_count())]:
        out = tmp_path / device.replace(":", "")
        merge_checkpoints(
            base, tuned, out, params, progress=False, device=device, verify=True,
            staging_bytes=staging_bytes,
        )  # fmt: skip
        for path in (tmp_path / "cpu").glob("*.safetensors"):
            assert path.read_bytes() == (out / path.name).read_bytes(), f"{device} {path.name}"


def test_host_load_reads_into_the_cache_and_ready_maps_it_in(tmp_path):
    _, tuned = tiny_pair(tmp_path / "in")
    ckpt = Checkpoint(tuned)
    transport = HostTransport(torch.device("cpu"), keep_bytes=1 << 20, outputs=3)
    info = ckpt.info("model.embed_tokens.weight")
    transport.prefetch(ckpt, info)
    loaded = transport.load(ckpt, info)
    transport.ready(loaded)
    assert torch.equal(loaded.view(torch.int16), ckpt.read(info.name).view(torch.int16))
    assert transport.read_ahead_bytes == 6 << 20


def test_host_outputs_rotate_through_a_ring_of_three():
    transport = HostTransport(torch.device("cpu"), outputs=3)
    shape = torch.Size([8, 8])
    pointers = [transport.output(shape, torch.bfloat16).data_ptr() for _ in range(4)]
    assert len(set(pointers[:3])) == 3 and pointers[3] == pointers[0]


def test_host_output_within_the_budget_share_is_kept_through_smaller_tensors():
    # Llama's MLP matrices are exactly the budget's share; attention matrices between them
    # must not make the ring drop and re-fault the large buffer.
    share = 1 << 20
    transport = HostTransport(torch.device("cpu"), keep_bytes=share, outputs=1)
    large = torch.Size([share // 2])  # bf16: share bytes, plus the page of alignment slack
    first = transport.output(large, torch.bfloat16)
    small = transport.output(torch.Size([1024]), torch.bfloat16)
    again = transport.output(large, torch.bfloat16)
    assert small.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    assert again.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()


def test_host_output_over_the_budget_share_is_not_kept_through_small_tensors():
    transport = HostTransport(torch.device("cpu"), keep_bytes=1 << 20, outputs=1)
    huge = transport.output(torch.Size([1 << 21]), torch.bfloat16)
    storage = huge.untyped_storage()
    small = transport.output(torch.Size([1024]), torch.bfloat16)
    assert small.untyped_storage().nbytes() < storage.nbytes() // 2
