"""Reader, planner and writer: layouts in, layouts out, and what the output directory holds."""

import json

import pytest
import torch
from checkpoints import tiny_pair, write_single
from conftest import assert_tensors_equal
from safetensors import safe_open
from safetensors.torch import load_file

from fusion_kernels import NeuronRules, merge_checkpoints, merge_tensor, params_for
from fusion_kernels.errors import CheckpointError, OutputExistsError, PlanError
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.plan.planner import build_plan
from fusion_kernels.sizes import parse_size

PARAMS = params_for("neu-p-ties")


def test_sharded_merge_keeps_tuned_layout_and_equals_the_per_tensor_op(tmp_path):
    base, tuned = tiny_pair(tmp_path)
    (tuned / "tokenizer.json").write_text("{}")
    out = tmp_path / "merged"
    report = merge_checkpoints(base, tuned, out, PARAMS, progress=False)

    tuned_ckpt, out_ckpt = Checkpoint(tuned), Checkpoint(out)
    assert [f.name for f in out_ckpt.files] == [f.name for f in tuned_ckpt.files]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert (
        index["weight_map"]
        == json.loads((tuned / "model.safetensors.index.json").read_text())["weight_map"]
    )
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (tuned / name).read_bytes()
    base_ckpt = Checkpoint(base)
    for name in tuned_ckpt.names():
        got = out_ckpt.read(name)
        expected, _ = merge_tensor(base_ckpt.read(name), tuned_ckpt.read(name), name, params=PARAMS)
        assert_tensors_equal(got, expected, name)
        assert out_ckpt.info(name).file.name == tuned_ckpt.info(name).file.name
    entries = {t["name"]: t for t in report["tensors"]}
    assert set(entries) == set(tuned_ckpt.names())
    up = entries["model.layers.0.mlp.up_proj.weight"]
    assert (
        up["axis"] == "row" and up["restored"] == int(0.3 * 48) and up["kept"] == int(0.2 * 48 * 32)
    )
    assert entries["model.layers.1.self_attn.o_proj.weight"]["axis"] == "col"
    on_disk = json.loads((out / "fusion_report.json").read_text())
    assert on_disk["params"]["restore"] == "replace" and on_disk["params"]["density"] == 0.2
    assert on_disk["tensors"] == report["tensors"]
    assert not list(tmp_path.glob(".merged.*")), "no temporary directory left behind"


def test_single_file_inputs_and_single_safetensors_path(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(6, 5, generator=gen), "b": torch.randn(3, generator=gen)}
    tuned = {k: v + 0.1 for k, v in base.items()}
    write_single(tmp_path / "base", base)
    write_single(tmp_path / "tuned", tuned, config={"model_type": "x"})
    params = params_for("ties")
    merge_checkpoints(
        tmp_path / "base", tmp_path / "tuned", tmp_path / "o1", params, progress=False
    )
    merge_checkpoints(
        tmp_path / "base" / "model.safetensors",
        tmp_path / "tuned" / "model.safetensors",
        tmp_path / "o2",
        params,
        progress=False,
    )
    one, two = (
        load_file(tmp_path / "o1" / "model.safetensors"),
        load_file(tmp_path / "o2" / "model.safetensors"),
    )
    assert one.keys() == two.keys() == base.keys()
    for name in one:
        assert_tensors_equal(one[name], two[name], name)
    assert (tmp_path / "o1" / "config.json").exists()
    assert not (tmp_path / "o2" / "config.json").exists(), "a bare file path copies no neighbours"


def test_tuned_only_and_non_float_tensors_are_copied_and_base_only_skipped(tmp_path, caplog):
    base = {"w": torch.randn(4, 4), "ids": torch.arange(5), "old": torch.ones(2)}
    tuned = {
        "w": base["w"] + 1,
        "ids": torch.arange(5) * 2,
        "new": torch.zeros(3, dtype=torch.bfloat16),
    }
    write_single(tmp_path / "base", base)
    write_single(tmp_path / "tuned", tuned)
    with pytest.raises(PlanError, match=r"do not pair one to one.*'new'.*'old'"):
        build_plan(Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "tuned"))
    plan = build_plan(Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "tuned"), strict=False)
    actions = {n: (t.action, t.reason) for n, t in plan.tasks.items()}
    assert actions == {
        "w": ("merge", ""),
        "ids": ("copy", "I64 is not a float dtype"),
        "new": ("copy", "no base counterpart"),
    }
    assert plan.skipped == ["old"]
    report = merge_checkpoints(
        tmp_path / "base",
        tmp_path / "tuned",
        tmp_path / "out",
        params_for("ties"),
        allow_unpaired=True,
        progress=False,
    )
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["ids"], tuned["ids"]) and torch.equal(out["new"], tuned["new"])
    assert "old" not in out and report["totals"]["skipped_base_only"] == ["old"]
    assert "only in base" in caplog.text
    assert report["pairing"]["strict"] is False and report["pairing"]["unpaired_tuned"] == ["new"]


def test_shape_and_dtype_mismatch_are_plan_errors_naming_the_tensor(tmp_path):
    write_single(tmp_path / "base", {"w": torch.zeros(4, 4), "v": torch.zeros(2)})
    write_single(tmp_path / "t1", {"w": torch.zeros(4, 5), "v": torch.zeros(2)})
    write_single(
        tmp_path / "t2", {"w": torch.zeros(4, 4), "v": torch.zeros(2, dtype=torch.float16)}
    )
    with pytest.raises(PlanError, match=r"'w': shape \[4, 5\] in tuned"):
        build_plan(Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "t1"))
    with pytest.raises(PlanError, match="'v': dtype F16 in tuned"):
        build_plan(Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "t2"))


