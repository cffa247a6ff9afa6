"""End to end: the paper's measurement on a tiny LLaVA built on a tiny Llama, with no device named
anywhere: LA from a local text task through lm-evaluation-harness, VA from a local image task
through lmms-eval's command line, OA their mean, for every grid point and both references; the
kept model re-scored by each harness directly gives the numbers in results.csv; the inputs are
left byte-identical. A stand-in lmms-eval runs where the real one is not installed; the real one
runs when ``LMMS_EVAL_PYTHON`` names a Python that has it (``make test`` sets it)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
from lm_eval_tasks import TASK, scoreable_pair, write_tasks
from lmms_eval_fake import ERROR, FAIL_TASK, fake_calls, fake_python, fake_score
from lmms_eval_fake import TASK as FAKE_TASK
from test_sweep_lm_eval import llava_around, tree_digest

from fusion_kernels.evaluation.scores_card import SCORES_NAME
from fusion_kernels.sweep import main

pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install 'fusion_kernels[eval]'")

GRID = "method=ties;density=0.05,0.2,0.5,1.0"
#: Densities at which the taught LLaVA's merges keep 1/4, 2/4, 3/4 and all of its answers.
TAUGHT_GRID = "method=ties;density=0.01,0.03,0.05,1.0"
LMMS_EVAL_PYTHON = os.environ.get("LMMS_EVAL_PYTHON", "")


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def sweep_argv(base, tuned, out, text_tasks, visual, *more, grid=GRID) -> list[str]:
    """A 4-point sweep scored by lm-eval (LA) and lmms-eval (VA), no device given."""
    return [
        *("--base", str(base), "--tuned", str(tuned), "--out", str(out), "--grid", grid),
        *("--eval", f"lm-eval:{TASK}", "--eval", f"lmms-eval:{visual}", "--score-inputs"),
        *(
            "--eval-arg",
            f"lm-eval:include_path={text_tasks}",
            "--eval-arg",
            "include_defaults=false",
        ),
        *more,
    ]


def assert_both_halves(out: Path, visual_metric: str) -> list[dict[str, str]]:
    """results.csv and references.json hold LA, VA and OA = (LA + VA) / 2 everywhere."""
    columns, rows = read_rows(out / "results.csv")
    assert [c for c in columns if "/" in c or c in ("LA", "VA", "OA")] == [
        *(f"{TASK}/acc", "LA", visual_metric, "VA", "OA")
    ]
    assert len(rows) == 4
    references = json.loads((out / "references.json").read_text())
    assert sorted(references) == ["base", "tuned"]
    for row in [*rows, *references.values()]:
        la, va = float(row["LA"]), float(row["VA"])
        assert float(row["OA"]) == (la + va) / 2 and va == float(row[visual_metric])
    # The base, a language model, is scored for VA in the merged models' frame.
    assert references["base"]["scored"][f"lmms-eval:{visual_metric.split('/')[0]}"] == str(
        out / "references" / "base_multimodal"
    )
    assert f"lmms-eval:{visual_metric.split('/')[0]}" not in references["tuned"]["scored"]
    page = (out / "index.html").read_text()
    assert 'src="plots/tradeoff_LA_vs_VA.png"' in page and "<th>VA</th>" in page
    [kept] = [r for r in rows if r["model"]]
    card = json.loads((Path(kept["model"]) / SCORES_NAME).read_text())["metrics"]
    assert {m: card[m] for m in ("LA", "VA", "OA")} == {
        m: float(kept[m]) for m in ("LA", "VA", "OA")
    }
    return rows


@pytest.mark.slow
def test_la_va_oa_with_a_stand_in_lmms_eval(tmp_path, capsys):
    base, _ = scoreable_pair(tmp_path / "pair")
    tuned = llava_around(base, tmp_path / "llava")
    text_tasks = write_tasks(tmp_path / "tasks")
    python = fake_python(tmp_path / "fake")
    before = tree_digest(base), tree_digest(tuned)
    out = tmp_path / "sweep"
    argv = sweep_argv(base, tuned, out, text_tasks, FAKE_TASK, "--eval-arg", f"python={python}")
    assert main(argv) == 0
    rows = assert_both_halves(out, f"{FAKE_TASK}/exact_match")
    best = max(rows, key=lambda r: float(r["OA"]))
    assert float(best["VA"]) == fake_score(Path(best["model"]))
    assert len({r["VA"] for r in rows}) == 4
    # lmms-eval ran the merged models themselves (not their text export) on the CPU.
    scored = [c[c.index("--model_args") + 1] for c in fake_calls(python)]
    assert all(s.endswith(",device=cpu,device_map=cpu") for s in scored)
    assert f"pretrained={best['model']},device=cpu,device_map=cpu" in scored
    assert f"pretrained={tuned},device=cpu,device_map=cpu" in scored
    assert (tree_digest(base), tree_digest(tuned)) == before
    # A failed evaluation is one line naming lmms-eval's own error.
    capsys.readouterr()
    failing = sweep_argv(base, tuned, tmp_path / "failing", text_tasks, FAIL_TASK)
    assert main([*failing, "--eval-arg", f"python={python}"]) == 2
    *progress, line = capsys.readouterr().err.strip().splitlines()  # lm-eval's progress bars
    assert not any(p.startswith("error:") or "Traceback" in p for p in progress)
    assert line.startswith("error: --eval ") and line.endswith(ERROR)


def test_a_family_lmms_eval_cannot_load_is_refused_before_any_merge(tmp_path, capsys):
    base, tuned = scoreable_pair(tmp_path / "pair")
    python = fake_python(tmp_path / "fake")
    out = tmp_path / "sweep"
    argv = [
        *("--base", str(base), "--tuned", str(tuned), "--out", str(out), "--grid", GRID),
        *("--eval", f"lmms-eval:{FAKE_TASK}", "--eval-arg", f"python={python}"),
    ]
    assert main(argv) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --eval lmms-eval:") and "loads no llama model" in line
    assert "families llava, llava_next" in line and "lmms-eval:model=NAME" in line
    assert not out.exists() and fake_calls(python) == []


def lmms_eval_cli(model: Path, tasks: Path, task: str, out: Path) -> float:
    """``task``'s exact match for ``model``, from lmms-eval's own command line."""
    subprocess.run(
        [
            *(LMMS_EVAL_PYTHON, "-m", "lmms_eval", "--model", "llava_hf", "--tasks", task),
            *("--model_args", f"pretrained={model},device=cpu,device_map=cpu"),
            *("--include_path", str(tasks), "--batch_size", "1", "--output_path", str(out)),
            "--force_simple",
        ],
        check=True,
        capture_output=True,
    )
    [results] = out.rglob("*_results.json")
    return json.loads(results.read_text())["results"][task]["exact_match,none"]


@pytest.mark.slow
@pytest.mark.skipif(not LMMS_EVAL_PYTHON, reason="LMMS_EVAL_PYTHON names no lmms-eval Python")
def test_the_papers_measurement_with_lmms_eval(tmp_path, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lmms_eval_tasks import TASK as IMAGE_TASK
    from lmms_eval_tasks import taught_llava, write_image_task

    base, _ = scoreable_pair(tmp_path / "pair")
    tuned = taught_llava(base, tmp_path / "llava")
    text_tasks = write_tasks(tmp_path / "tasks")
    image_tasks = write_image_task(tmp_path / "image_tasks")
    before = tree_digest(base), tree_digest(tuned), tree_digest(image_tasks)
    out = tmp_path / "sweep"
    python = ("--eval-arg", f"lmms-eval:python={LMMS_EVAL_PYTHON}")
    visual = ("--eval-arg", f"lmms-eval:include_path={image_tasks}")
    argv = sweep_argv(base, tuned, out, text_tasks, IMAGE_TASK, *python, *visual, grid=TAUGHT_GRID)
    assert main(argv) == 0
    rows = assert_both_halves(out, f"{IMAGE_TASK}/exact_match")
    assert len({r["VA"] for r in rows}) > 1  # the merges keep more or less of what was taught
    [kept] = [r for r in rows if r["model"]]
    model = Path(kept["model"])
    assert float(kept["VA"]) == lmms_eval_cli(model, image_tasks, IMAGE_TASK, tmp_path / "direct")
    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model / "text_model")},
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(text_tasks), include_defaults=False),
        batch_size=1,
        device="cpu",  # the harness's own default is CUDA
    )
    assert float(kept["LA"]) == direct["results"][TASK]["acc,none"]
    references = json.loads((out / "references.json").read_text())
    assert references["tuned"]["VA"] == lmms_eval_cli(
        tuned, image_tasks, IMAGE_TASK, tmp_path / "direct_tuned"
    )
    assert (tree_digest(base), tree_digest(tuned), tree_digest(image_tasks)) == before
    # A run lmms-eval cannot finish (its dataset gone) is one line with lmms-eval's error.
    broken = tmp_path / "broken_tasks"
    broken.mkdir()
    config = (image_tasks / f"{IMAGE_TASK}.yaml").read_text()
    (broken / f"{IMAGE_TASK}.yaml").write_text(config.replace(str(image_tasks), str(broken)))
    capsys.readouterr()
    failing = sweep_argv(base, tuned, tmp_path / "failing", text_tasks, IMAGE_TASK, *python)
    assert main([*failing, "--eval-arg", f"lmms-eval:include_path={broken}"]) == 2
    *progress, line = capsys.readouterr().err.strip().splitlines()
    assert not any(p.startswith("error:") or "Traceback" in p for p in progress)
    assert line.startswith("error: --eval ") and "lmms-eval wrote no results" in line
