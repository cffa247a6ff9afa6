"""The trade-off and its pieces: Pareto front, axes, objective (OA), combined evaluators, the
scatter, scores carried by kept models, reference points and the sweep page."""

from __future__ import annotations

import builtins
import json
import math
import random

import pytest

from fusion_kernels.errors import FusionError, ParameterError
from fusion_kernels.evaluation.hooks import Combined, join_specs, split_specs
from fusion_kernels.evaluation.objective import Objective, parse_objective
from fusion_kernels.evaluation.page import write_sweep_page
from fusion_kernels.evaluation.references import score_inputs
from fusion_kernels.evaluation.scores_card import SCORES_NAME, write_scores
from fusion_kernels.evaluation.tradeoff import (
    draw_tradeoff,
    pareto_front,
    parse_tradeoff,
    point_label,
    tradeoff_axes,
)

NAN = math.nan


def mean_of_squares(scores: dict[str, float]) -> float:
    """A user objective for the tests."""
    return (scores["LA"] ** 2 + scores["VA"] ** 2) / 2


def test_pareto_front_by_hand():
    xs = [0.1, 0.5, 0.3, 0.5, 0.2, NAN, 0.9]
    ys = [0.9, 0.5, 0.4, 0.5, 0.8, 1.0, 0.1]
    # 2 is dominated by 1; 3 ties 1 exactly and counts once (the first); 5 has no x.
    assert pareto_front(xs, ys) == [0, 4, 1, 6]
    assert pareto_front([0.5], [0.5]) == [0]
    assert pareto_front([], []) == []
    assert pareto_front([0.2, 0.2], [0.3, 0.4]) == [1]


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_is_exactly_the_undominated_points(seed):
    rng = random.Random(seed)
    points = [(rng.randint(0, 6) / 6, rng.randint(0, 6) / 6) for _ in range(25)]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    front = pareto_front(xs, ys)
    for i, (x, y) in enumerate(points):
        beaten = any(a >= x and b >= y and (a, b) != (x, y) for a, b in points)
        first = points.index((x, y)) == i
        assert (i in front) == (not beaten and first), (i, points[i])
    assert [xs[i] for i in front] == sorted(xs[i] for i in front)


def test_tradeoff_axes():
    default = Objective(None)
    assert parse_tradeoff("acc , vqa") == ("acc", "vqa")
    assert tradeoff_axes(("acc", "vqa"), ["acc", "vqa", "LA", "VA"], default) == ("acc", "vqa")
    assert tradeoff_axes(None, ["x", "VA", "LA"], default) == ("LA", "VA")
    two = parse_objective("a/acc,vqa")
    assert tradeoff_axes(None, ["a/acc", "vqa"], two) == ("a/acc", "vqa")
    assert tradeoff_axes(None, ["a/acc", "vqa", "z"], parse_objective("a/acc,vqa,z")) is None
    # Axes the evaluators did not return fall back to the defaults.
    assert tradeoff_axes(("p", "q"), ["LA", "VA"], default) == ("LA", "VA")
    for bad in ("acc", "acc,acc", "a,b,c", "a,"):
        with pytest.raises(ParameterError, match="must name two metrics"):
            parse_tradeoff(bad)


def test_objective_mean_function_and_default():
    scores = {"LA": 0.5, "VA": 0.25, "t/acc": 0.5}
    assert parse_objective(None)(scores) == {"OA": 0.375}
    assert parse_objective(None)({"LA": 0.5}) == {}
    assert parse_objective(None)({**scores, "OA": 0.9}) == {}, "an OA of the evaluators stays"
    assert parse_objective("t/acc, VA")(scores) == {"OA": 0.375}
    assert parse_objective("test_tradeoff:mean_of_squares")(scores) == {"OA": 0.15625}
    with pytest.raises(ParameterError, match=r"no metric 'vqa'; the evaluators returned"):
        parse_objective("LA,vqa")(scores)
    with pytest.raises(FusionError, match="already return OA"):
        parse_objective("LA,VA")({**scores, "OA": 1.0})
    with pytest.raises(FusionError, match="returned 'high', not a number"):
        Objective("m:f", function=lambda s: "high")(scores)
    with pytest.raises(FusionError, match="--objective m:f failed: KeyError: 'vqa'"):
        Objective("m:f", function=lambda s: s["vqa"])(scores)
    for bad, message in [
        ("LA,,VA", "must be METRIC"),
        ("LA,LA", "must be METRIC"),
        ("LA,OA", "cannot average OA"),
        ("no_such_module:f", "--objective 'no_such_module:f': cannot import"),
        ("test_tradeoff:missing", "has no 'missing'"),
    ]:
        with pytest.raises(ParameterError, match=message):
            parse_objective(bad)


