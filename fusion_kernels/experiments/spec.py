"""The miniature's task and settings: the base vocabulary (one token per character), the visual
task's prompt and classes, and :class:`MiniatureSpec` (model shapes, training budgets, evaluation
sizes) with its two presets, :data:`FULL` and :data:`QUICK`.
"""

from __future__ import annotations

from dataclasses import dataclass

SPEC_NAME = "miniature.json"
#: The base vocabulary: newline and printable ASCII, one token per character.
TEXT_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
CHAR_ID = {c: i for i, c in enumerate(TEXT_CHARS)}
PROMPT = " This is a "
ANSWER_END = "."
CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


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
