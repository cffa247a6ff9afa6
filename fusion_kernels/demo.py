"""A generated Llama-layout base/tuned pair: the built-in demo, and test and benchmark input.

The tuned model is the base plus small dense changes everywhere and large changes on a few planted
neurons per matrix (rows of q/k/v/gate/up, columns of o/down), the pattern the paper observes after
visual instruction tuning. Files are written tensor by tensor, so large pairs need little memory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .dtypes import safetensors_name
from .errors import ParameterError
from .io.safetensors_header import INDEX_NAME
from .io.writer import ShardFile
from .neurons import default_axis
from .plan.planner import ShardPlan

PLANTED_NAME = "planted_neurons.json"


@dataclass(frozen=True)
class PairSpec:
    """Shapes and change pattern of a generated pair (defaults: the small demo model)."""

    hidden: int = 512
    intermediate: int = 1376
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 4096
    dtype: torch.dtype = torch.bfloat16
    shards: int = 2
    seed: int = 0
    #: std of the dense small change, relative to the weight std.
    small_change: float = 0.002
    #: std of the change on planted neurons, relative to the weight std.
    large_change: float = 0.05
    #: fraction of neurons per matrix with a large change.
    planted_fraction: float = 0.02

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab, self.hidden)
        }
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes.update(
                {
                    p + "self_attn.q_proj.weight": (self.hidden, self.hidden),
                    p + "self_attn.k_proj.weight": (kv, self.hidden),
                    p + "self_attn.v_proj.weight": (kv, self.hidden),
                    p + "self_attn.o_proj.weight": (self.hidden, self.hidden),
                    p + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
                    p + "mlp.up_proj.weight": (self.intermediate, self.hidden),
                    p + "mlp.down_proj.weight": (self.hidden, self.intermediate),
                    p + "input_layernorm.weight": (self.hidden,),
                    p + "post_attention_layernorm.weight": (self.hidden,),
                }
            )
        shapes["model.norm.weight"] = (self.hidden,)
        shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes

    def config(self) -> dict:
        """A transformers ``LlamaConfig`` for these shapes."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": SPECIAL_TOKENS.index(BOS),
            "eos_token_id": SPECIAL_TOKENS.index(EOS),
            "torch_dtype": str(self.dtype).removeprefix("torch."),
        }


def generate_pair(directory: str | Path, spec: PairSpec = PairSpec()) -> tuple[Path, Path]:
    """Write ``directory/base`` and ``directory/tuned``; return their paths.

    ``tuned/planted_neurons.json`` lists, per matrix, the neurons given a large change.
    """
    root = Path(directory)
    base_dir, tuned_dir = root / "base", root / "tuned"
    shapes = spec.tensor_shapes()
    shards = _shard_layout(list(shapes), spec.shards)
    # Written first: it marks the directory as a demo's (see check_demo_dir) even if the
    # generation is interrupted.
    root.mkdir(parents=True, exist_ok=True)
    (root / "pair_spec.json").write_text(json.dumps({**asdict(spec), "dtype": str(spec.dtype)}))
    for d in (base_dir, tuned_dir):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
    (tuned_dir / "generation_config.json").write_text(json.dumps({"do_sample": False}) + "\n")
    for d in (base_dir, tuned_dir):
        write_tokenizer(d, spec.vocab)
    gen = torch.Generator().manual_seed(spec.seed)
    planted: dict[str, list[int]] = {}
    files = {
        which: {s.filename: _open_shard(d / s.filename, s, shapes, spec.dtype) for s in shards}
        for which, d in (("base", base_dir), ("tuned", tuned_dir))
    }
    for shard in shards:
        for name in shard.names:
            base, tuned, neurons = _make_tensor(name, shapes[name], spec, gen)
            files["base"][shard.filename].write(name, base)
            files["tuned"][shard.filename].write(name, tuned)
            if neurons:
                planted[name] = neurons
    for per_model in files.values():
        for file in per_model.values():
            file.close(sync=False)
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": {n: s.filename for s in shards for n in s.names}}
        for d in (base_dir, tuned_dir):
            (d / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (tuned_dir / PLANTED_NAME).write_text(json.dumps(planted) + "\n")
    return base_dir, tuned_dir


UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
#: The demo tokenizer's words, space-separated, those of short prompts first (a tiny vocabulary
#: keeps the first ones): enough for a prompt or a small local task; other words are <unk>.
WORDS = (
    "the a cat dog bird sat ran flew on to over mat park tree sky grass sea sun moon is red blue "
    "green yellow what color of where did . , ? ! ' 0 1 2 3 4 5 6 7 8 9 an and in it that was for "
    "are as with his they at be this from have or by one had not but all were when we there can "
    "your which their said if do will each about how up out them then she many some so these "
    "would other into has more her two like him see time could no make than first been its who "
    "now people my made down only way find use may water long little very after words called "
    "just most know black white fish"
)


def write_tokenizer(directory: Path, vocab: int) -> None:
    """A word-level tokenizer of at most ``vocab`` tokens, as transformers saves a fast one
    (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), built here:
    ``AutoTokenizer`` loads it, so the pair works with lm-eval, mergekit and ``generate``."""
    tokens = [*SPECIAL_TOKENS, *WORDS.split()][: max(vocab, len(SPECIAL_TOKENS))]
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    ]  # fmt: skip
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "vocab": {t: i for i, t in enumerate(tokens)},
            "unk_token": UNK,
        },
    }
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {**specials, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048}
    for name, payload in (
        ("tokenizer.json", tokenizer),
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", specials),
    ):
        (directory / name).write_text(json.dumps(payload, indent=2) + "\n")


