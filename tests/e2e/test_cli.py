"""The command line end to end, and every bad input: one line naming the problem, exit status 2,
no output directory, inputs untouched."""

import json
import subprocess
import sys

import pytest
import torch
from checkpoints import tiny_pair, tree_digest, write_single
from conftest import assert_within_ulp

from fusion_kernels import available_backends
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.merge import main


def run_cli(*args: str) -> int:
    return main([*map(str, args), "--quiet"])


@pytest.fixture
def pair(tmp_path):
    base, tuned = tiny_pair(tmp_path / "in")
    return base, tuned, tmp_path / "out"


def test_cli_merge_subprocess_end_to_end(pair):
    base, tuned, out = pair
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusion_kernels.merge",
            "--base",
            base,
            "--tuned",
            tuned,
            "--out",
            out,
            "--method",
            "neu-s-ties",
            "--density",
            "0.3",
            "--backend",
            "torch",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "merged 21 tensors" in done.stdout and "kept" in done.stdout
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["params"]["restore"] == "rescale" and report["params"]["density"] == 0.3
    assert report["backends"] == ["torch"]
    assert "merging" in done.stderr, "progress bar on stderr"


def test_explicit_flags_override_the_preset(pair):
    base, tuned, out = pair
    assert (
        run_cli(
            "--base",
            base,
            "--tuned",
            tuned,
            "--out",
            out,
            "--method",
            "dare",
            "--rescale",
            "inverse",
            "--seed",
            "5",
            "--neuron-rule",
            "up_proj=col",
        )
        == 0
    )
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["params"]["suppress"] == "random" and report["params"]["rescale"] == "inverse"
    assert report["params"]["seed"] == 5
    up = next(t for t in report["tensors"] if t["name"] == "model.layers.0.mlp.up_proj.weight")
    assert up["axis"] == "col"


def test_dry_run_prints_the_plan_and_writes_nothing(pair, capsys):
    base, tuned, out = pair
    assert run_cli("--base", base, "--tuned", tuned, "--out", out, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj.weight" in text and "merge axis=col" in text
    assert "21 tensors: 21 merged" in text
    assert not out.exists()


def test_demo_generates_and_merges_with_neuron_fusion(tmp_path, capsys):
    assert run_cli("--demo", tmp_path / "demo") == 0
    text = capsys.readouterr().out
    found, total = map(int, text.split("bit-identical to tuned: ")[1].split()[::2])
    assert found == total > 0
    assert Checkpoint(tmp_path / "demo" / "merged").names()


def expect_error(capsys, args, *fragments):
    status = run_cli(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    message = err[-1]
    assert message.startswith("error: ")
    for fragment in fragments:
        assert str(fragment) in message, message


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--density", "1.5"], "density must be in [0, 1]"),
        (["--top-neurons", "-0.1"], "top_neurons must be in [0, 1]"),
        (["--gamma", "1"], "gamma must be in [0, 1)"),
        (["--method", "della", "--epsilon", "0.5"], "lower --epsilon"),
        (["--neuron-rule", "up_proj=diag"], "axis must be row, col or none"),
        (["--neuron-rule", "(=row"], "bad regular expression"),
    ],
)
def test_bad_parameters_exit_2_with_one_line(pair, capsys, flags, fragment):
    base, tuned, out = pair
    expect_error(capsys, ["--base", base, "--tuned", tuned, "--out", out, *flags], fragment)
    assert not out.exists()


def test_bad_inputs_exit_2_and_leave_nothing(tmp_path, capsys):
    base, tuned = tiny_pair(tmp_path / "in")
    before = tree_digest(tmp_path / "in")
    out = tmp_path / "out"
    expect_error(
        capsys,
        ["--base", tmp_path / "nope", "--tuned", tuned, "--out", out],
        "nope",
        "no such file",
    )
    (tmp_path / "empty").mkdir()
    expect_error(
        capsys, ["--base", tmp_path / "empty", "--tuned", tuned, "--out", out], "no .safetensors"
    )
    expect_error(
        capsys, ["--base", base, "--tuned", tuned, "--out", tuned / "sub"], "overlaps the input"
    )

    shard = base / "model-00002-of-00002.safetensors"
    truncated = tmp_path / "trunc"
    truncated.mkdir()
    (truncated / "model.safetensors").write_bytes(shard.read_bytes()[:-100])
    expect_error(
        capsys, ["--base", truncated, "--tuned", tuned, "--out", out], "truncated", "trunc"
    )
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert tree_digest(tmp_path / "in") == before


