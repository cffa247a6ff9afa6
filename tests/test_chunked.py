"""Tensors streamed in chunks under the memory budget give the whole-tensor merge's bytes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from checkpoints import tiny_pair, write_single

from fusion_kernels import merge_checkpoints, params_for
from fusion_kernels.chunks import BUFFERS_IN_FLIGHT, Budget
from fusion_kernels.errors import NonFiniteDeltaError, ParameterError
from fusion_kernels.params import PRESETS, MergeParams
from fusion_kernels.planner import TensorTask
from fusion_kernels.reader import TensorInfo

cpp = pytest.importorskip("fusion_kernels.ops.cpp")
try:
    import fusion_kernels._cpp as ext
except ImportError:
    pytest.skip("the C++ extension is not built", allow_module_level=True)

SUPPRESS = ("none", "magnitude", "breadcrumbs", "random", "della")
RESTORE = ("none", "replace", "rescale")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _pair(shape, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    delta = 0.01 * torch.randn(shape, generator=gen)
    return base, (base.float() + delta).to(dtype)


def _whole(base, tuned, axis, params, **options):
    out = torch.empty_like(base)
    stats = cpp.merge_cpp(ext, base, tuned, out, "t", axis, params, **options)
    return out, stats


def _chunked(base, tuned, axis, params, rows_per_chunk, **options):
    op = cpp.ChunkedMergeCpp(
        tuple(base.shape), base.dtype, tuned.dtype, "t", axis, params, **options
    )
    out = torch.empty_like(base)
    b, t, o = (x.reshape(op.rows, op.cols) for x in (base, tuned, out))
    passes = []
    for name in op.passes():
        passes.append(name)
        for row in range(0, op.rows, rows_per_chunk):
            stop = row + rows_per_chunk
            op.feed(b[row:stop], t[row:stop], o[row:stop] if name == "write" else None, row)
    return out, op.stats(), passes


@pytest.mark.parametrize(
    "suppress,restore,axis,select",
    list(itertools.product(SUPPRESS, RESTORE, ("row", "col", "none"), ("exact", "approx"))),
)
def test_chunked_kernel_writes_the_whole_tensor_merge_bytes(suppress, restore, axis, select):
    # 37 rows (prime) of 29: chunks of one row, of a prime count, uneven, and the whole tensor.
    base, tuned = _pair((37, 29))
    params = MergeParams(suppress=suppress, restore=restore, select=select)
    for options in ({}, {"sample_size": 0}, {"sample_size": 16}):
        want, want_stats = _whole(base, tuned, axis, params, **options)
        for rows in (1, 7, 10, 37):
            got, stats, _ = _chunked(base, tuned, axis, params, rows, **options)
            assert torch.equal(_bits(got), _bits(want)), (options, rows)
            assert stats == want_stats


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("suppress", SUPPRESS)
def test_chunked_kernel_other_dtypes_and_shapes(dtype, suppress):
    params = MergeParams(suppress=suppress, restore="rescale", rescale="l1")
    for shape, axis in (((101,), "none"), ((5, 3, 11), "none"), ((13, 300), "col")):
        base, tuned = _pair(shape, dtype, seed=1)
        want, want_stats = _whole(base, tuned, axis, params)
        got, stats, _ = _chunked(base, tuned, axis, params, 2)
        assert torch.equal(_bits(got), _bits(want)) and stats == want_stats


@pytest.mark.parametrize("select", ["exact", "approx"])
@pytest.mark.parametrize("suppress", ["magnitude", "breadcrumbs"])
def test_chunked_selection_routes_bracket_radix_and_missed_brackets(suppress, select):
    # Large enough for several threads; the sampled brackets, the radix select alone, and
    # brackets that miss (a 16-key sample) each give the whole-tensor cuts.
    base, tuned = _pair((613, 701), seed=2)
    params = MergeParams(suppress=suppress, restore="rescale", select=select)
    routes = set()
    for options in ({}, {"sample_size": 0, "collect_cap": 500}, {"sample_size": 16}):
        want, want_stats = _whole(base, tuned, "row", params, **options)
        got, stats, passes = _chunked(base, tuned, "row", params, 97, **options)
        assert torch.equal(_bits(got), _bits(want)) and stats == want_stats
        routes.add(tuple(passes))
    assert ("first", "bracket", "kept", "write") in routes
    assert any(passes.count("radix") >= 2 for passes in routes), routes


def test_chunked_mixed_dtypes_round_like_the_whole_merge():
    base, tuned = _pair((9, 17), torch.float16)
    tuned = tuned.to(torch.bfloat16)
    params = MergeParams(suppress="magnitude", restore="replace")
    want, want_stats = _whole(base, tuned, "row", params)
    got, stats, _ = _chunked(base, tuned, "row", params, 4)
    assert torch.equal(_bits(got), _bits(want)) and stats == want_stats


def test_chunked_nonfinite_delta_is_found_before_the_write_pass():
    base, tuned = _pair((8, 8))
    tuned[5, 3] = float("nan")
    op = cpp.ChunkedMergeCpp((8, 8), base.dtype, tuned.dtype, "t", "row", params_for("ties"))
    passes = []
    for name in op.passes():
        passes.append(name)
        op.feed(base, tuned, None, 0)
    assert passes == ["first"]
    with pytest.raises(NonFiniteDeltaError, match="'t'"):
        op.stats()


def test_chunked_feed_checks_its_chunks():
    op = cpp.ChunkedMergeCpp((4, 8), torch.bfloat16, torch.bfloat16, "t", "row", MergeParams())
    base, tuned = _pair((4, 8))
    next(op.passes())
    with pytest.raises(ValueError, match="whole rows"):
        op.feed(base.reshape(-1)[:5], tuned.reshape(-1)[:5], None, 0)
    with pytest.raises(ValueError, match="past the tensor"):
        op.feed(base, tuned, None, 1)


# ---- the budget rule ----


def _task(shape, action="merge") -> TensorTask:
    info = TensorInfo(
        "w", Path("x.safetensors"), "BF16", shape, 0, 2 * int(torch.Size(shape).numel())
    )
    return TensorTask("w", action, info, info if action == "merge" else None, axis="row")


def test_budget_holds_six_buffers_whole_and_chunks_the_rest():
    task = _task((100, 64))  # 12 800 bytes
    ties, della = params_for("ties"), params_for("della")
    assert Budget(BUFFERS_IN_FLIGHT * 12_800).whole(task, ties)
    assert not Budget(BUFFERS_IN_FLIGHT * 12_800 - 1).whole(task, ties)
    # della's per-entry scale (4 bytes an entry) counts too.
    assert not Budget(BUFFERS_IN_FLIGHT * 12_800).whole(task, della)
    assert Budget(BUFFERS_IN_FLIGHT * 128 * 10).chunk_rows(task, ties) == 10
    assert Budget(1).chunk_rows(task, ties) == 1, "a budget below one row still moves a row"
    with pytest.raises(ParameterError, match="memory-budget"):
        Budget(0)


# ---- whole merges under a budget ----


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def _merge(base, tuned, out, params, **kwargs) -> dict:
    return merge_checkpoints(base, tuned, out, params, progress=False, overwrite=True, **kwargs)


# 1 byte: every tensor in chunks of one row (a budget smaller than one row); 6 000: uneven
# chunks of several rows; the default: every tiny tensor whole.
BUDGETS = (1, 6_000)


@pytest.fixture(scope="module")
def odd_pair(tmp_path_factory) -> tuple[Path, Path]:
    # Prime row counts: vocabulary 67, intermediate 53.
    return tiny_pair(tmp_path_factory.mktemp("odd"), vocab=67, intermediate=53)


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_a_budgeted_merge_writes_the_same_files_for_every_method(tmp_path, odd_pair, method):
    base, tuned = odd_pair
    params = params_for(method)
    want = _merge(base, tuned, tmp_path / "whole", params, backend="cpp")
    for budget in BUDGETS:
        got = _merge(
            base, tuned, tmp_path / f"b{budget}", params, backend="cpp", memory_budget=budget,
            verify=True,
        )  # fmt: skip
        assert _files(tmp_path / f"b{budget}") == _files(tmp_path / "whole"), budget
        assert [t["kept"] for t in got["tensors"]] == [t["kept"] for t in want["tensors"]]
        assert got["memory_budget"] == budget


@pytest.mark.parametrize("restore", RESTORE)
@pytest.mark.parametrize("select", ["exact", "approx"])
def test_a_budgeted_merge_writes_the_same_files_for_every_restore_mode(
    tmp_path, odd_pair, restore, select
):
    base, tuned = odd_pair
    for suppress in ("random", "della", "breadcrumbs"):
        rescale = {"breadcrumbs": None}.get(suppress, "l1")
        params = params_for(suppress=suppress, restore=restore, select=select, rescale=rescale)
        _merge(base, tuned, tmp_path / "whole", params, backend="cpp")
        _merge(base, tuned, tmp_path / "chunked", params, backend="cpp", memory_budget=1)
        assert _files(tmp_path / "chunked") == _files(tmp_path / "whole"), suppress


def test_budgeted_copies_grown_vocabulary_and_nonfinite_stream_too(tmp_path):
    gen = torch.Generator().manual_seed(3)
    base = {
        "model.embed_tokens.weight": torch.randn(41, 16, generator=gen).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(23, 16, generator=gen).bfloat16(),
    }
    tuned = {k: (v.float() + 0.01).bfloat16() for k, v in base.items()}
    tuned["model.embed_tokens.weight"] = torch.cat(
        [tuned["model.embed_tokens.weight"], torch.randn(6, 16, generator=gen).bfloat16()]
    )
    tuned["model.layers.0.mlp.up_proj.weight"][4, 2] = float("inf")
    tuned["extra.weight"] = torch.randn(19, 16, generator=gen).bfloat16()
    b = write_single(tmp_path / "base", base)
    t = write_single(tmp_path / "tuned", tuned)
    params = params_for("neu-p-ties", allow_nonfinite=True)
    want = _merge(b, t, tmp_path / "whole", params, backend="cpp")
    got = _merge(b, t, tmp_path / "chunked", params, backend="cpp", memory_budget=1, verify=True)
    assert _files(tmp_path / "chunked") == _files(tmp_path / "whole")
    assert got["totals"]["copied_nonfinite"] == want["totals"]["copied_nonfinite"] != []
    report = json.loads((tmp_path / "chunked" / "fusion_report.json").read_text())
    assert report["memory_budget"] == 1
    with pytest.raises(NonFiniteDeltaError, match=r"model\.safetensors"):
        _merge(b, t, tmp_path / "fails", params_for("ties"), backend="cpp", memory_budget=1)
    assert not (tmp_path / "fails").exists()


def test_the_torch_backend_ignores_chunking_and_matches(tmp_path, odd_pair):
    base, tuned = odd_pair
    params = params_for("neu-s-ties")
    _merge(base, tuned, tmp_path / "cpp", params, backend="cpp", memory_budget=1)
    _merge(base, tuned, tmp_path / "torch", params, backend="torch", memory_budget=1)
    assert _files(tmp_path / "torch") == _files(tmp_path / "cpp")


def test_triton_under_a_budget_stages_in_chunks_and_matches(tmp_path):
    pytest.importorskip("triton")
    from fusion_kernels.ops import triton as triton_backend

    if not triton_backend.interpreting() and not torch.cuda.is_available():
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    base, tuned = tiny_pair(tmp_path / "pair", layers=1, vocab=37, intermediate=40)
    device = "cuda" if torch.cuda.is_available() and not triton_backend.interpreting() else "cpu"
    params = params_for("neu-p-ties")
    _merge(base, tuned, tmp_path / "cpp", params, backend="cpp")
    # Staging buffers of a page: every tensor crosses them in several chunks.
    _merge(
        base, tuned, tmp_path / "triton", params, backend="triton", device=device,
        memory_budget=4 * 4096, staging_bytes=4096,
    )  # fmt: skip
    assert _files(tmp_path / "triton") == _files(tmp_path / "cpp")


def test_the_cli_takes_a_memory_budget(tmp_path, odd_pair):
    from fusion_kernels.merge import main

    base, tuned = odd_pair
    args = ["--base", str(base), "--tuned", str(tuned), "--method", "ties", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a"), "--memory-budget", "1KiB"]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    report = json.loads((tmp_path / "a" / "fusion_report.json").read_text())
    assert report["memory_budget"] == 1024
