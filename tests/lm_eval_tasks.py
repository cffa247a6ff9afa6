"""A tiny scoreable language-model pair for lm-evaluation-harness tests: the demo's Llama-layout
pair with a word-level tokenizer saved beside each model, and local multiple-choice tasks whose
dataset is a JSONL file read through a task YAML (``dataset_path: json``). Nothing leaves the
machine."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fusion_kernels.demo import PairSpec, generate_pair

SPEC = PairSpec(
    hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=64, dtype=torch.float32
)
WORDS = [
    *("the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "to", "over", "mat", "park"),
    *("tree", "sky", "grass", "sea", "sun", "moon", "is", "red", "blue", "green", "yellow"),
    *("what", "color", "of", "where", "did"),
]
#: Multiple-choice questions: (question, choices, index of the answer).
QUESTIONS = [
    ("what color is the sky", ["blue", "red", "green"], 0),
    ("what color is the grass", ["blue", "red", "green"], 2),
    ("what color is the sun", ["yellow", "blue", "green"], 0),
    ("the cat sat on the", ["mat", "sea", "sky"], 0),
    ("the dog ran to the", ["park", "sky", "moon"], 0),
    ("the bird flew over the", ["tree", "mat", "sun"], 0),
    ("where did the cat sit", ["on the mat", "on the sea", "on the moon"], 0),
    ("where did the dog run", ["to the sea", "to the park", "to the moon"], 1),
    ("what color is the sea", ["red", "yellow", "blue"], 2),
    ("the moon is", ["yellow", "green", "red"], 0),
]
TASK = "fk_colors"
NORM_TASK = "fk_colors_norm"
#: Perplexity of the questions: a lower-is-better main metric.
PPL_TASK = "fk_colors_ppl"


def build_tokenizer():
    """A word-level fast tokenizer over :data:`WORDS` (ids below the demo's vocabulary of 64)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    assert len(vocab) <= SPEC.vocab
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )


def scoreable_pair(directory: Path) -> tuple[Path, Path]:
    """The demo pair (float32, tiny) with the tokenizer saved in both models."""
    base, tuned = generate_pair(directory, SPEC)
    tokenizer = build_tokenizer()
    for model in (base, tuned):
        tokenizer.save_pretrained(model)
    return base, tuned


def write_tasks(directory: Path) -> Path:
    """Three local tasks over one JSONL file: :data:`TASK` (main metric acc), :data:`NORM_TASK`
    (acc_norm listed first) and :data:`PPL_TASK` (word perplexity); returns the directory to pass
    as ``include_path``. The datasets cache lives in the same directory."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "colors.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS
        )
    )
    source = (
        "dataset_path: json\n"
        f"dataset_kwargs:\n  cache_dir: {directory / 'cache'}\n"
        f"  data_files:\n    test: {data}\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
    )
    choice = (
        'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
    )
    for task, metrics in ((TASK, ["acc"]), (NORM_TASK, ["acc_norm", "acc"])):
        listed = "".join(
            f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics
        )
        text = f"task: {task}\n{source}{choice}metric_list:\n{listed}"
        (directory / f"{task}.yaml").write_text(text)
    (directory / f"{PPL_TASK}.yaml").write_text(
        f"task: {PPL_TASK}\n{source}output_type: loglikelihood_rolling\n"
        'doc_to_target: "{{question}}"\n'
        "metric_list:\n  - metric: word_perplexity\n"
    )
    return directory