def test_combined_evaluators():
    assert split_specs(join_specs(["lm-eval:a,b", "m:f"])) == ["lm-eval:a,b", "m:f"]
    combined = Combined((("one:f", lambda d: {"LA": 1.0}), ("two:g", lambda d: {"VA": 0.5})))
    assert combined("dir") == {"LA": 1.0, "VA": 0.5}
    clash = Combined((("one:f", lambda d: {"x": 1}), ("two:g", lambda d: {"x": 2})))
    with pytest.raises(FusionError, match="'x' comes from both one:f and two:g"):
        clash("dir")
    with pytest.raises(FusionError, match="two:g returned list"):
        Combined((("two:g", lambda d: [1]),))("dir")
    with pytest.raises(FusionError, match="two:g: ZeroDivisionError"):
        Combined((("two:g", lambda d: 1 / 0),))("dir")


ROWS = [
    {
        "point": "method=ties,density=0.1",
        "method": "ties",
        "density": "0.1",
        "LA": "0.6",
        "VA": "0.2",
    },
    {
        "point": "method=ties,density=0.5",
        "method": "ties",
        "density": "0.5",
        "LA": "0.4",
        "VA": "0.5",
    },
    {
        "point": "method=neu,density=0.1",
        "method": "neu",
        "density": "0.1",
        "LA": "0.3",
        "VA": "0.3",
    },
]


def test_point_labels_show_what_varies():
    assert point_label(ROWS[0], ["method", "density"]) == "ties, density=0.1"
    assert point_label(ROWS[0], []) == "method=ties,density=0.1"


def test_scatter_is_drawn_with_references_and_best(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    references = [
        {"point": "base", "LA": 0.7},
        {"point": "tuned", "LA": 0.2, "VA": 0.6},
    ]
    path = draw_tradeoff(
        ROWS,
        ["method", "density"],
        ("LA", "VA"),
        tmp_path / "plots" / "t.png",
        references=references,
        best=ROWS[1]["point"],
        best_metric="OA",
    )
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300


def test_scatter_without_matplotlib_is_skipped_with_a_reason(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    lines: list[str] = []
    assert draw_tradeoff(ROWS, [], ("LA", "VA"), tmp_path / "t.png", log=lines.append) is None
    assert lines and "fusion_kernels[plots]" in lines[0]
    assert not (tmp_path / "t.png").exists()


def test_kept_models_carry_their_scores(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    card = model / "README.md"
    card.write_text("---\nbase_model: x\n---\n# A merge\n")
    row = {**ROWS[1], "OA": "0.45"}
    path = write_scores(
        model,
        row,
        ["method", "density"],
        ["LA", "VA", "OA"],
        best_by="OA",
        is_best=True,
        evaluators="lm-eval:t + m:va",
    )
    assert path == model / SCORES_NAME
    record = json.loads(path.read_text())
    assert record["metrics"] == {"LA": 0.4, "VA": 0.5, "OA": 0.45}
    assert record["parameters"] == {"method": "ties", "density": "0.5"}
    first = card.read_text()
    assert first.startswith("---\nbase_model: x\n---\n# A merge\n\n")
    assert "## Sweep scores" in first and "| OA | 0.45 |" in first and "the best by OA" in first
    write_scores(
        model, {**row, "OA": "0.5"}, [], ["OA"], best_by="OA", is_best=False, evaluators="e"
    )
    second = card.read_text()
    assert second.count("## Sweep scores") == 1 and "| OA | 0.5 |" in second
    assert "the best by" not in second


def test_references_keep_what_could_be_scored(tmp_path):
    calls: list[str] = []

    def language(model_dir):
        calls.append(model_dir)
        return {"LA": 0.5}

    def visual(model_dir):
        if model_dir == "base-dir":
            raise ValueError("no vision tower")
        return {"VA": 0.8}

    evaluate = Combined((("lang:f", language), ("vis:g", visual)))
    path, log = tmp_path / "references.json", []
    inputs = {"base": "base-dir", "tuned": "tuned-dir"}
    rows = score_inputs(inputs, evaluate, "lang:f + vis:g", Objective(None), path, log.append)
    assert rows[0]["LA"] == 0.5 and "VA" not in rows[0] and "OA" not in rows[0]
    assert rows[0]["failed"] == {"vis:g": "ValueError: no vision tower"}
    assert rows[1]["OA"] == (0.5 + 0.8) / 2 and rows[1]["failed"] == {}
    assert any("vis:g did not score it" in line for line in log)
    again = score_inputs(inputs, evaluate, "lang:f + vis:g", Objective(None), path)
    assert again == rows and calls == ["base-dir", "tuned-dir"], "scored once per sweep"


def test_page_links_figures_relative_to_the_sweep(tmp_path):
    (tmp_path / "plots").mkdir()
    figure = tmp_path / "plots" / "tradeoff_LA_vs_VA.png"
    page = write_sweep_page(
        tmp_path,
        {"base": "/m/base", "tuned": "/m/<tuned>"},
        ["point", "LA", "VA"],
        ROWS,
        [(figure, "trade-off")],
        references=[{"point": "base", "LA": 0.71234567}],
        best=ROWS[1]["point"],
        best_metric="OA",
    ).read_text()
    assert 'src="plots/tradeoff_LA_vs_VA.png"' in page
    assert "/m/&lt;tuned&gt;" in page
    assert '<tr class="best"><td>method=ties,density=0.5</td>' in page
    assert '<tr class="ref"><td>base</td><td>0.712346</td><td></td></tr>' in page
