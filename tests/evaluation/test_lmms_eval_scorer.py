"""The built-in visual-ability scorer (lmms-eval through its command line), the device every
built-in scorer runs on, ``--eval-arg`` routing and the ``paper`` preset. A stand-in lmms-eval
(tests/lmms_eval_fake.py) answers where the real one is not needed; the real one's registry is
checked when ``LMMS_EVAL_PYTHON`` names a Python that has it (``make test`` sets it)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from lm_eval_tasks import write_tasks
from lmms_eval_fake import ERROR, FAIL_TASK, TASK, fake_calls, fake_python, fake_score

from fusion_kernels.errors import FusionError, ParameterError
from fusion_kernels.evaluation import harness, lm_eval_scorer
from fusion_kernels.evaluation.hooks import PRESETS, join_specs, load_evaluator, split_specs
from fusion_kernels.evaluation.lmms_eval_scorer import (
    FAMILIES,
    LmmsEvalScorer,
    known_tasks,
    parse_eval_args,
    parse_tasks,
)

LANGUAGE = ("race", "commonsense_qa", "piqa", "openbookqa", "gsm8k", "arc_easy", "arc_challenge")
VISUAL = ("mme", "mmmu_val", "scienceqa_img", "gqa", "mmbench_cn_dev", "mmbench_en_dev")


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    return fake_python(tmp_path_factory.mktemp("fake_lmms_eval"))


def tiny_model(directory: Path, family: str = "llava", weights: bytes = b"w1") -> Path:
    """A directory lmms-eval's stand-in scores: a config naming the family, a weight file."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": family}))
    (directory / "model.safetensors").write_bytes(weights)
    return directory


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")}


def test_tasks_and_options_parse(fake):
    assert parse_tasks("lmms-eval:mme, gqa") == ("mme", "gqa")
    options = parse_eval_args(["limit=4", "batch_size=2", f"python={fake}", "force_simple=no"])
    assert (options.limit, options.batch_size, options.python) == (4, 2, str(fake))
    assert not options.force_simple and options.average == "VA"
    assert parse_eval_args(["python=sh"]).python.endswith("/sh")


@pytest.mark.parametrize(
    "items,message",
    [
        (["limit=0"], "limit must be > 0"),
        (["batch_size=auto"], "must be an integer"),
        (["python=/no/such/python"], "does not exist"),
        (["model_args=pretrained=x"], "pretrained is the merged model"),
        (["num_fewshot=1"], "unknown key 'num_fewshot'"),
        (["include_path=/", "include_path=/"], "lmms-eval takes one"),
    ],
)
def test_bad_options_name_the_item(items, message):
    with pytest.raises(ParameterError, match="--eval-arg lmms-eval:") as info:
        parse_eval_args(items)
    assert message in str(info.value)


def test_eval_args_go_to_the_scorers_that_take_them():
    takes = {"lm-eval": tuple(lm_eval_scorer.EVAL_ARGS), "lmms-eval": ("limit", "python")}
    routed = harness.route_eval_args(
        ["limit=3", "lm-eval:limit=5", "lmms-eval:python=py", "num_fewshot=1"], takes
    )
    assert routed == {
        "lm-eval": ("limit=3", "limit=5", "num_fewshot=1"),
        "lmms-eval": ("limit=3", "python=py"),
    }
    with pytest.raises(ParameterError, match=r"is for lmms-eval; add --eval lmms-eval:TASK"):
        harness.route_eval_args(["lmms-eval:limit=1"], {"lm-eval": ("limit",)})
    with pytest.raises(ParameterError, match=r"unknown key 'limt'; use one of lm-eval: limit"):
        harness.route_eval_args(["limt=1"], {"lm-eval": ("limit",)})


def test_the_paper_preset_is_the_papers_thirteen_tasks():
    specs = split_specs(join_specs(["paper"]))
    assert specs == [f"lm-eval:{','.join(LANGUAGE)}", f"lmms-eval:{','.join(VISUAL)}"]
    assert join_specs("paper") == join_specs(list(PRESETS["paper"]))


@pytest.mark.slow
def test_the_paper_presets_language_tasks_are_lm_evals():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    assert set(LANGUAGE) <= set(TaskManager().all_tasks)


