"""A miniature of the paper's experiment: a tiny character-level Llama that reads English, and a
"visually tuned" copy that names the class of an "image" made of new patch tokens.

- Language ability (LA): next-character accuracy on held-out English text (docstrings of Python's
  standard library, collected in a fixed order), argmax over the base vocabulary.
- Visual ability (VA): exact-match accuracy of the class name that follows ``<patches> This is a``
  on held-out images. An image is a sequence of patch tokens drawn from its class's distribution;
  the patch tokens are rows added to ``embed_tokens`` and ``lm_head`` (the stand-in for the vision
  encoder and projector, which a merge takes from tuned).
- OA: the mean of LA and VA, as in the paper's tables.

:func:`evaluate` (model directory → ``{"LA", "VA", "OA"}``) is the built-in example for
``python -m fusion_kernels.sweep --eval fusion_kernels.experiments.miniature:evaluate``; it reads
the task from ``miniature.json``, which every model directory of the experiment carries (a merge
copies it).

This module measures (:func:`evaluate`, :func:`load_spec`, the two accuracies) and gathers the
experiment under one name: the task and its settings are in :mod:`.spec`, the English corpus in
:mod:`.text`, the images in :mod:`.images`, and the building of the two models in
:mod:`.training`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import FusionError
from .images import class_distributions, sample_images, visual_batch
from .spec import (
    ANSWER_END,
    CHAR_ID,
    CLASSES,
    FULL,
    PROMPT,
    QUICK,
    SPEC_NAME,
    TEXT_CHARS,
    MiniatureSpec,
)
from .text import (
    MODULES,
    collect_docstrings,
    corpus,
    encode,
    held_out_sha256,
    held_out_windows,
    text_batch,
)
from .training import save, train, train_base, tune_visual


def load_spec(model_dir: str | Path) -> MiniatureSpec:
    """The task a model directory was built for, checked against this Python's corpus."""
    path = Path(model_dir) / SPEC_NAME
    if not path.is_file():
        raise FusionError(f"{path} is missing: not a model of the paper miniature")
    payload = json.loads(path.read_text())
    spec = MiniatureSpec(**payload["spec"])
    if held_out_sha256(spec) != payload["held_out_sha256"]:
        raise FusionError(
            f"{path}: the held-out text differs from the one this model was built with "
            "(another Python version ships other docstrings); rebuild the models here"
        )
    return spec


@torch.no_grad()
def language_accuracy(model, spec: MiniatureSpec) -> float:
    """Next-character accuracy on held-out text, argmax over the text vocabulary only."""
    windows = held_out_windows(spec)
    correct = 0
    for chunk in windows.split(16):
        logits = model(input_ids=chunk[:, :-1]).logits[..., : spec.text_vocab]
        correct += int((logits.argmax(-1) == chunk[:, 1:]).sum())
    return correct / windows[:, 1:].numel()


@torch.no_grad()
def visual_accuracy(model, spec: MiniatureSpec) -> float:
    """Exact match of the greedy answer on held-out images.

    Greedy decoding spells ``NAME.`` exactly iff every answer token is the argmax given the correct
    prefix, so one teacher-forced pass decides it.
    """
    labels, patches = sample_images(spec, spec.eval_images, seed=spec.seed + 7)
    input_ids, targets = visual_batch(spec, labels, patches)
    exact = 0
    for ids, target in zip(input_ids.split(100), targets.split(100), strict=True):
        predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
        wanted = target[:, 1:]
        hit = (predicted == wanted) | (wanted == -100)
        exact += int(hit.all(dim=1).sum())
    return exact / len(labels)


def evaluate(model_dir: str | Path) -> dict[str, float]:
    """LA, VA and OA (%) of a model directory with patch tokens (tuned, or any merge of it)."""
    import transformers

    spec = load_spec(model_dir)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    # A sweep evaluates many models; a loading bar for each would bury its own output.
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if model.config.vocab_size < spec.text_vocab + spec.patches:
        raise FusionError(
            f"{model_dir} has no patch tokens, so no visual ability to measure; evaluate the "
            "hard merge (task_arithmetic with weight 0) for the base model's VA"
        )
    la = 100.0 * language_accuracy(model, spec)
    va = 100.0 * visual_accuracy(model, spec)
    return {"LA": round(la, 2), "VA": round(va, 2), "OA": round((la + va) / 2, 2)}


__all__ = [
    "ANSWER_END",
    "CHAR_ID",
    "CLASSES",
    "FULL",
    "MODULES",
    "PROMPT",
    "QUICK",
    "SPEC_NAME",
    "TEXT_CHARS",
    "MiniatureSpec",
    "class_distributions",
    "collect_docstrings",
    "corpus",
    "encode",
    "evaluate",
    "held_out_sha256",
    "held_out_windows",
    "language_accuracy",
    "load_spec",
    "sample_images",
    "save",
    "text_batch",
    "train",
    "train_base",
    "tune_visual",
    "visual_accuracy",
    "visual_batch",
]
