"""The visual task of the miniature: an "image" is a sequence of patch tokens drawn from its
class's distribution, and the answer to ``<patches> This is a`` is the class name.
"""

from __future__ import annotations

import torch

from .spec import ANSWER_END, CLASSES, PROMPT, MiniatureSpec
from .text import encode


def class_distributions(spec: MiniatureSpec) -> torch.Tensor:
    """(classes, patches) probabilities: each class prefers its own few patch tokens."""
    gen = torch.Generator().manual_seed(spec.seed + 1)
    logits = torch.randn(len(CLASSES), spec.patches, generator=gen) * spec.class_sharpness
    return torch.softmax(logits, dim=1)


def sample_images(spec: MiniatureSpec, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, patch token ids) of ``count`` images; token ids follow the text vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (count,), generator=gen)
    probs = class_distributions(spec)[labels]
    patches = torch.multinomial(probs, spec.image_len, replacement=True, generator=gen)
    return labels, patches + spec.text_vocab


def visual_batch(
    spec: MiniatureSpec, labels: torch.Tensor, patches: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of ``<patches> This is a NAME.``; the loss is on ``NAME.`` only.

    Right padding repeats the final ``.``; causal attention never lets it reach earlier tokens and
    its label is -100, so padding changes nothing.
    """
    prompt = encode(PROMPT)
    answers = [encode(CLASSES[int(c)] + ANSWER_END) for c in labels]
    width = max(len(a) for a in answers)
    rows, targets = [], []
    for image, answer in zip(patches, answers, strict=True):
        pad = answer[-1:].repeat(width - len(answer))
        rows.append(torch.cat([image, prompt, answer, pad]))
        target = torch.full((len(rows[-1]),), -100)
        start = len(image) + len(prompt)
        target[start : start + len(answer)] = answer
        targets.append(target)
    return torch.stack(rows), torch.stack(targets)