def test_the_paper_presets_visual_tasks_are_lmms_evals():
    python = os.environ.get("LMMS_EVAL_PYTHON")
    if not python:
        pytest.skip("LMMS_EVAL_PYTHON names no Python with lmms-eval (make test sets it)")
    assert set(VISUAL) <= known_tasks(python, None)


def test_builtin_scorers_run_where_the_sweep_runs(monkeypatch, tmp_path, fake):
    import torch

    assert harness.default_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert harness.default_device(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert harness.default_device(None) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tasks = write_tasks(tmp_path / "tasks")
    local = (f"include_path={tasks}", "include_defaults=false")
    scorer = lm_eval_scorer.LmEvalScorer("lm-eval:fk_colors", lm_eval_scorer.parse_eval_args(local))
    pytest.importorskip("lm_eval")
    language = tiny_model(tmp_path / "llama", "llama")
    assert scorer.harness_arguments(language)["device"] == "cpu"
    scorer.sweep_device = "cuda:3"
    assert scorer.harness_arguments(language)["device"] == "cuda:3"
    given = lm_eval_scorer.parse_eval_args((*local, "device=meta"))
    assert (
        lm_eval_scorer.LmEvalScorer("lm-eval:x", given, "cuda:3").harness_arguments(language)[
            "device"
        ]
        == "meta"
    )
    visual = LmmsEvalScorer(f"lmms-eval:{TASK}", parse_eval_args([f"python={fake}"]))
    model = tiny_model(tmp_path / "m")
    argv = visual.command(model, tmp_path)
    assert argv[argv.index("--model_args") + 1] == f"pretrained={model},device=cpu,device_map=cpu"


def test_scores_come_from_lmms_evals_results_file(tmp_path, fake):
    model = tiny_model(tmp_path / "models" / "point")
    before = tree(model)
    scorer = load_evaluator(f"lmms-eval:{TASK}", (f"python={fake}", "limit=2"))
    assert scorer(str(model)) == {f"{TASK}/exact_match": fake_score(model), "VA": fake_score(model)}
    argv = fake_calls(fake)[-1]
    assert argv[argv.index("--model") + 1] == "llava_hf"
    assert argv[argv.index("--limit") + 1] == "2" and "--force_simple" in argv
    assert tree(model) == before  # nothing written into the model scored


def test_a_failed_evaluation_is_lmms_evals_error_line(tmp_path, fake):
    model = tiny_model(tmp_path / "m")
    scorer = load_evaluator(f"lmms-eval:{FAIL_TASK}", (f"python={fake}",))
    with pytest.raises(FusionError) as info:
        scorer(str(model))
    message = str(info.value)
    assert message.endswith(ERROR) and "wrote no results for" in message and "\n" not in message


def test_unknown_tasks_and_families_are_refused_up_front(tmp_path, fake):
    with pytest.raises(ParameterError, match=r"lmms-eval knows no task 'nope'.*include_path"):
        load_evaluator("lmms-eval:nope", (f"python={fake}",))
    scorer = LmmsEvalScorer(f"lmms-eval:{TASK}", parse_eval_args([f"python={fake}"]))
    text_only = tiny_model(tmp_path / "llama", "llama")
    with pytest.raises(ParameterError, match=r"loads no llama model .* families llava, ") as info:
        scorer.model_name(text_only)
    assert all(family in str(info.value) for family in FAMILIES)
    named = LmmsEvalScorer(f"lmms-eval:{TASK}", parse_eval_args([f"python={fake}", "model=x"]))
    assert named.model_name(text_only) == "x"


def test_a_python_without_lmms_eval_is_named(tmp_path):
    known_tasks.cache_clear()
    with pytest.raises(FusionError, match=r"cannot run lmms-eval with .*lmms-eval:python=PATH"):
        load_evaluator(f"lmms-eval:{TASK}", (f"python={sys.executable}",))


def test_the_error_line_is_lmms_evals_own_without_colours():
    from fusion_kernels.evaluation.lmms_eval_scorer import error_line

    log = (
        "Traceback (most recent call last):\nValueError: boom\n"
        "\x1b[31m\x1b[1mError during evaluation: boom. Please set `--verbosity=DEBUG`\x1b[0m\n"
        "done\n"
    )
    assert error_line(log) == "Error during evaluation: boom. Please set `--verbosity=DEBUG`"
    assert error_line("a\n2026 | ERROR | x:1 - it broke\n") == "it broke"
    assert error_line("") == "no output"
