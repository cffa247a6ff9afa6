"""The command line end to end, and every bad input: one line naming the problem, exit status 2,
no output directory, inputs untouched."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import tiny_pair, tree_digest, write_single
from conftest import assert_within_ulp

from fusion_kernels import available_backends
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.merge import build_parser, main
from fusion_kernels.sizes import format_size


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


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--memory-budget", "12XB"], "argument --memory-budget: size '12XB' must look like 5GB"),
        (["--staging-size", "-1"], "argument --staging-size: size '-1' must look like"),
        (["--max-shard-size", "0"], "argument --max-shard-size: size '0' must be positive"),
        (["--backend", "fortran"], "argument --backend: invalid choice: 'fortran'"),
    ],
)
def test_bad_options_are_one_line_not_a_usage_block(pair, capsys, flags, fragment):
    base, tuned, out = pair
    assert run_cli("--base", base, "--tuned", tuned, "--out", out, *flags) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert "(see python -m fusion_kernels.merge --help)" in err[0]
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


def _readme() -> str:
    return (Path(__file__).parents[2] / "README.md").read_text()


def _readme_default_row(flag: str) -> str:
    """``flag``'s row in the README's flag table."""
    (row,) = [line for line in _readme().splitlines() if line.startswith(f"| `{flag}`")]
    return row


def _readme_default(flag: str) -> str:
    """The default column of ``flag``'s row in the README's flag table."""
    return _readme_default_row(flag).rstrip(" |").rsplit(" | ", 1)[1]


def test_rescale_default_agrees_in_help_readme_dry_run_and_report(pair, capsys):
    """SPEC: rescale defaults to l1 for random and della only; every place that shows it says so."""
    base, tuned, out = pair
    help_text = " ".join(build_parser().format_help().split())
    assert "(default l1 for random and della, none otherwise)" in help_text
    assert _readme_default("--rescale") == "`l1` for random/della, else `none`"
    for method, rescale in (("neuron_fusion", "none"), ("dare", "l1")):
        assert run_cli("--base", base, "--tuned", tuned, "--dry-run", "--method", method) == 0
        assert f"'rescale': '{rescale}'" in capsys.readouterr().out
        target = out / method
        assert run_cli("--base", base, "--tuned", tuned, "--out", target, "--method", method) == 0
        assert json.loads((target / "fusion_report.json").read_text())["params"]["rescale"] == (
            rescale
        )
        assert f"| rescale | `{rescale}` |" in (target / "README.md").read_text()


def test_max_shard_size_writes_an_index_exactly_when_documented(pair):
    """Regrouped shards come with an index; a model that fits in one is one model.safetensors
    without index (as transformers saves it); a lone file named as a shard keeps its index."""
    base, tuned, out = pair
    assert run_cli("--base", base, "--tuned", tuned, "--out", out, "--max-shard-size", "5GB") == 0
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert (
        run_cli(
            "--base", base, "--tuned", tuned, "--out", out.parent / "s", "--max-shard-size", "15KB"
        )
        == 0
    )
    index = json.loads((out.parent / "s" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(
        p.name for p in (out.parent / "s").glob("model-*-of-00003.safetensors")
    )
    assert "one `model.safetensors` without index" in _readme_default_row("--max-shard-size")
    one = out.parent / "one"
    for side, source in (("base", base), ("tuned", tuned)):
        tensors = Checkpoint(source)
        write_single(one / side, {n: tensors.read(n) for n in tensors.names()})
        (one / side / "model.safetensors").rename(one / side / "model-00001-of-00001.safetensors")
        weight_map = {n: "model-00001-of-00001.safetensors" for n in tensors.names()}
        (one / side / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    merged = one / "merged"
    assert run_cli("--base", one / "base", "--tuned", one / "tuned", "--out", merged) == 0
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert sorted(Checkpoint(merged).names()) == sorted(Checkpoint(tuned).names())


def test_small_sizes_print_in_a_unit_that_fits(pair, capsys):
    base, tuned, out = pair
    assert run_cli("--base", base, "--tuned", tuned, "--dry-run") == 0
    assert "2 shard(s), 39.2 kB" in capsys.readouterr().out
    assert run_cli("--base", base, "--tuned", tuned, "--out", out) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("merged 21 tensors, copied 0: 39.2 kB in ")
    assert re.search(r" s \([0-9.]+ [kM]B/s\) with backend", first), first
    assert format_size(3 * 10**9, "/s") == "3 GB/s" and format_size(999) == "999 B"
    assert format_size(1_234_567) == "1.23 MB" and format_size(5 * 10**15) == "5000 TB"
