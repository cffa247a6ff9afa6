"""Locate: change scores and summary figures against plain torch, the planted neurons ranked first,
and the plots and page it writes."""

import csv
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from backends import needs_cpp, needs_interpreter
from checkpoints import tiny_pair

from fusion_kernels import available_backends
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.locate import locate_checkpoints, main
from fusion_kernels.merge import main as merge_main


def plain_summary(base: torch.Tensor, tuned: torch.Tensor, axis: str) -> dict:
    """The figures locate reports, written out with plain torch on float64."""
    delta = (tuned.double() - base.double()).abs()
    scores = delta.sum(dim=1 if axis == "row" else 0)
    ranked = scores.sort(descending=True).values
    total = scores.sum().item()
    shares = {
        str(p): ranked[: max(1, int(p / 100 * len(ranked)))].sum().item() / total
        for p in (1, 5, 10, 30)
    }
    ascending = ranked.flip(0)
    n = len(ascending)
    g = (2 * (torch.arange(1, n + 1) * ascending).sum().item() / (n * total)) - (n + 1) / n
    return {"scores": scores, "total": delta.sum().item(), "top_share": shares, "gini": g}


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "triton"])
def test_scores_and_figures_equal_plain_torch(tmp_path, backend):
    base_dir, tuned_dir = tiny_pair(tmp_path / "in")
    result = locate_checkpoints(base_dir, tuned_dir, backend=backend, progress=False)
    base, tuned = Checkpoint(base_dir), Checkpoint(tuned_dir)
    entries = {e["name"]: e for e in result["tensors"]}
    assert set(entries) == set(tuned.names())
    for name, e in entries.items():
        b, t = base.read(name), tuned.read(name)
        assert e["total_abs"] == pytest.approx(
            (t.double() - b.double()).abs().sum().item(), rel=1e-12
        )
        assert e["kept_for_density"]["0.2"] == max(1, int(0.2 * b.numel()))
        if e["axis"] == "none":
            assert "scores" not in e
            continue
        expected = plain_summary(b, t, e["axis"])
        torch.testing.assert_close(
            torch.tensor(e["scores"], dtype=torch.float64), expected["scores"], rtol=1e-12, atol=0
        )
        assert e["gini"] == pytest.approx(expected["gini"], rel=1e-9)
        for p, share in expected["top_share"].items():
            assert e["top_share"][p] == pytest.approx(share, rel=1e-9)


def run_locate_json(base_dir, tuned_dir, out, backend: str) -> dict:
    """locate.json of ``python -m fusion_kernels.locate ... --backend backend`` (run in-process)."""
    args = ["--base", str(base_dir), "--tuned", str(tuned_dir), "--out", str(out), "--quiet"]
    assert main([*args, "--backend", backend]) == 0
    return json.loads((out / "locate.json").read_text())


