"""DELLA's ranks: each row's keys sorted in global memory, a chunk of rows at a time.

Through Triton's interpreter (TRITON_INTERPRET=1) with block sizes small enough that the rows
below span many scatter blocks and many sort chunks, against the torch reference byte for byte;
and with exact key ties (which real keys reach only past 2^32 entries) planted to check that
equal keys rank by column, SPEC's last tie-break.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_tensors_equal, make_pair, poisoned_like

from fusion_kernels.ops import triton as triton_backend
from fusion_kernels.ops.reference import merge_reference
from fusion_kernels.params import params_for

NAME = "model.layers.3.mlp.down_proj.weight"

pytestmark = pytest.mark.skipif(
    not triton_backend.interpreting(),
    reason="runs Triton's interpreter on the CPU: set TRITON_INTERPRET=1",
)


@pytest.fixture
def small_blocks(monkeypatch):
    """8-position scatter blocks (rows of 23 end in a partial one) and 40-entry sort chunks."""
    tuning = dataclasses.replace(triton_backend.INTERPRETER_TUNING, rank_block=8, rank_chunk=40)
    monkeypatch.setattr(triton_backend, "INTERPRETER_TUNING", tuning)
    return tuning


def merge_both(shape, dtype, case, axis="none"):
    import triton  # noqa: F401

    base, tuned = make_pair(shape, dtype, seed=9, tied=True)
    params = params_for(**case)
    expected, actual = poisoned_like(base), poisoned_like(base)
    want = merge_reference(base, tuned, expected, NAME, axis, params)
    got = triton_backend.merge_triton(base, tuned, actual, NAME, axis, params)
    return want, got, expected, actual


@pytest.mark.parametrize(
    "case",
    [
        dict(suppress="della", density=0.4, epsilon=0.1),
        dict(suppress="della", density=0.3, epsilon=0.2, rescale="inverse"),
        dict(suppress="della", density=0.5, epsilon=0.1, rescale="none", restore="replace"),
    ],
    ids=["l1", "inverse", "none-replace"],
)
@pytest.mark.parametrize("shape", [(5, 23), (3, 40), (61,), (2, 3, 17), (9, 1)], ids=str)
def test_long_rows_match_the_reference(small_blocks, case, shape):
    # (5, 23): 3 scatter blocks a row, 1 row a chunk; (3, 40): one row fills a chunk; (61,): one
    # row longer than a chunk; (2, 3, 17): leading dimensions flattened into 6 rows; (9, 1): L = 1.
    axis = "row" if case.get("restore") and len(shape) == 2 else "none"
    want, got, expected, actual = merge_both(shape, torch.bfloat16, case, axis)
    assert (got.kept, got.restored, got.fallbacks) == (want.kept, want.restored, want.fallbacks)
    if case.get("rescale", "l1") == "l1":
        # The l1 scale is a ratio of float64 sums, whose order differs between backends.
        assert abs(got.l1_scale - want.l1_scale) <= 2**-23 * want.l1_scale
        # Both scales round to the same float32 on these inputs; any other rounding would show.
    assert_tensors_equal(actual, expected, f"{case} {shape}")


def test_exact_key_ties_rank_by_column(small_blocks, monkeypatch):
    from fusion_kernels.ops import triton_select as selection

    rows, cols = 4, 21
    gen = torch.Generator().manual_seed(1)
    # Few distinct keys, so each row holds many exact ties.
    keys = torch.randint(0, 4, (rows, cols), generator=gen, dtype=torch.int64) << 40

    class PlantedKeys:
        def __getitem__(self, grid):
            def launch(base, tuned, chunk, start, count, *args, **meta):
                chunk.copy_(~keys.reshape(-1)[start : start + count])

            return launch

    monkeypatch.setattr(selection, "_della_keys_kernel", PlantedKeys())
    base, tuned = make_pair((rows, cols), torch.float32, seed=2)
    job = triton_backend._prepare(base, tuned, poisoned_like(base), NAME, params_for("della"))
    triton_backend._della_ranks(job, kept_sum=False)
    for r in range(rows):
        # SPEC order: key descending, then column ascending; r counts from the last.
        order = sorted(range(cols), key=lambda c: (-int(keys[r, c]), c))
        want = torch.empty(cols, dtype=torch.int32)
        want[order] = torch.arange(cols - 1, -1, -1, dtype=torch.int32)
        assert torch.equal(job.rank[r * cols : (r + 1) * cols], want), f"row {r}"