def test_shape_mismatch_exits_2_naming_the_tensor(tmp_path, capsys):
    write_single(tmp_path / "b", {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 3)})
    write_single(tmp_path / "t", {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 5)})
    expect_error(
        capsys,
        ["--base", tmp_path / "b", "--tuned", tmp_path / "t", "--out", tmp_path / "o"],
        "model.layers.0.mlp.up_proj.weight",
        "shape [4, 5] in tuned",
    )
    assert not (tmp_path / "o").exists()


def test_nonfinite_delta_is_an_error_unless_allowed(tmp_path, capsys):
    bad = torch.ones(4, 4)
    bad[0, 0] = float("nan")
    write_single(tmp_path / "b", {"w": torch.ones(4, 4), "v": torch.ones(3)})
    write_single(tmp_path / "t", {"w": bad, "v": torch.ones(3) * 2})
    args = ["--base", tmp_path / "b", "--tuned", tmp_path / "t", "--out", tmp_path / "o"]
    expect_error(capsys, args, "'w'", "not finite", "--allow-nonfinite", "model.safetensors")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    assert run_cli(*args, "--allow-nonfinite") == 0
    assert "copied unchanged (non-finite delta): w" in capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "fusion_report.json").read_text())
    assert report["totals"]["copied_nonfinite"] == ["w"]


def test_existing_output_exits_2_without_overwrite(pair, capsys):
    base, tuned, out = pair
    out.mkdir()
    expect_error(
        capsys, ["--base", base, "--tuned", tuned, "--out", out], "already exists", "--overwrite"
    )
    assert run_cli("--base", base, "--tuned", tuned, "--out", out, "--overwrite") == 0


def test_missing_paths_and_unavailable_backend_are_clear(pair, capsys):
    base, tuned, out = pair
    expect_error(capsys, ["--base", base], "missing --tuned, --out")
    assert run_cli("--base", base, "--tuned", tuned, "--out", out, "--backend", "torch") == 0


def test_per_tensor_overrides_apply_first_match_and_are_reported(pair):
    base, tuned, out = pair
    assert (
        run_cli(
            "--base",
            base,
            "--tuned",
            tuned,
            "--out",
            out,
            "--method",
            "neu-p-ties",
            "--set",
            r"self_attn\.:density=0.5,restore=rescale",
            "--set",
            "mlp:density=0.05",
        )
        == 0
    )
    report = json.loads((out / "fusion_report.json").read_text())
    entries = {t["name"]: t for t in report["tensors"]}
    q = entries["model.layers.0.self_attn.q_proj.weight"]
    up = entries["model.layers.0.mlp.up_proj.weight"]
    norm = entries["model.norm.weight"]
    assert q["kept"] == int(0.5 * q["numel"]) and q["params"] == {
        "density": 0.5,
        "restore": "rescale",
    }
    assert up["kept"] == int(0.05 * up["numel"])
    assert norm["kept"] == int(0.2 * norm["numel"]) and "params" not in norm
    assert report["param_overrides"][1] == {"pattern": "mlp", "density": 0.05}


def test_bad_override_is_rejected_before_any_work(pair, capsys):
    base, tuned, out = pair
    expect_error(
        capsys,
        ["--base", base, "--tuned", tuned, "--out", out, "--set", "mlp:density=2"],
        "density must be in [0, 1]",
    )
    expect_error(
        capsys,
        ["--base", base, "--tuned", tuned, "--out", out, "--set", "mlp:colour=red"],
        "unknown parameter 'colour'",
    )
    assert not out.exists()


@pytest.mark.skipif(
    "triton" not in available_backends(), reason="needs triton and a GPU or TRITON_INTERPRET=1"
)
def test_cli_merge_on_the_triton_backend_equals_torch(tmp_path):
    base, tuned = tiny_pair(tmp_path / "in", hidden=16, intermediate=24, layers=1, vocab=32)
    outputs = {}
    for backend in ("torch", "triton"):
        out = tmp_path / backend
        assert (
            run_cli(
                "--base",
                base,
                "--tuned",
                tuned,
                "--out",
                out,
                "--method",
                "neu-s-bread",
                "--backend",
                backend,
            )
            == 0
        )
        outputs[backend] = Checkpoint(out)
        assert json.loads((out / "fusion_report.json").read_text())["backends"] == [backend]
    for name in outputs["torch"].names():
        assert_within_ulp(outputs["triton"].read(name), outputs["torch"].read(name), 1, name)
