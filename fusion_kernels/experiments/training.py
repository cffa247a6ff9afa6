"""Building the miniature's two models: the base, a character-level Llama trained on English
(:func:`train_base`), and the "visually tuned" copy (:func:`tune_visual`); :func:`save` writes
either with ``miniature.json``, the task it was built for.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from .images import sample_images, visual_batch
from .spec import SPEC_NAME, MiniatureSpec
from .text import corpus, held_out_sha256, text_batch


def train(
    model: torch.nn.Module,
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float,
    log: Callable[[str], None] = print,
) -> None:
    """AdamW with linear warm-up and cosine decay on the parameters that require grad;
    ``batches(step)`` gives (input ids, labels)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    for step in range(steps):
        input_ids, labels = batches(step)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"  step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()


def train_base(spec: MiniatureSpec, log: Callable[[str], None] = print):
    """A freshly initialised character-level Llama trained on the docstring corpus."""
    import transformers

    torch.manual_seed(spec.seed)
    model = transformers.LlamaForCausalLM(spec.llama_config(spec.text_vocab))
    train_ids = corpus()[0]
    gen = torch.Generator().manual_seed(spec.seed + 2)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = text_batch(train_ids, spec.base_batch, spec.context, gen)
        return window, window

    train(model, batches, spec.base_steps, spec.base_lr, log)
    return model


def tune_visual(base, spec: MiniatureSpec, log: Callable[[str], None] = print):
    """LLaVA's two stages on a copy of ``base`` with the patch tokens added to its vocabulary.

    1. Feature alignment: only the patch tokens' embedding rows (the "projector") learn, the
       language model stays frozen, so base weights with these rows already see a little.
    2. Visual instruction tuning: the whole model learns the visual task only (no text), at a
       high learning rate, and forgets part of its English.
    """
    import transformers

    torch.manual_seed(spec.seed + 3)
    model = transformers.LlamaForCausalLM(spec.llama_config(spec.text_vocab + spec.patches))
    state = base.state_dict()
    grown = model.state_dict()
    gen = torch.Generator().manual_seed(spec.seed + 4)
    for name, value in state.items():
        if value.shape != grown[name].shape:
            # New rows start near the mean of the old ones, as transformers' mean resizing does.
            extra = value.mean(0) + value.std(0) * torch.randn(
                spec.patches, value.shape[1], generator=gen
            )
            value = torch.cat([value, extra])
        grown[name] = value
    model.load_state_dict(grown)

    def batches(offset: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            labels, patches = sample_images(spec, spec.tune_batch, seed=offset + step)
            return visual_batch(spec, labels, patches)

        return batch

    embeddings = model.get_input_embeddings().weight
    for param in model.parameters():
        param.requires_grad_(param is embeddings)
    text_rows = torch.arange(embeddings.shape[0]) < spec.text_vocab
    # Zero gradients leave AdamW's moments at zero, so the text rows do not move at all.
    hook = embeddings.register_hook(lambda grad: grad.masked_fill(text_rows[:, None], 0.0))
    log("  stage 1: patch embeddings only")
    train(model, batches(2_000_000), spec.align_steps, spec.align_lr, log)
    hook.remove()
    for param in model.parameters():
        param.requires_grad_(True)
    log("  stage 2: the whole model")
    train(model, batches(1_000_000), spec.tune_steps, spec.tune_lr, log)
    return model


def save(model, directory: str | Path, spec: MiniatureSpec) -> Path:
    """``save_pretrained`` plus ``miniature.json`` (the task, for :func:`evaluate`)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    payload = {"spec": dataclasses.asdict(spec), "held_out_sha256": held_out_sha256(spec)}
    (directory / SPEC_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    return directory