def test_max_shard_size_regroups_output_and_writes_an_index(tmp_path):
    base, tuned = tiny_pair(tmp_path)
    out = tmp_path / "out"
    merge_checkpoints(base, tuned, out, PARAMS, max_shard_size=parse_size("10KB"), progress=False)
    ckpt = Checkpoint(out)
    assert len(ckpt.files) > 2
    assert ckpt.names() == Checkpoint(tuned).names()
    for file in ckpt.files:
        with safe_open(str(file), "pt") as fh:
            sizes = [fh.get_slice(n).get_shape() for n in fh.keys()]  # noqa: SIM118 (safe_open is not a dict)
        total = sum(torch.Size(s).numel() * 2 for s in sizes)
        assert total <= 10_000 or len(sizes) == 1


def test_existing_output_needs_overwrite_and_overwrite_replaces_it(tmp_path):
    base, tuned = tiny_pair(tmp_path)
    out = tmp_path / "out"
    merge_checkpoints(base, tuned, out, params_for("ties"), progress=False)
    (out / "stale.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        merge_checkpoints(base, tuned, out, PARAMS, progress=False)
    assert (out / "stale.txt").exists()
    merge_checkpoints(base, tuned, out, PARAMS, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "fusion_report.json").exists()


def test_user_neuron_rules_override_defaults_and_must_fit_the_shape(tmp_path):
    base, tuned = tiny_pair(tmp_path)
    rules = NeuronRules([r"mlp\.up_proj=col", r"o_proj=none"])
    plan = build_plan(Checkpoint(base), Checkpoint(tuned), rules)
    assert plan.tasks["model.layers.0.mlp.up_proj.weight"].axis == "col"
    assert plan.tasks["model.layers.0.self_attn.o_proj.weight"].axis == "none"
    assert plan.tasks["model.layers.0.mlp.down_proj.weight"].axis == "col"
    with pytest.raises(PlanError, match="needs a 2-D weight"):
        build_plan(Checkpoint(base), Checkpoint(tuned), NeuronRules(["layernorm=row"]))


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda b: b[:20], "header length"),
        (lambda b: b[:-3], "truncated"),
        (lambda b: b[:8] + b"{not json" + b[17:], "not valid JSON"),
        (lambda b: b + b"junk", "after the last tensor"),
        (lambda b: b[:8] + b[8:].replace(b'"F32"', b'"F99"', 1), "unknown dtype"),
    ],
    ids=["short-header", "truncated-data", "bad-json", "trailing-bytes", "bad-dtype"],
)
def test_corrupt_safetensors_are_checkpoint_errors_naming_the_file(tmp_path, mutate, message):
    path = (
        write_single(tmp_path / "c", {"w": torch.zeros(4, 4), "v": torch.ones(3)})
        / "model.safetensors"
    )
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as info:
        Checkpoint(path.parent)
    assert str(path) in str(info.value)


def test_index_problems_are_checkpoint_errors(tmp_path):
    base, _ = tiny_pair(tmp_path)
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(base)
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not in its shard"):
        Checkpoint(base)


def test_directories_without_a_checkpoint_are_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no \.safetensors checkpoint"):
        Checkpoint(tmp_path / "empty")


def _raw_safetensors(path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file with tensors laid out back to back, exactly as given (no padding
    between them, so a tensor may start at an odd byte)."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


def test_views_equal_copies_and_never_write_to_the_file(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "f32": torch.randn(7, 5, generator=gen),
        "bf16": torch.randn(4, 9, generator=gen).bfloat16(),
        "f16": torch.randn(13, generator=gen).half(),
        "i64": torch.arange(6).reshape(2, 3),
        "flags": torch.tensor([True, False, True]),
        "f8": torch.randn(5, generator=gen).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
    }
    write_single(tmp_path / "ckpt", tensors)
    file = tmp_path / "ckpt" / "model.safetensors"
    before = file.read_bytes()
    ckpt = Checkpoint(tmp_path / "ckpt")
    for name, expected in tensors.items():
        view = ckpt.view(name)
        assert view.dtype == expected.dtype and view.shape == expected.shape, name
        assert torch.equal(view.view(torch.uint8), expected.view(torch.uint8)), name
        view.zero_()
        ckpt.release(name)
        assert torch.equal(ckpt.read(name).view(torch.uint8), expected.view(torch.uint8)), name
    ckpt.close()
    assert file.read_bytes() == before


def test_views_stay_readable_after_release_and_close(tmp_path):
    tensors = {"w": torch.randn(64, 1024)}
    write_single(tmp_path / "ckpt", tensors)
    ckpt = Checkpoint(tmp_path / "ckpt")
    view = ckpt.view("w")
    ckpt.release("w")
    assert torch.equal(view, tensors["w"])
    ckpt.close()
    assert torch.equal(view, tensors["w"])


def test_a_tensor_not_aligned_to_its_dtype_is_read_by_copy(tmp_path):
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    _raw_safetensors(
        tmp_path / "model.safetensors",
        {
            "pad": ("U8", [1], b"\x07"),
            "w": ("BF16", [3], values.view(torch.uint8).numpy().tobytes()),
        },
    )
    ckpt = Checkpoint(tmp_path / "model.safetensors")
    view = ckpt.view("w")
    assert view.data_ptr() % 2 == 0
    assert torch.equal(view, values)
