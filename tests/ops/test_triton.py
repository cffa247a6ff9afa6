"""What only the ``triton`` backend has, against the torch reference: its selection passes on
larger tensors, the candidate buffer against full refinement, the index tie-break of the window
cuts, approx selection, della's ranks sorted in global memory (exact key ties included), and
every dtype at Llama sizes on a GPU. The method matrix every backend runs is in
test_conformance.py, through the same comparison.

Without a GPU these run the real kernels through Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``): its block sizes are small (``INTERPRETER_TUNING``), so the tensors
below still span many blocks, tails and loop splits.

On a GPU (the ``cuda`` tests, which ``bench/gpu_check.sh`` runs) the output is also compared with
the ``cpp`` backend's bytes: at Llama-3-8B shapes, in every dtype, and for della rows longer than
16384 and 1-D tensors past 65535 blocks of the old counting grid.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import pytest
import torch
from backends import needs_cpp, needs_cuda, needs_interpreter
from conftest import (
    DTYPES,
    METHOD_CASES,
    assert_matches_reference,
    assert_same_merge,
    case_id,
    make_pair,
    poisoned_like,
)

from fusion_kernels.ops.contract import magnitude_window, plan_tensor
from fusion_kernels.ops.reference import merge_reference
from fusion_kernels.params import params_for

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fusion_kernels.ops.triton import codes, launcher, select_launch
from fusion_kernels.ops.triton import job as triton_job
from fusion_kernels.ops.triton import select as selection

NAME = "model.layers.0.mlp.down_proj.weight"

interpreted, cuda = needs_interpreter, needs_cuda


def check(base, tuned, axis, case, what=""):
    return assert_matches_reference("triton", base, tuned, NAME, axis, params_for(**case), what)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_untied_data_and_larger_tensor(dtype):
    # 3072 entries: the selection passes span 12 blocks; the della rows are sorted in global memory.
    base, tuned = make_pair((64, 48), dtype, seed=5)
    for case in (METHOD_CASES[6], METHOD_CASES[10], METHOD_CASES[15]):
        check(base, tuned, "col", case, case_id(case))


@interpreted
@pytest.mark.parametrize(("candidates_min", "candidates_div"), [(1 << 30, 1), (0, 1 << 30)])
def test_candidate_buffer_and_full_refinement(monkeypatch, candidates_min, candidates_div):
    # The deeper digits read either the copied keys of the cut's group or base/tuned again
    # (when the group outgrows the buffer); both must select the same entries.
    tuning = dataclasses.replace(
        triton_job.INTERPRETER_TUNING,
        candidates_min=candidates_min,
        candidates_div=candidates_div,
    )
    monkeypatch.setattr(triton_job, "INTERPRETER_TUNING", tuning)
    base, tuned = make_pair((64, 48), torch.bfloat16, seed=3, tied=True)
    for case in (METHOD_CASES[2], METHOD_CASES[9]):
        check(base, tuned, "row", case, case_id(case))


def _approx_merge(base, tuned, case):
    """``(expected, actual, stats, k)``: the exact reference and triton's approx selection."""
    params = params_for(**case, select="approx")
    expected = torch.full_like(base, float("nan"))
    actual = torch.full_like(base, float("nan"))
    merge_reference(base, tuned, expected, NAME, "none", params)
    stats = launcher.merge_triton(base, tuned, actual, NAME, "none", params)
    return expected, actual, stats, magnitude_window(params, base.numel())[1]


@interpreted
@pytest.mark.parametrize("case", [METHOD_CASES[2], METHOD_CASES[8]], ids=case_id)
def test_approx_selection_within_tolerance(case):
    base, tuned = make_pair((64, 48), torch.bfloat16, seed=11, tied=True)
    n = base.numel()
    expected, actual, stats, k = _approx_merge(base, tuned, case)
    assert abs(stats.kept - k) <= 0.001 * n
    # Only entries at the two cuts can differ from the exact window.
    assert not bool(torch.isnan(actual).any())
    differ = int((actual.view(torch.int16) != expected.view(torch.int16)).sum())
    assert differ <= 2 * (0.001 * n) + 1


