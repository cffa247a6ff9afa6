"""The sweep with several scorers: LA and VA hooks combined into OA, the best point by OA, the
trade-off scatter and page, scores in every kept model and its card, identity and bad input.
The scorers are cheap stand-ins: closeness of the merged weights to base (LA) and to tuned (VA),
which pull against each other as the paper's two abilities do."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from fusion_kernels.demo import PairSpec, generate_pair
from fusion_kernels.errors import FusionError
from fusion_kernels.evaluation.scores_card import SCORES_NAME
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.modelcard import TUNED_CARD_HEADING
from fusion_kernels.sweep import main, run_sweep

SPEC = PairSpec(
    hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=64, dtype=torch.float32
)
GRID = "method=ties,neu-p-ties;density=0.1,0.5"
LA_VA = ["test_sweep_objective:language", "test_sweep_objective:vision"]


def _closeness(model_dir: str, other: str) -> float:
    merged, reference = Checkpoint(model_dir), Checkpoint(other)
    squares = sum(
        float((merged.read(n).float() - reference.read(n).float()).pow(2).sum())
        for n in reference.names()
    )
    return 1 / (1 + math.sqrt(squares))


def language(model_dir: str) -> dict[str, float]:
    report = json.loads((Path(model_dir) / "fusion_report.json").read_text())
    return {"LA": _closeness(model_dir, report["base"])}


def vision(model_dir: str) -> dict[str, float]:
    report = json.loads((Path(model_dir) / "fusion_report.json").read_text())
    return {"VA": _closeness(model_dir, report["tuned"])}


def also_la(model_dir: str) -> dict[str, float]:
    return {"LA": 1.0}


def vision_first(scores: dict[str, float]) -> float:
    return 0.9 * scores["VA"] + 0.1 * scores["LA"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base, tuned = generate_pair(tmp_path_factory.mktemp("pair"), SPEC)
    (tuned / "README.md").write_text("# tuned model\n")
    return base, tuned


def read_rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_la_and_va_make_oa_and_the_tradeoff(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "sweep"
    result = run_sweep(base, tuned, out, GRID, LA_VA, keep="all", log=print)
    rows = read_rows(out)
    assert list(rows[0])[:6] == ["point", "method", "density", "LA", "VA", "OA"]
    for row in rows:
        la, va = float(row["LA"]), float(row["VA"])
        assert float(row["OA"]) == (la + va) / 2
    # Keeping more of the delta moves the merge from base towards tuned: LA falls as VA rises.
    ties = [r for r in rows if r["method"] == "ties"]
    assert float(ties[0]["LA"]) > float(ties[1]["LA"]) and float(ties[0]["VA"]) < float(
        ties[1]["VA"]
    )
    best = max(rows, key=lambda r: float(r["OA"]))
    assert result["best"]["point"] == best["point"]
    assert result["tradeoff"] == out / "plots" / "tradeoff_LA_vs_VA.png"
    assert result["page"] == out / "index.html"
    # --keep all: every model carries its own scores, and its model card (which keeps the tuned
    # model's card under a heading) says so.
    for row in rows:
        record = json.loads((Path(row["model"]) / SCORES_NAME).read_text())
        assert record["metrics"] == {m: float(row[m]) for m in ("LA", "VA", "OA")}
        assert record["is_best"] == (row is best or row["point"] == best["point"])
        card = (Path(row["model"]) / "README.md").read_text()
        assert card.startswith("---\n") and f"{TUNED_CARD_HEADING}\n\n# tuned model\n" in card
        assert card.count("## Sweep scores") == 1 and f"`{row['point']}`" in card
    assert (tuned / "README.md").read_text() == "# tuned model\n", "inputs are only read"


def test_user_objective_and_named_axes(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "sweep"
    result = run_sweep(
        base,
        tuned,
        out,
        GRID,
        LA_VA,
        objective="test_sweep_objective:vision_first",
        tradeoff="VA,LA",
        keep="best",
    )
    rows = read_rows(out)
    for row in rows:
        assert float(row["OA"]) == vision_first({"LA": float(row["LA"]), "VA": float(row["VA"])})
    assert result["best"]["point"] == max(rows, key=lambda r: float(r["OA"]))["point"]
    assert result["tradeoff"].name == "tradeoff_VA_vs_LA.png"
    kept = [r for r in rows if r["model"]]
    assert len(kept) == 1 and json.loads((Path(kept[0]["model"]) / SCORES_NAME).read_text())
    # Another objective on the same --out would mix two definitions of OA.
    with pytest.raises(FusionError, match="holds a sweep with another objective"):
        run_sweep(base, tuned, out, GRID, LA_VA, objective="LA,VA")


def test_without_la_and_va_there_is_no_tradeoff_but_a_page(pair, tmp_path):
    base, tuned = pair
    lines: list[str] = []
    result = run_sweep(base, tuned, tmp_path / "s", "density=0.1,0.5", LA_VA[:1], log=lines.append)
    assert result["tradeoff"] is None
    assert any("no trade-off plot: name its two metrics with --tradeoff" in x for x in lines)
    page = result["page"].read_text()
    assert 'src="plots/LA_vs_density.png"' in page and "tradeoff" not in page


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--objective", "LA,,VA"], "--objective 'LA,,VA' must be METRIC"),
        (["--objective", "LA,vqa"], "--objective LA,vqa: no metric 'vqa'"),
        (["--tradeoff", "LA"], "--tradeoff 'LA' must name two metrics"),
        (["--eval-arg", "limit=3"], "sets a built-in scorer's option"),
        (["--eval", "lm-eval:"], "must look like lm-eval:TASK"),
        (["--eval", "test_sweep_objective:also_la"], "'LA' comes from both"),
        (["--eval", LA_VA[0]], f"--eval names {LA_VA[0]!r} twice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(pair, tmp_path, capsys, extra, message):
    base, tuned = pair
    argv = ["--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "o")]
    argv += ["--grid", "density=0.1", "--eval", LA_VA[0], *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("error: ")


@pytest.mark.slow
def test_ray_workers_load_combined_scorers_and_the_objective(pair, tmp_path):
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
            LA_VA,
            objective="test_sweep_objective:vision_first",
            executor="ray",
        )
    finally:
        ray.shutdown()
    rows = read_rows(out)
    assert sorted(r["point"] for r in rows) == [
        "method=neu-p-ties,density=0.5",
        "method=ties,density=0.5",
    ]
    for row in rows:
        assert float(row["OA"]) == vision_first({"LA": float(row["LA"]), "VA": float(row["VA"])})
    assert result["best"]["point"] == max(rows, key=lambda r: float(r["OA"]))["point"]
