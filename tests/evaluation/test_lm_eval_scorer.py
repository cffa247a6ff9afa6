"""The built-in lm-evaluation-harness scorer: spec and --eval-arg parsing, main-metric choice, and,
offline on a tiny model and local tasks, scores equal to the harness's own when called directly."""

from __future__ import annotations

import builtins
import importlib.util
import json
import math

import pytest
from lm_eval_tasks import NORM_TASK, PPL_TASK, QUESTIONS, TASK, scoreable_pair, write_tasks

from fusion_kernels.errors import FusionError, ParameterError
from fusion_kernels.evaluation import lm_eval_scorer
from fusion_kernels.evaluation.hooks import load_evaluator
from fusion_kernels.evaluation.lm_eval_scorer import (
    LmEvalOptions,
    LmEvalScorer,
    language_model_dir,
    main_metrics,
    parse_eval_args,
    parse_tasks,
)


def test_tasks_and_eval_args_parse(tmp_path):
    assert parse_tasks("lm-eval:arc_easy, hellaswag") == ("arc_easy", "hellaswag")
    options = parse_eval_args(
        [
            "limit=20",
            "batch_size=auto:4",
            "device=cuda:1",
            f"include_path={tmp_path}",
            f"include-path={tmp_path}",
            "include_defaults=false",
            "num_fewshot=0",
            "model_args=dtype=bfloat16,trust_remote_code=True",
        ]
    )
    assert options == LmEvalOptions(
        limit=20,
        batch_size="auto:4",
        device="cuda:1",
        include_path=(str(tmp_path), str(tmp_path)),
        include_defaults=False,
        num_fewshot=0,
        model_args="dtype=bfloat16,trust_remote_code=True",
    )
    assert parse_eval_args(["limit=0.25", "batch_size=8"]).limit == 0.25
    assert parse_eval_args(["batch_size=8"]).batch_size == 8
    # Numbers and booleans read as --set and --grid read theirs.
    lax = parse_eval_args(["num_fewshot=2.0", "apply_chat_template=YES", "limit=3e1"])
    assert (lax.num_fewshot, lax.apply_chat_template, lax.limit) == (2, True, 30)


@pytest.mark.parametrize(
    "items,message",
    [
        (["limit"], "must look like KEY=VALUE"),
        (["limt=3"], "unknown key 'limt'"),
        (["limit=0"], "limit must be > 0"),
        (["limit=many"], "limit cannot be 'many': it must be a float"),
        (["limit=inf"], "limit must be > 0"),
        (["batch_size=0"], "batch_size must be > 0"),
        (["batch_size=big"], "batch_size cannot be 'big': it must be an integer"),
        (["num_fewshot=-1"], "num_fewshot must be >= 0"),
        (["include_path=/no/such/dir"], "does not exist"),
        (["include_defaults=maybe"], "include_defaults cannot be 'maybe': it must be a boolean"),
        (["model_args=pretrained=x"], "pretrained is the merged model"),
    ],
)
def test_bad_eval_args_name_the_item(items, message):
    with pytest.raises(ParameterError, match="--eval-arg") as info:
        parse_eval_args(items)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "spec,message", [("lm-eval:", "must look like"), ("lm-eval:a,,b", "must look like")]
)
def test_bad_task_lists(spec, message):
    with pytest.raises(ParameterError, match=message):
        parse_tasks(spec)
    with pytest.raises(ParameterError, match="twice"):
        parse_tasks("lm-eval:a,a")


def test_main_metric_is_the_configs_first_under_its_first_filter():
    output = {
        "results": {
            "gsm": {"alias": "gsm", "exact_match,strict": 0.2, "exact_match,flexible": 0.3},
            "mc": {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.7},
            "grp": {"acc,none": 0.4, "acc_stderr,none": 0.05},
        },
        "configs": {
            "gsm": {"metric_list": [{"metric": "exact_match"}]},
            "mc": {"metric_list": [{"metric": "acc_norm"}, {"metric": "acc"}]},
        },
        "higher_is_better": {"gsm": {"exact_match": True}, "mc": {"acc_norm": True}},
    }
    scores = main_metrics(output, ("gsm", "mc", "grp"))
    assert scores == {
        "gsm/exact_match": 0.2,
        "mc/acc_norm": 0.7,
        "grp/acc": 0.4,
        "LA": math.fsum([0.2, 0.7, 0.4]) / 3,
    }
    # A lower-is-better main metric cannot be averaged with accuracies: no LA.
    output["results"]["ppl"] = {"word_perplexity,none": 31.0}
    output["higher_is_better"]["ppl"] = {"word_perplexity": False}
    assert "LA" not in main_metrics(output, ("mc", "ppl"))
    with pytest.raises(FusionError, match="no result for task 'absent'"):
        main_metrics(output, ("absent",))
    output["results"]["na"] = {"acc,none": "N/A"}
    with pytest.raises(FusionError, match="acc,none is 'N/A', not a number"):
        main_metrics(output, ("na",))