@pytest.mark.parametrize(
    "device",
    [pytest.param("cpu", marks=interpreted), pytest.param("cuda", marks=[cuda, pytest.mark.cuda])],
)
def test_index_tie_break(device):
    # Exact key ties need more than 2^32 entries (the TIE hash is a bijection below that), so
    # drive the index stage directly: cut a magnitude-only group (SHIFT = 32) at every rank.
    base, tuned = (t.to(device) for t in make_pair((31, 17), torch.float16, seed=2, tied=True))
    params = params_for(suppress="magnitude")
    plan = plan_tensor(params, base.shape, "none", NAME)
    job = triton_job._prepare(base, tuned, torch.full_like(base, float("nan")), plan, params)
    bits = (tuned.float() - base.float()).abs().view(torch.int32).reshape(-1).cpu()
    value = int(bits.mode().values)
    members = (bits == value).nonzero().reshape(-1)
    assert members.numel() > 3
    block, n = job.tuning.flat_block, job.n
    blocks = -(-n // block)
    for rank in range(members.numel()):
        state = torch.tensor([codes.cut_state(1, n)] * 2)
        state[:, 0], state[:, 1], state[:, 2] = value, 32, rank
        state = state.to(device)
        counts = torch.empty(2, blocks, dtype=torch.int64, device=device)
        args = (job.base, job.tuned, n, job.seed, state)
        job.launch(selection._index_count_kernel, (blocks, 2), *args, counts, **job.kinds,
                   BLOCK=block)  # fmt: skip
        job.launch(selection._index_pick_kernel, (2,), *args, counts, blocks, **job.kinds,
                   BLOCK=block, SCAN=4)  # fmt: skip
        assert state[:, 7].tolist() == [int(members[rank])] * 2
        assert state[:, 4].tolist() == [1, 1]


# ----------------------------------------------------------------------------- della ranks
# Each row's keys are sorted in global memory, a chunk of rows at a time.


@pytest.fixture
def small_blocks(monkeypatch):
    """8-position scatter blocks (rows of 23 end in a partial one) and 40-entry sort chunks."""
    tuning = dataclasses.replace(triton_job.INTERPRETER_TUNING, rank_block=8, rank_chunk=40)
    monkeypatch.setattr(triton_job, "INTERPRETER_TUNING", tuning)
    return tuning


DELLA = [c for c in METHOD_CASES if c["suppress"] == "della"]


@interpreted
@pytest.mark.parametrize("case", DELLA, ids=case_id)
@pytest.mark.parametrize("shape", [(5, 23), (3, 40), (61,), (2, 3, 17), (9, 1)], ids=str)
def test_della_rows_across_scatter_blocks_and_sort_chunks(small_blocks, case, shape):
    # (5, 23): 3 scatter blocks a row, 1 row a chunk; (3, 40): one row fills a chunk; (61,): one
    # row longer than a chunk; (2, 3, 17): leading dimensions flattened into 6 rows; (9, 1): L = 1.
    axis = "row" if case.get("restore") and len(shape) == 2 else "none"
    base, tuned = make_pair(shape, torch.bfloat16, seed=9, tied=True)
    check(base, tuned, axis, case, f"{case_id(case)} {shape}")


@interpreted
def test_della_exact_key_ties_rank_by_column(small_blocks, monkeypatch):
    rows, cols = 4, 21
    gen = torch.Generator().manual_seed(1)
    # Few distinct keys, so each row holds many exact ties (real keys tie only past 2^32 entries).
    keys = torch.randint(0, 4, (rows, cols), generator=gen, dtype=torch.int64) << 40

    class PlantedKeys:
        def __getitem__(self, grid):
            def launch(base, tuned, chunk, start, count, *args, **meta):
                chunk.copy_(~keys.reshape(-1)[start : start + count])

            return launch

    monkeypatch.setattr(selection, "_della_keys_kernel", PlantedKeys())
    base, tuned = make_pair((rows, cols), torch.float32, seed=2)
    params = params_for("della")
    plan = plan_tensor(params, base.shape, "none", NAME)
    job = triton_job._prepare(base, tuned, poisoned_like(base), plan, params)
    select_launch._della_ranks(job, kept_sum=False)
    for r in range(rows):
        # SPEC order: key descending, then column ascending; r counts from the last.
        order = sorted(range(cols), key=lambda c: (-int(keys[r, c]), c))
        want = torch.empty(cols, dtype=torch.int32)
        want[order] = torch.arange(cols - 1, -1, -1, dtype=torch.int32)
        assert torch.equal(job.rank[r * cols : (r + 1) * cols], want), f"row {r}"


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_dtypes_and_approx(dtype):
    base, tuned = (t.cuda() for t in make_pair((4096, 4096), dtype, seed=1))
    for case in METHOD_CASES:
        check(base, tuned, "row", case, case_id(case))
    _, _, stats, k = _approx_merge(base, tuned, dict(suppress="magnitude", density=0.2))
    assert abs(stats.kept - k) <= 0.001 * base.numel()


# ------------------------------------------------------------------ on a GPU, against cpp's bytes
cpp_built = needs_cpp


def against_cpp(base, tuned, axis, case, what=""):
    """Triton on the GPU and cpp on the CPU through conftest's comparison rule, cpp's output
    standing in for the reference's: equal counts, the same bytes (within one ulp where a scale
    is a ratio of float64 sums, whose summation order differs between the two)."""
    from fusion_kernels.ops import select_backend

    params = params_for(**case)
    expected, actual = poisoned_like(base), poisoned_like(base).cuda()
    want = select_backend("cpp", "cpu").kernel()(base, tuned, expected, NAME, axis, params)
    got = launcher.merge_triton(base.cuda(), tuned.cuda(), actual, NAME, axis, params)
    what = f"triton vs cpp {what} {case_id(case)} axis={axis}"
    assert_same_merge(actual.cpu(), got, expected, want, params, axis, what)


@functools.cache
def _pair(shape, dtype=torch.bfloat16, tied=True):
    # Generated once per shape (drawing 58M entries on the CPU takes seconds); never modified.
    return make_pair(shape, dtype, seed=3, tied=tied)


@pytest.mark.cuda
@cuda
@cpp_built
@pytest.mark.parametrize("axis", ["row", "col", "none"])
@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_cuda_bytes_equal_cpp_at_llama_shapes(case, axis):
    against_cpp(*_pair((4096, 14336)), axis, case, "4096x14336")


@pytest.mark.cuda
@cuda
@cpp_built
@pytest.mark.parametrize(
    "shape", [(64, 53248), (3, 200_000), (5_000_000,)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("case", DELLA, ids=case_id)
def test_cuda_della_long_rows_equal_cpp(case, shape):
    # Rows longer than 16384 (the old one-block sort's limit), and a 1-D tensor whose old
    # counting grid had more than 65535 blocks in y.
    against_cpp(*_pair(shape), "none", case, "x".join(map(str, shape)))


@pytest.mark.cuda
@cuda
@cpp_built
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_other_dtypes_equal_cpp(dtype):
    base, tuned = _pair((1024, 4096), dtype, tied=False)
    for case in METHOD_CASES:
        against_cpp(base, tuned, "row", case, str(dtype))
