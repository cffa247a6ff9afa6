"""The paper miniature, reduced: the script trains, forgets, merges and reports; its evaluation is
the sweep's built-in example. Which method wins is the experiment's outcome, not asserted here."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="installed by the test extra")
pytest.importorskip("matplotlib", reason="installed by the test extra")

from fusion_kernels import PRESETS
from fusion_kernels.errors import FusionError
from fusion_kernels.experiments import miniature
from fusion_kernels.sweep import run_sweep

SCRIPT = Path(__file__).parents[2] / "examples" / "paper_miniature.py"
TABLE_ROWS = [
    "MLLM (tuned)",
    "LLM (base)",
    "Task Ari",
    "TIES",
    "Breadcrumbs",
    "DARE",
    "DELLA",
    "Neu-P-TaskA",
    "Neu-P-TIES",
    "Neu-S-TIES",
    "Neu-P-Bread",
    "Neu-S-Bread",
]
FIGURES = ["fig6_la_vs_density.png", "fig7_va_vs_density.png", "fig8_neu_s_ties_vs_m.png"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("miniature")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(workdir), "--quick"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir, done.stdout


def table(workdir: Path) -> dict[str, tuple[float, float, float]]:
    rows = {}
    for line in (workdir / "table.md").read_text().splitlines()[2:]:
        name, *values = (cell.strip() for cell in line.strip("|").split("|"))
        rows[name] = tuple(float(v) for v in values)
    return rows


def test_tuning_forgets_language_and_learns_vision(quick_run):
    workdir, _ = quick_run
    rows = table(workdir)
    tuned_la, tuned_va, _ = rows["MLLM (tuned)"]
    base_la, base_va, _ = rows["LLM (base)"]
    assert tuned_la < base_la - 5, "visual tuning should cost language ability"
    assert tuned_va > base_va + 20, "visual tuning should teach the visual task"


def test_table_has_the_papers_rows_and_oa_is_the_mean(quick_run):
    workdir, stdout = quick_run
    rows = table(workdir)
    assert list(rows) == TABLE_ROWS
    for la, va, oa in rows.values():
        assert 0 <= la <= 100 and 0 <= va <= 100
        assert oa == pytest.approx((la + va) / 2, abs=0.011)
    assert (workdir / "table.md").read_text() in stdout


def test_results_and_figures_are_written(quick_run):
    import matplotlib.pyplot as plt

    workdir, _ = quick_run
    with (workdir / "results.csv").open(newline="") as handle:
        results = list(csv.DictReader(handle))
    labels = {r["label"] for r in results}
    assert {"Neu-S-TIES M=0.0", "TIES K=0.1", "DELLA K=0.1"} <= labels
    for name in FIGURES:
        image = plt.imread(workdir / name)
        assert image.ndim == 3 and image.shape[1] > 300, name
    # The table's merges are kept; the sweeps' (and the hard merge of the LLM row) are not.
    kept = sorted(p.name for p in (workdir / "merged").iterdir())
    assert kept == sorted(preset for preset in PRESETS if preset != "neuron_fusion")


def test_evaluate_is_the_sweeps_built_in_example(quick_run, tmp_path):
    workdir, _ = quick_run
    metrics = miniature.evaluate(workdir / "tuned")
    assert list(metrics) == ["LA", "VA", "OA"]
    result = run_sweep(
        workdir / "base",
        workdir / "tuned",
        tmp_path / "sweep",
        "method=ties;density=0.2,0.9",
        "fusion_kernels.experiments.miniature:evaluate",
        metric="OA",
    )
    by_point = {r["point"]: r for r in result["rows"]}
    # The same merge as the script's TIES row gives the same scores.
    assert by_point["method=ties,density=0.2"]["LA"] == table(workdir)["TIES"][0]
    assert {p.name for p in result["plots"]} == {f"{m}_vs_density.png" for m in ("LA", "VA", "OA")}


def test_evaluate_refuses_models_it_cannot_score(quick_run, tmp_path):
    workdir, _ = quick_run
    with pytest.raises(FusionError, match="no patch tokens"):
        miniature.evaluate(workdir / "base")
    with pytest.raises(FusionError, match=r"miniature\.json is missing"):
        miniature.evaluate(tmp_path)


def test_a_second_run_reuses_the_trained_models(quick_run):
    workdir, _ = quick_run
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(workdir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    assert "reusing base/ and tuned/" in done.stdout
    assert (workdir / "table.md").read_text() in done.stdout, "same models, same merges, same table"
