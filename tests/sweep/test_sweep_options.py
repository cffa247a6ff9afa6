"""The merge options a sweep shares with merge (--set, --map, --layer-map, --allow-unpaired,
sizes, --no-model-card), taking over a sweep with no point done, and results in grid order."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file
from test_sweep import EVAL, SPEC, kept_models, read_rows

from fusion_kernels.demo import generate_pair
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.sweep import main, run_sweep
from fusion_kernels.sweep.results import Keeper, Results

GRID = "density=0.1,0.5"


def same_score(model_dir: str) -> dict[str, float]:
    """Every point scores the same: the best is decided by the tie-break alone."""
    return {"score": 1.0}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return generate_pair(tmp_path_factory.mktemp("pair"), SPEC)


@pytest.fixture(scope="module")
def wrapped(pair, tmp_path_factory):
    """A tuned checkpoint holding the language model twice, under ``a.`` and ``b.``: which one
    pairs with base only ``--map`` can say."""
    tuned = Checkpoint(pair[1])
    weights = {f"{p}.{n}": tuned.read(n).clone() for p in "ab" for n in tuned.names()}
    directory = tmp_path_factory.mktemp("wrapped")
    save_file(weights, str(directory / "model.safetensors"))
    return pair[0], directory


def sweep_args(base, tuned, out, *extra: str) -> list[str]:
    return ["--base", str(base), "--tuned", str(tuned), "--out", str(out), *extra]


def test_a_pair_that_needs_map_is_swept_with_map(wrapped, tmp_path, capsys):
    base, tuned = wrapped
    args = sweep_args(base, tuned, tmp_path / "s", "--grid", GRID, "--eval", EVAL)
    assert main(args) == 2
    assert "say which with --map" in capsys.readouterr().err
    assert main([*args, "--map", "a.=", "--keep", "all"]) == 0
    for model in kept_models(tmp_path / "s"):
        report = json.loads((tmp_path / "s" / "models" / model / "fusion_report.json").read_text())
        assert report["name_map"]["rules"] == [{"tuned": "a.", "base": ""}]
    record = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert record["map"] == ["a.="]


def test_merge_options_reach_every_point(pair, tmp_path):
    base, tuned = pair
    extra = ["--set", "self_attn:density=0.9", "--neuron-rule", "o_proj=none", "--no-model-card"]
    extra += ["--max-shard-size", "20KB", "--memory-budget", "1MiB", "--layer-map", "identity"]
    out = tmp_path / "s"
    assert (
        main(sweep_args(base, tuned, out, "--grid", GRID, "--eval", EVAL, "--keep", "all", *extra))
        == 0
    )
    for model in kept_models(out):
        directory = out / "models" / model
        report = json.loads((directory / "fusion_report.json").read_text())
        assert report["param_overrides"] == [{"pattern": "self_attn", "density": 0.9}]
        assert {"pattern": "o_proj", "axis": "none"} in report["neuron_rules"]
        assert report["memory_budget"] == 2**20
        assert not (directory / "README.md").exists()
        assert len(list(directory.glob("*.safetensors"))) > 1


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--memory-budget", "12XB"], "argument --memory-budget: size '12XB' must look like 5GB"),
        (["--max-shard-size", "0"], "argument --max-shard-size: size '0' must be positive"),
        (["--set", "self_attn:densty=0.3"], "densty"),
        (["--set", "self_attn:density=2"], "density must be in [0, 1]"),
        (["--map", "nothing.=model."], "--map nothing.=model. pairs no tuned tensor"),
        (["--layer-map", "0,0"], "--layer-map"),
        (["--backend", "fortran"], "argument --backend: invalid choice: 'fortran'"),
    ],
)
def test_bad_merge_options_are_one_line_before_any_merge(pair, tmp_path, capsys, extra, message):
    base, tuned = pair
    out = tmp_path / "s"
    assert main(sweep_args(base, tuned, out, "--grid", GRID, "--eval", EVAL, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err
    assert not (out / "models").exists()


def test_base_help_is_merges(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Hub id ORG/NAME[@REV]" in text and "MODEL+LORA_ADAPTER" in text


def test_a_sweep_with_no_point_done_is_taken_over(pair, tmp_path, capsys):
    base, tuned = pair
    out = tmp_path / "s"
    args = sweep_args(base, tuned, out, "--grid", GRID)
    assert main([*args, "--eval", "test_sweep:raises"]) == 2
    assert "benchmark crashed" in capsys.readouterr().err
    # Nothing was scored, so nothing binds the directory to the failed run's options.
    assert main([*args, "--eval", EVAL]) == 0
    assert json.loads((out / "sweep.json").read_text())["eval"] == EVAL
    # With points done, another scorer is refused, and the message says how to go on.
    assert main([*args, "--eval", "test_sweep_options:same_score"]) == 2
    err = capsys.readouterr().err
    assert "and 2 points done; rerun with its options to resume it, or choose another" in err


def test_results_are_in_grid_order_and_ties_go_to_the_first_point(pair, tmp_path, monkeypatch):
    from fusion_kernels.sweep import job, ray_executor

    def finishing_last_first(job_, todo, record, *resources):
        for point in reversed(todo):
            record(job.run_point(job_, point))

    monkeypatch.setattr(ray_executor, "run_ray", finishing_last_first)
    base, tuned = pair
    out = tmp_path / "s"
    grid = "density=0.1,0.2,0.3"
    result = run_sweep(base, tuned, out, grid, "test_sweep_options:same_score", executor="ray")
    _, rows = read_rows(out)
    assert [r["point"] for r in rows] == ["density=0.1", "density=0.2", "density=0.3"]
    assert result["best"]["point"] == "density=0.1"
    assert kept_models(out) == ["density-0.1"]


def test_results_table_orders_rows_by_grid_and_keeps_foreign_ones_last(tmp_path):
    path = tmp_path / "results.csv"
    results = Results(path, ["p=1", "p=2", "p=3"])
    keeper = Keeper(results, "all", "score", True)
    for key in ["old", "p=3", "p=1", "p=2"]:
        keeper.add({"point": key, "score": 1.0, "model": ""})
    assert list(Results(path, ["p=1", "p=2", "p=3"]).rows) == ["p=1", "p=2", "p=3", "old"]
    assert keeper.best()["point"] == "p=1"
