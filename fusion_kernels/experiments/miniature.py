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
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..errors import FusionError

SPEC_NAME = "miniature.json"
#: The base vocabulary: newline and printable ASCII, one token per character.
TEXT_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
CHAR_ID = {c: i for i, c in enumerate(TEXT_CHARS)}
PROMPT = " This is a "
ANSWER_END = "."
CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: Standard-library modules whose docstrings are the English corpus, in a fixed order.
MODULES = (
    "abc",
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "cmath",
    "codecs",
    "collections",
    "colorsys",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email.message",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "getopt",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "linecache",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "pprint",
    "pydoc",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "socket",
    "socketserver",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
)


@dataclass(frozen=True)
class MiniatureSpec:
    """Model shapes, the visual task, training budgets and evaluation sizes; seeds fixed."""

    hidden: int = 128
    intermediate: int = 384
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    context: int = 128
    patches: int = 32
    image_len: int = 16
    #: scale of the class logits over patches: higher makes classes easier to tell apart.
    class_sharpness: float = 1.5
    base_steps: int = 1500
    base_batch: int = 32
    base_lr: float = 3e-3
    align_steps: int = 150
    align_lr: float = 3e-3
    tune_steps: int = 150
    tune_batch: int = 64
    tune_lr: float = 1e-3
    eval_windows: int = 64
    eval_images: int = 500
    seed: int = 0

    @property
    def text_vocab(self) -> int:
        """Tokens of the base vocabulary; the patch tokens come after them."""
        return len(TEXT_CHARS)

    def llama_config(self, vocab: int):
        """A transformers ``LlamaConfig`` for a model with ``vocab`` tokens."""
        import transformers

        return transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(self.context, self.image_len + 32),
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )


FULL = MiniatureSpec()
QUICK = MiniatureSpec(
    hidden=64,
    intermediate=192,
    layers=2,
    context=64,
    base_steps=400,
    base_batch=16,
    align_steps=80,
    tune_steps=80,
    tune_batch=32,
    eval_windows=32,
    eval_images=200,
)


# ---------------------------------------------------------------- data


def collect_docstrings(modules: tuple[str, ...] | list[str] = MODULES) -> list[str]:
    """Docstrings of the modules and their public classes, functions and methods, deduplicated,
    in module order then name order (what the installed Python ships, so it varies by version)."""
    docs: list[str] = []
    seen: set[str] = set()

    def add(doc: Any) -> None:
        if not isinstance(doc, str):
            return
        doc = inspect.cleandoc(doc)
        if len(doc) >= 40 and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    with warnings.catch_warnings():
        # Touching deprecated aliases (typing.io, ...) warns; their text is as good as any.
        warnings.simplefilter("ignore")
        for module_name in modules:
            module = importlib.import_module(module_name)
            add(module.__doc__)
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                add(getattr(obj, "__doc__", None))
                if inspect.isclass(obj):
                    for member_name, member in sorted(vars(obj).items()):
                        if not member_name.startswith("_"):
                            add(getattr(member, "__doc__", None))
    return docs


def encode(text: str) -> torch.Tensor:
    """Token ids of ``text``; characters outside the vocabulary are dropped."""
    return torch.tensor([CHAR_ID[c] for c in text if c in CHAR_ID], dtype=torch.long)


@lru_cache(maxsize=2)
def corpus(modules: tuple[str, ...] = tuple(MODULES)) -> tuple[torch.Tensor, torch.Tensor]:
    """(training text, held-out text) as token ids; every tenth docstring is held out."""
    docs = collect_docstrings(modules)
    train = "\n\n".join(d for i, d in enumerate(docs) if i % 10 != 9)
    held_out = "\n\n".join(d for i, d in enumerate(docs) if i % 10 == 9)
    return encode(train), encode(held_out)


def text_batch(ids: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``length`` tokens."""
    starts = torch.randint(0, len(ids) - length, (batch,), generator=gen)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def held_out_windows(spec: MiniatureSpec) -> torch.Tensor:
    """The held-out text LA is measured on: the first ``eval_windows`` non-overlapping windows."""
    held_out = corpus()[1]
    length = spec.context + 1
    count = min(spec.eval_windows, len(held_out) // length)
    return held_out[: count * length].view(count, length)


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


# ---------------------------------------------------------------- training


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
    held_out = held_out_windows(spec)
    payload = {
        "spec": dataclasses.asdict(spec),
        "held_out_sha256": hashlib.sha256(held_out.numpy().tobytes()).hexdigest(),
    }
    (directory / SPEC_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    return directory


# ---------------------------------------------------------------- evaluation


def load_spec(model_dir: str | Path) -> MiniatureSpec:
    """The task a model directory was built for, checked against this Python's corpus."""
    path = Path(model_dir) / SPEC_NAME
    if not path.is_file():
        raise FusionError(f"{path} is missing: not a model of the paper miniature")
    payload = json.loads(path.read_text())
    spec = MiniatureSpec(**payload["spec"])
    held_out = held_out_windows(spec)
    if hashlib.sha256(held_out.numpy().tobytes()).hexdigest() != payload["held_out_sha256"]:
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
