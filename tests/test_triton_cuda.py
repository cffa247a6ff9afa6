"""The ``triton`` backend on a real GPU (skipped without CUDA, or under TRITON_INTERPRET=1).

Beyond test_triton_backend's reference checks: the GPU's bytes against the ``cpp`` backend's, della
rows longer than 16384 and 1-D tensors past the old 65535-block grid limit, exact index ties at a
window cut, and whole merges through the staged transport against CPU merges. ``bench/gpu_check.sh``
runs these.
"""

from __future__ import annotations

import functools

import pytest
import torch
from checkpoints import tiny_pair
from conftest import (
    METHOD_CASES,
    assert_tensors_equal,
    assert_within_ulp,
    case_id,
    make_pair,
    poisoned_like,
)

from fusion_kernels import merge_checkpoints, params_for
from fusion_kernels.ops import select_backend
from fusion_kernels.ops import triton as triton_backend

NAME = "model.layers.0.mlp.down_proj.weight"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(triton_backend.interpreting(), reason="unset TRITON_INTERPRET on a GPU"),
]


def float64_scaled(params) -> bool:
    return params.rescale_mode == "l1" or params.restore == "rescale"


def against_cpp(base, tuned, axis, case, what=""):
    """Triton on the GPU and cpp on the CPU: same counts, same bytes (within one ulp where a
    scale is a ratio of float64 sums, whose summation order differs between the two)."""
    params = params_for(**case)
    cpp = select_backend("cpp", "cpu").kernel()
    gpu = select_backend("triton", "cuda").kernel()
    expected, actual = poisoned_like(base), poisoned_like(base).cuda()
    want = cpp(base, tuned, expected, NAME, axis, params)
    got = gpu(base.cuda(), tuned.cuda(), actual, NAME, axis, params)
    what = f"{what} {case_id(case)} axis={axis}"
    assert (got.kept, got.restored, got.fallbacks) == (want.kept, want.restored, want.fallbacks)
    if float64_scaled(params):
        assert_within_ulp(actual.cpu(), expected, 1, what)
    else:
        assert_tensors_equal(actual.cpu(), expected, what)


@functools.cache
def pair(shape, dtype=torch.bfloat16, tied=True):
    # Generated once per shape (drawing 58M entries on the CPU takes seconds); never modified.
    return make_pair(shape, dtype, seed=3, tied=tied)


@pytest.mark.parametrize("axis", ["row", "col", "none"])
@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_bytes_equal_cpp_at_llama_shapes(case, axis):
    pytest.importorskip("fusion_kernels._cpp")
    against_cpp(*pair((4096, 14336)), axis, case, "4096x14336")


DELLA = [c for c in METHOD_CASES if c["suppress"] == "della"]


@pytest.mark.parametrize(
    "shape", [(64, 53248), (3, 200_000), (5_000_000,)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("case", DELLA, ids=case_id)
def test_della_long_rows_equal_cpp(case, shape):
    # Rows longer than 16384 (the old one-block sort's limit), and a 1-D tensor whose old
    # counting grid had more than 65535 blocks in y.
    pytest.importorskip("fusion_kernels._cpp")
    against_cpp(*pair(shape), "none", case, "x".join(map(str, shape)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_equal_cpp(dtype):
    pytest.importorskip("fusion_kernels._cpp")
    base, tuned = pair((1024, 4096), dtype, tied=False)
    for case in METHOD_CASES:
        against_cpp(base, tuned, "row", case, str(dtype))


def test_index_tie_break_on_the_gpu():
    from fusion_kernels.ops import triton_kernels as kernels
    from fusion_kernels.ops import triton_select as selection

    base, tuned = (t.cuda() for t in make_pair((31, 17), torch.float16, seed=2, tied=True))
    job = triton_backend._prepare(base, tuned, torch.empty_like(base), NAME, params_for("ties"))
    bits = (tuned.float() - base.float()).abs().view(torch.int32).reshape(-1).cpu()
    value = int(bits.mode().values)
    members = (bits == value).nonzero().reshape(-1)
    block, n = job.tuning.flat_block, job.n
    blocks = -(-n // block)
    for rank in range(members.numel()):
        state = torch.tensor([kernels.cut_state(1, n)] * 2)
        state[:, 0], state[:, 1], state[:, 2] = value, 32, rank
        state = state.cuda()
        counts = torch.empty(2, blocks, dtype=torch.int64, device="cuda")
        args = (job.base, job.tuned, n, job.seed, state)
        job.launch(selection._index_count_kernel, (blocks, 2), *args, counts, **job.kinds,
                   BLOCK=block)  # fmt: skip
        job.launch(selection._index_pick_kernel, (2,), *args, counts, blocks, **job.kinds,
                   BLOCK=block, SCAN=4)  # fmt: skip
        assert state[:, 7].tolist() == [int(members[rank])] * 2


@pytest.mark.parametrize("method", ["neu-s-ties", "della", "dare"])
@pytest.mark.parametrize("staging_bytes", [4099, None])
def test_staged_gpu_merge_writes_the_cpu_merge_files(tmp_path, method, staging_bytes):
    base, tuned = tiny_pair(tmp_path / "in")
    params = params_for(method)
    merge_checkpoints(base, tuned, tmp_path / "cpu", params, progress=False, backend="torch")
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for device in devices:
        out = tmp_path / device.replace(":", "")
        merge_checkpoints(
            base, tuned, out, params, progress=False, device=device, verify=True,
            staging_bytes=staging_bytes,
        )  # fmt: skip
        for path in (tmp_path / "cpu").glob("*.safetensors"):
            assert path.read_bytes() == (out / path.name).read_bytes(), f"{device} {path.name}"
