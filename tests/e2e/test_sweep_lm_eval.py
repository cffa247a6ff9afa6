"""End to end: a 2×2 sweep of the demo pair scored by the built-in lm-evaluation-harness scorer on
a local task (LA) and a user hook (VA), combined into OA; the trade-off scatter, the page, the
reference points and the kept best model with its scores. Runs offline in CI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from lm_eval_tasks import TASK, scoreable_pair, write_tasks

from fusion_kernels.evaluation.scores_card import SCORES_NAME
from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.sweep import main

pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install 'fusion_kernels[eval]'")
pytest.importorskip("matplotlib", reason="the trade-off plot needs matplotlib")

GRID = "method=ties,neu-p-ties;density=0.1,0.5"
#: The tuned model of the running test: the "visual" model VA measures closeness to.
TUNED: list[str] = []


def visual_ability(model_dir: str) -> dict[str, float]:
    """A stand-in VA hook: closeness of a model's weights to tuned, 1 / (1 + L2 distance)."""
    merged, tuned = Checkpoint(model_dir), Checkpoint(TUNED[0])
    squares = sum(
        float((merged.read(n).float() - tuned.read(n).float()).pow(2).sum()) for n in tuned.names()
    )
    return {"VA": 1 / (1 + math.sqrt(squares))}


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.slow
def test_two_by_two_sweep_scored_by_lm_eval(tmp_path, capsys):
    import lm_eval
    import matplotlib.pyplot as plt
    from lm_eval.tasks import TaskManager

    base, tuned = scoreable_pair(tmp_path / "pair")
    tasks = write_tasks(tmp_path / "tasks")
    TUNED[:] = [str(tuned)]
    out = tmp_path / "sweep"
    argv = [
        *("--base", str(base), "--tuned", str(tuned), "--out", str(out), "--grid", GRID),
        *("--eval", f"lm-eval:{TASK}", "--eval", "test_sweep_lm_eval:visual_ability"),
        *("--eval-arg", f"include_path={tasks}", "--eval-arg", "include_defaults=false"),
        *("--eval-arg", "device=cpu", "--eval-arg", "batch_size=4", "--score-inputs"),
    ]
    assert main(argv) == 0
    columns, rows = read_rows(out / "results.csv")
    assert columns == [
        *("point", "method", "density", f"{TASK}/acc", "LA", "VA", "OA"),
        *("merge_seconds", "eval_seconds", "model"),
    ]
    assert len(rows) == 4
    for row in rows:
        la, va = float(row["LA"]), float(row["VA"])
        assert la == float(row[f"{TASK}/acc"]) and 0 <= la <= 1 and 0 < va < 1
        assert float(row["OA"]) == (la + va) / 2
    # The best point by OA is the only model kept, and it carries its scores.
    best = max(rows, key=lambda r: float(r["OA"]))
    assert [r["point"] for r in rows if r["model"]] == [best["point"]]
    kept = Path(best["model"])
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]
    card = json.loads((kept / SCORES_NAME).read_text())
    assert card["is_best"] and card["best_by"] == "OA" and card["point"] == best["point"]
    assert card["metrics"] == {m: float(best[m]) for m in (f"{TASK}/acc", "LA", "VA", "OA")}
    # Its LA is what the harness itself gives for that model.
    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(kept)},
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        device="cpu",
        batch_size=4,
    )
    assert float(best[f"{TASK}/acc"]) == direct["results"][TASK]["acc,none"]
    # Base and tuned scored once, as reference points.
    references = json.loads((out / "references.json").read_text())
    assert sorted(references) == ["base", "tuned"]
    assert references["tuned"]["VA"] == 1.0 and references["base"]["VA"] < 1.0
    assert references["base"]["OA"] == (references["base"]["LA"] + references["base"]["VA"]) / 2
    # The trade-off scatter, and the page that shows it with the per-parameter curves.
    scatter = out / "plots" / "tradeoff_LA_vs_VA.png"
    assert plt.imread(scatter).shape[0] > 200
    page = (out / "index.html").read_text()
    for name in ("tradeoff_LA_vs_VA.png", "OA_vs_density.png", "LA_vs_density.png"):
        assert f'src="plots/{name}"' in page
        assert (out / "plots" / name).exists()
    assert f'<tr class="best"><td>{best["point"]}</td>' in page
    assert page.count('<tr class="ref">') == 2
    # Resuming re-scores nothing.
    capsys.readouterr()
    assert main(argv) == 0
    assert "4 points, 4 already in" in capsys.readouterr().out


def llava_around(base: Path, directory: Path) -> Path:
    """A tiny LLaVA whose language model is ``base`` tuned a little (a larger change in a few
    MLP rows), saved with the base's tokenizer: the multimodal model a sweep recovers."""
    import torch
    import transformers

    text = transformers.AutoConfig.from_pretrained(base)
    vision = transformers.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=30,
        patch_size=15,
    )
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=text.vocab_size - 1
    )
    torch.manual_seed(0)
    tuned = transformers.LlavaForConditionalGeneration(config)
    source = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for target, origin in (
            (tuned.model.language_model, source.model),
            (tuned.lm_head, source.lm_head),
        ):
            for name, weight in origin.named_parameters():
                change = 0.01 * torch.randn_like(weight)
                if name.endswith("up_proj.weight"):
                    change[:3] += 0.5 * torch.randn_like(weight[:3])
                target.get_parameter(name).copy_(weight + change)
    tuned.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(directory)
    return directory


def tree_digest(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


@pytest.mark.slow
def test_a_multimodal_sweep_scores_the_language_model_of_each_point(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    base, _ = scoreable_pair(tmp_path / "pair")
    tuned = llava_around(base, tmp_path / "llava")
    tasks = write_tasks(tmp_path / "tasks")
    before = tree_digest(tuned), tree_digest(base)
    out = tmp_path / "sweep"
    argv = [
        *("--base", str(base), "--tuned", str(tuned), "--out", str(out)),
        *("--grid", "method=neu-p-ties;density=0.3", "--keep", "all", "--score-inputs"),
        *("--eval", f"lm-eval:{TASK}", "--eval-arg", f"include_path={tasks}"),
        *("--eval-arg", "include_defaults=false", "--eval-arg", "device=cpu"),
    ]
    assert main(argv) == 0
    _, rows = read_rows(out / "results.csv")
    [row] = rows
    text_model = Path(row["model"]) / "text_model"
    assert json.loads((text_model / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]

    def harness(model: Path) -> float:
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model)},
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            device="cpu",
            batch_size=1,
        )
        return output["results"][TASK]["acc,none"]

    assert float(row["LA"]) == harness(text_model)
    # The tuned reference is scored through its own text export, written in the sweep directory.
    references = json.loads((out / "references.json").read_text())
    assert references["tuned"]["failed"] == {} and references["base"]["failed"] == {}
    assert references["tuned"]["LA"] == harness(out / "references" / "tuned")
    assert (tree_digest(tuned), tree_digest(base)) == before