def assert_same_figures(got, want, where: str = "") -> None:
    """Equal structure, counts and names; floats within 1e-9 relative (see the caller)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_same_figures(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_figures(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), f"{where}: {got} != {want}"
    else:
        assert got == want, where


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(
            "cpp",
            marks=needs_cpp,
        ),
        pytest.param(
            "triton",
            marks=needs_interpreter,
        ),
    ],
)
def test_cli_backend_gives_the_figures_torch_does(tmp_path, backend):
    base_dir, tuned_dir = tiny_pair(tmp_path / "in")
    want = run_locate_json(base_dir, tuned_dir, tmp_path / "torch", "torch")
    got = run_locate_json(base_dir, tuned_dir, tmp_path / backend, backend)
    # The report names the backend whose first pass computed the scores.
    assert (want["backends"], got["backends"]) == (["torch"], [backend])
    del want["backends"], got["backends"]
    # Scores and totals agree to float64 summation order (1e-12, see test_scores.py); shares
    # and the Gini index are ratios and differences of such sums, hence 1e-9.
    assert_same_figures(got, want, "locate.json")


def test_planted_large_change_neurons_rank_first(tmp_path):
    base_dir, tuned_dir = tiny_pair(tmp_path / "in", hidden=64, intermediate=128)
    planted = json.loads((tuned_dir / "planted_neurons.json").read_text())
    result = locate_checkpoints(base_dir, tuned_dir, progress=False)
    entries = {e["name"]: e for e in result["tensors"]}
    for name, neurons in planted.items():
        scores = torch.tensor(entries[name]["scores"])
        top = scores.argsort(descending=True)[: len(neurons)].tolist()
        assert sorted(top) == neurons, name


def test_multimodal_pair_locates_under_the_name_map(tmp_path):
    from test_multimodal import build_pair

    base_dir, tuned_dir = build_pair(tmp_path, "llama", "classic")
    result = locate_checkpoints(base_dir, tuned_dir, progress=False)
    entries = {e["name"]: e for e in result["tensors"]}
    up = entries["language_model.model.layers.0.mlp.up_proj.weight"]
    assert up["base_name"] == "model.layers.0.mlp.up_proj.weight" and up["axis"] == "row"
    assert sorted(torch.tensor(up["scores"]).argsort(descending=True)[:3].tolist()) == [0, 1, 2]
    head = entries["language_model.lm_head.weight"]
    assert head["shape"] == [128, 64], "only the rows base has are located"
    assert not any(n.startswith("vision_tower") for n in entries)


def test_cli_writes_tables_plots_and_a_page_referencing_every_plot(tmp_path, capsys):
    base_dir, tuned_dir = tiny_pair(tmp_path / "in")
    out = tmp_path / "report"
    assert (
        main(["--base", str(base_dir), "--tuned", str(tuned_dir), "--out", str(out), "--quiet"])
        == 0
    )
    pngs = sorted(out.glob("*.png"))
    # 4 C(j) plots (q_proj and up_proj of the first and last layer) + heatmap + 7 module curves.
    assert len(pngs) == 4 + 1 + 7
    page = (out / "index.html").read_text()
    for png in pngs:
        assert matplotlib.image.imread(png).ndim == 3
        assert f'src="{png.name}"' in page
    with open(out / "neurons.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(Checkpoint(tuned_dir).names())
    # The README describes the file as it is: one row per tensor, these columns, no scores.
    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    assert f"one row per tensor (no scores), with the columns `{','.join(rows[0])}`" in readme
    assert "located change in 21 tensors" in capsys.readouterr().out


def test_merge_plots_add_the_per_layer_figure(tmp_path):
    base_dir, tuned_dir = tiny_pair(tmp_path / "in")
    out = tmp_path / "merged"
    assert (
        merge_main(
            [
                "--base",
                str(base_dir),
                "--tuned",
                str(tuned_dir),
                "--out",
                str(out),
                "--plots",
                "--quiet",
            ]
        )
        == 0
    )
    page = (out / "fusion_plots" / "index.html").read_text()
    assert 'src="merge_layers.png"' in page
    assert matplotlib.image.imread(out / "fusion_plots" / "merge_layers.png").ndim == 3


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_locate_exits_130_with_nothing_written(tmp_path, signum):
    # The signal arrives while the checkpoints are being scored (the long part), from the
    # process itself so it lands there however fast the machine is.
    base_dir, tuned_dir = tiny_pair(tmp_path / "in")
    out = tmp_path / "report"
    code = f"""
import os, signal, sys, time
import fusion_kernels.locate as locate

def interrupted(*args, **kwargs):
    os.kill(os.getpid(), {int(signum)})
    time.sleep(30)

locate.locate_checkpoints = interrupted
sys.argv = ["locate", "--base", {str(base_dir)!r}, "--tuned", {str(tuned_dir)!r},
            "--out", {str(out)!r}, "--quiet"]
locate.cli()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["interrupted: no output written"]
    assert not out.exists()


def test_out_is_new_or_an_earlier_report_replaced_whole_with_overwrite(tmp_path, capsys):
    base_dir, tuned_dir = tiny_pair(tmp_path / "in")
    out = tmp_path / "report"
    args = ["--base", str(base_dir), "--tuned", str(tuned_dir), "--out", str(out), "--quiet"]
    # Any other existing directory is not locate's to write into, even with --overwrite.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main([*args, *extra]) == 2
        assert "error: " in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert main([*args, "--overwrite"]) == 0  # an empty directory, as merge's --out allows
    # An earlier report: refused without --overwrite, replaced whole with it.
    assert main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    stale = out / "scores_stale.png"
    stale.write_bytes(b"old picture")
    assert main([*args, "--overwrite", "--plot-tensors", "layers.0.self_attn.q_proj"]) == 0
    assert not stale.exists()
    assert len(list(out.glob("scores_*.png"))) == 1
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_demo_replaces_its_merged_model_only_with_overwrite(tmp_path, capsys):
    demo = tmp_path / "demo"
    assert merge_main(["--demo", str(demo), "--quiet"]) == 0
    (demo / "merged" / "kept.txt").write_text("from the first run")
    assert merge_main(["--demo", str(demo), "--quiet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (demo / "merged" / "kept.txt").exists()
    assert merge_main(["--demo", str(demo), "--quiet", "--overwrite"]) == 0
    assert not (demo / "merged" / "kept.txt").exists()