def check_demo_dir(directory: str | Path) -> None:
    """Refuse a demo directory that holds something other than an earlier demo: the demo
    rewrites ``base/``, ``tuned/`` and ``merged/`` in it."""
    root = Path(directory)
    if not os.path.lexists(root):
        return
    if not root.is_dir() or root.is_symlink():
        raise ParameterError(f"--demo {root} exists and is not a directory; choose a new DIR")
    if any(root.iterdir()) and not (root / "pair_spec.json").is_file():
        raise ParameterError(
            f"--demo {root} exists and is not an earlier demo; choose a new or empty DIR"
        )


def _shard_layout(names: list[str], count: int) -> list[ShardPlan]:
    if count <= 1:
        return [ShardPlan("model.safetensors", names)]
    per = math.ceil(len(names) / count)
    groups = [names[i : i + per] for i in range(0, len(names), per)]
    return [
        ShardPlan(f"model-{i:05d}-of-{len(groups):05d}.safetensors", g)
        for i, g in enumerate(groups, start=1)
    ]


def _open_shard(path: Path, shard: ShardPlan, shapes, dtype) -> ShardFile:
    size = torch.tensor([], dtype=dtype).element_size()
    return ShardFile(
        path,
        [(n, safetensors_name(dtype), shapes[n], math.prod(shapes[n]) * size) for n in shard.names],
    )


def _make_tensor(name, shape, spec: PairSpec, gen) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    if len(shape) == 1:
        base = 1.0 + 0.05 * torch.randn(shape, generator=gen)
    else:
        base = torch.randn(shape, generator=gen) * (1.0 / math.sqrt(shape[-1]))
    std = float(base.std()) if base.numel() > 1 else 1.0
    delta = torch.randn(shape, generator=gen) * (spec.small_change * std)
    axis = default_axis(name)
    neurons: list[int] = []
    if axis != "none":
        count = shape[0] if axis == "row" else shape[1]
        chosen = torch.randperm(count, generator=gen)[: max(1, int(spec.planted_fraction * count))]
        neurons = sorted(chosen.tolist())
        big = torch.randn(shape, generator=gen) * (spec.large_change * std)
        mask = torch.zeros(count, dtype=torch.bool)
        mask[chosen] = True
        mask = mask[:, None] if axis == "row" else mask[None, :]
        delta = torch.where(mask, big, delta)
    base = base.to(spec.dtype)
    return base, (base.float() + delta).to(spec.dtype), neurons


def planted_restored(tuned_dir: Path, merged_dir: Path) -> tuple[int, int]:
    """(planted neurons that come out bit-identical to tuned, planted neurons in total).

    With ``restore=replace`` every restored neuron equals tuned, so this is how many of the
    planted large-change neurons the merge located.
    """
    from .io.reader import SafetensorsCheckpoint

    planted = json.loads((Path(tuned_dir) / PLANTED_NAME).read_text())
    tuned, merged = SafetensorsCheckpoint(tuned_dir), SafetensorsCheckpoint(merged_dir)
    found = total = 0
    for name, neurons in planted.items():
        t, m = tuned.read(name), merged.read(name)
        if default_axis(name) == "col":
            t, m = t.t(), m.t()
        same = (_bits(t) == _bits(m)).all(dim=1)
        found += int(same[neurons].sum())
        total += len(neurons)
    return found, total


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])