def test_a_multimodal_model_needs_its_text_export(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlavaForConditionalGeneration"], "text_config": {}})
    )
    with pytest.raises(FusionError, match=r"multimodal model; lm-eval .*text-only export"):
        language_model_dir(tmp_path)
    (tmp_path / "text_model").mkdir()
    (tmp_path / "text_model" / "config.json").write_text("{}")
    assert language_model_dir(tmp_path) == tmp_path / "text_model"
    with pytest.raises(FusionError, match=r"readable config\.json"):
        language_model_dir(tmp_path / "text_model" / "nothing")


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    lm_eval_scorer.task_manager.cache_clear()
    with pytest.raises(FusionError, match=r"pip install 'fusion_kernels\[eval\]'"):
        LmEvalScorer("lm-eval:x").check()


def test_eval_args_need_the_builtin_scorer():
    with pytest.raises(ParameterError, match="sets a built-in scorer's option; it needs --eval lm"):
        load_evaluator("test_sweep:distance_to_tuned", ("limit=3",))
    with pytest.raises(ParameterError, match="one lm-eval:TASK,TASK"):
        load_evaluator("lm-eval:a + lm-eval:b")


needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is optional: pip install 'fusion_kernels[eval]'",
)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    base, tuned = scoreable_pair(root / "pair")
    return base, tuned, write_tasks(root / "tasks")


def local_args(tasks, *more):
    return (f"include_path={tasks}", "include_defaults=false", "device=cpu", *more)


@needs_lm_eval
def test_unknown_task_fails_up_front(scored):
    _, _, tasks = scored
    with pytest.raises(ParameterError, match=r"knows no task 'nope'.*include_path"):
        load_evaluator("lm-eval:nope", local_args(tasks))


@pytest.mark.slow
@needs_lm_eval
@pytest.mark.parametrize("extra", [(), ("limit=6", "batch_size=3")], ids=["all", "limit6-batch3"])
def test_scores_equal_the_harness_called_directly(scored, extra):
    import lm_eval
    from lm_eval.tasks import TaskManager

    base, tuned, tasks = scored
    scorer = load_evaluator(f"lm-eval:{TASK},{NORM_TASK}", local_args(tasks, *extra))
    options = dict(item.split("=", 1) for item in extra)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    for model in (base, tuned):
        scores = scorer(str(model))
        direct = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model)},
            tasks=[TASK, NORM_TASK],
            task_manager=manager,
            device="cpu",
            batch_size=int(options.get("batch_size", 1)),
            limit=int(options["limit"]) if "limit" in options else None,
        )["results"]
        expected = {
            f"{TASK}/acc": direct[TASK]["acc,none"],
            f"{NORM_TASK}/acc_norm": direct[NORM_TASK]["acc_norm,none"],
        }
        assert scores == {**expected, "LA": sum(expected.values()) / 2}
        assert direct[TASK]["sample_len"] == int(options.get("limit", len(QUESTIONS)))


@needs_lm_eval
@pytest.mark.slow
def test_a_perplexity_is_returned_but_not_averaged_into_la(scored):
    import lm_eval
    from lm_eval.tasks import TaskManager

    _, tuned, tasks = scored
    scores = load_evaluator(f"lm-eval:{PPL_TASK}", local_args(tasks))(str(tuned))
    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tuned)},
        tasks=[PPL_TASK],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        device="cpu",
    )
    assert direct["higher_is_better"][PPL_TASK]["word_perplexity"] is False
    assert scores == {
        f"{PPL_TASK}/word_perplexity": direct["results"][PPL_TASK]["word_perplexity,none"]
    }
