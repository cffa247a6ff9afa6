"""Sweeps: grid points merged and evaluated, results.csv, plots, --keep, resume, bad input, and the
Ray executor on a local instance."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from fusion_kernels.demo import PairSpec, generate_pair
from fusion_kernels.errors import FusionError
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.sweep import main, parse_grid, run_sweep

# float32, so that every small change survives rounding and the distances below are strict.
SPEC = PairSpec(
    hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=64, dtype=torch.float32
)
GRID = "method=ties,neu-p-ties;density=0.1,0.5"
EVAL = "test_sweep:distance_to_tuned"
#: Model directories the eval function was called on, in this process.
CALLS: list[str] = []


def distance_to_tuned(model_dir: str) -> dict[str, float]:
    """A cheap eval: L2 distance of the merged weights to tuned, and the fraction kept."""
    CALLS.append(model_dir)
    report = json.loads((Path(model_dir) / "fusion_report.json").read_text())
    merged, tuned = Checkpoint(model_dir), Checkpoint(report["tuned"])
    squares = sum(
        float((merged.read(n).float() - tuned.read(n).float()).pow(2).sum()) for n in tuned.names()
    )
    totals = report["totals"]
    return {"dist": math.sqrt(squares), "kept": totals["kept"] / totals["numel_merged"]}


def returns_a_list(model_dir: str) -> list:
    return [1.0]


def raises(model_dir: str) -> dict:
    raise RuntimeError("the benchmark crashed")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return generate_pair(tmp_path_factory.mktemp("pair"), SPEC)


def read_rows(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (out / "results.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def kept_models(out: Path) -> list[str]:
    models = out / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


def test_grid_is_every_combination_in_order():
    points = parse_grid("method=ties,neu-s-ties; density=0.1,0.2 ;top-neurons=0.3")
    assert [p.key for p in points] == [
        "method=ties,density=0.1,top_neurons=0.3",
        "method=ties,density=0.2,top_neurons=0.3",
        "method=neu-s-ties,density=0.1,top_neurons=0.3",
        "method=neu-s-ties,density=0.2,top_neurons=0.3",
    ]
    params = points[3].params()
    assert (params.suppress, params.restore, params.density) == ("magnitude", "rescale", 0.2)


def test_local_sweep_writes_table_plots_and_keeps_the_best(pair, tmp_path):
    import matplotlib.pyplot as plt

    base, tuned = pair
    out = tmp_path / "sweep"
    CALLS.clear()
    result = run_sweep(base, tuned, out, GRID, EVAL, metric="dist", maximize=False, log=print)
    columns, rows = read_rows(out)
    assert columns == [
        "point",
        "method",
        "density",
        "dist",
        "kept",
        "merge_seconds",
        "eval_seconds",
        "model",
    ]
    assert [r["point"] for r in rows] == [p.key for p in parse_grid(GRID)]
    assert len(CALLS) == 4
    for row in rows:
        assert float(row["merge_seconds"]) > 0 and float(row["eval_seconds"]) >= 0
    # Keeping more of the delta brings the merge closer to tuned; restoring neurons too.
    by_point = {r["point"]: float(r["dist"]) for r in rows}
    best = min(by_point, key=by_point.get)
    assert best == "method=neu-p-ties,density=0.5"
    assert result["best"]["point"] == best
    assert kept_models(out) == ["method-neu-p-ties_density-0.5"]
    assert [r["model"] != "" for r in rows] == [r["point"] == best for r in rows]
    assert sorted(p.name for p in result["plots"]) == ["dist_vs_density.png", "kept_vs_density.png"]
    for path in result["plots"]:
        image = plt.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100


def test_resume_skips_points_already_done(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "sweep"
    CALLS.clear()
    run_sweep(base, tuned, out, "method=ties;density=0.1,0.5", EVAL, keep="none")
    assert len(CALLS) == 2 and kept_models(out) == []
    result = run_sweep(base, tuned, out, GRID, EVAL, keep="all")
    assert result["skipped"] == 2
    assert len(CALLS) == 4, "only the two new points are evaluated"
    _, rows = read_rows(out)
    assert len(rows) == 4
    assert kept_models(out) == ["method-neu-p-ties_density-0.1", "method-neu-p-ties_density-0.5"]
    # Nothing left to evaluate. The first metric (dist) is maximized by default, so the best is
    # the point farthest from tuned: one whose model the --keep none run dropped, merged again.
    argv = ["--base", str(base), "--tuned", str(tuned), "--out", str(out), "--grid", GRID]
    assert main([*argv, "--eval", EVAL]) == 0
    assert len(CALLS) == 4
    assert kept_models(out) == ["method-ties_density-0.1"]
    _, rows = read_rows(out)
    assert [r["model"] != "" for r in rows] == [True, False, False, False]


def test_keep_all_and_none(pair, tmp_path):
    base, tuned = pair
    run_sweep(base, tuned, tmp_path / "all", GRID, EVAL, keep="all")
    assert len(kept_models(tmp_path / "all")) == 4
    assert Checkpoint(tmp_path / "all" / "models" / "method-ties_density-0.1").names()
    run_sweep(base, tuned, tmp_path / "none", GRID, EVAL, keep="none")
    assert kept_models(tmp_path / "none") == []
    _, rows = read_rows(tmp_path / "none")
    assert len(rows) == 4 and all(r["model"] == "" for r in rows)


def test_cli_runs_a_sweep(pair, tmp_path, capsys):
    base, tuned = pair
    out = tmp_path / "sweep"
    args = ["--base", str(base), "--tuned", str(tuned), "--out", str(out)]
    status = main([*args, "--grid", "method=neu-s-ties;top_neurons=0,0.2,0.4", "--eval", EVAL])
    assert status == 0
    text = capsys.readouterr().out
    assert "[3/3] method=neu-s-ties,top_neurons=0.4: dist=" in text
    assert (out / "plots" / "dist_vs_top_neurons.png").exists()
    status = main([*args, "--grid", "method=ties,dare", "--eval", EVAL, "--metric", "kept"])
    assert status == 0
    assert (out / "plots" / "kept_by_point.png").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--grid", "density"], "must look like name=value1,value2"),
        (["--grid", "density=0.1,"], "must look like name=value1,value2"),
        (["--grid", "densty=0.1"], "unknown parameter 'densty'"),
        (["--grid", "method=tis"], "unknown method 'tis'"),
        (["--grid", "density=abc"], "density cannot be 'abc'"),
        (["--grid", "density=0.1;density=0.2"], "names 'density' twice"),
        (["--grid", "density=0.1,0.10"], "repeats a value"),
        (["--grid", "method=della;density=0.1"], "--grid point method=della,density=0.1: della"),
        (["--grid", "density=1.5"], "density must be in [0, 1]"),
        (["--eval", "test_sweep.distance_to_tuned"], "must look like MODULE:FUNCTION"),
        (["--eval", "no_such_module:f"], "cannot import no_such_module"),
        (["--eval", "test_sweep:nothing"], "test_sweep has no 'nothing'"),
        (["--eval", "test_sweep:SPEC"], "is not a function"),
        (["--eval", "test_sweep:returns_a_list"], "returned list; expected a non-empty dict"),
        (["--eval", "test_sweep:raises"], "failed on density=0.1: RuntimeError: the benchmark"),
        (["--metric", "accuracy"], "--metric accuracy: the eval function returned ['dist'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(pair, tmp_path, capsys, extra, message):
    base, tuned = pair
    args = {"--grid": "density=0.1", "--eval": EVAL}
    args.update(dict(zip(extra[::2], extra[1::2], strict=True)))
    argv = ["--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "o")]
    status = main(argv + [item for pair_ in args.items() for item in pair_])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_out_must_be_a_sweep_of_the_same_inputs(pair, tmp_path, capsys):
    base, tuned = pair
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    argv = ["--base", str(base), "--tuned", str(tuned), "--grid", "density=0.1", "--eval", EVAL]
    assert main([*argv, "--out", str(tmp_path / "busy")]) == 2
    assert "exists and is not a sweep" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    swapped = ["--base", str(tuned), "--tuned", str(base), "--grid", "density=0.1"]
    assert main([*swapped, "--eval", EVAL, "--out", str(tmp_path / "s")]) == 2
    assert "holds a sweep with another base, tuned" in capsys.readouterr().err
    assert main([*argv, "--out", str(base / "sweep")]) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert main([*argv, "--base", str(tmp_path / "missing"), "--out", str(tmp_path / "t")]) == 2


def test_ray_executor_without_ray_names_the_extra(pair, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    base, tuned = pair
    with pytest.raises(FusionError, match=r"pip install 'fusion_kernels\[ray\]'"):
        run_sweep(base, tuned, tmp_path / "o", "density=0.1", EVAL, executor="ray")


def test_ray_executor_on_a_local_instance(pair, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'fusion_kernels[ray]'")
    pytest.importorskip("ray.tune", reason="the ray executor needs ray[tune]")
    base, tuned = pair
    out = tmp_path / "sweep"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep(
            base,
            tuned,
            out,
            "method=ties,neu-p-ties;density=0.5",
            EVAL,
            executor="ray",
            metric="dist",
            maximize=False,
        )
        # A point that fails in a worker is reported with the worker's own message.
        with pytest.raises(FusionError, match=r"2 of 2 points failed; first: .*benchmark crashed"):
            run_sweep(
                base,
                tuned,
                tmp_path / "failing",
                "density=0.1,0.2",
                "test_sweep:raises",
                executor="ray",
            )
    finally:
        ray.shutdown()
    _, rows = read_rows(out)
    assert sorted(r["point"] for r in rows) == [
        "method=neu-p-ties,density=0.5",
        "method=ties,density=0.5",
    ]
    assert result["best"]["point"] == "method=neu-p-ties,density=0.5"
    assert kept_models(out) == ["method-neu-p-ties_density-0.5"]
    # Resuming finds nothing left to do and does not start Ray at all.
    again = run_sweep(base, tuned, out, "method=ties,neu-p-ties;density=0.5", EVAL, executor="ray")
    assert again["skipped"] == 2
