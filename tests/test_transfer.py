"""The staged (GPU-style) transport: chunked reads into staging buffers and chunked writes give
the same files as whole-tensor I/O, for tensors far larger than a staging buffer."""

import pytest
import torch
from checkpoints import tiny_pair

from fusion_kernels import merge_checkpoints, params_for
from fusion_kernels.reader import Checkpoint
from fusion_kernels.transfer import StagedTransport


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
