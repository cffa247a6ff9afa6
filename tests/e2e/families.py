"""Tiny multimodal families built with transformers, each beside the text model it was tuned from.

For every family: the text model (the base) and the multimodal model (tuned) share the language
model's sizes; tuned's vocabulary may be larger. :data:`FAMILIES` also says, for each layout
``save_pretrained`` writes, where tuned keeps its language model (so tests state the pairing
themselves instead of asking the tool), and how to feed the model an image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as tf

VOCAB = 128  # the base's vocabulary
GROWN = VOCAB + 2  # tuned's, where the family lets it differ: two image tokens added
IMAGE = VOCAB + 1  # the image token, one of the added rows
SIDE, PATCH = 28, 14  # a 28x28 image in 14x14 patches: 2x2 patches
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Where save_pretrained puts the language model: the original (default) and the newer layout.
NEWER = ("model.language_model.", "lm_head.weight")
WRAPPED = {"original": ("language_model.model.", "language_model.lm_head.weight"), "newer": NEWER}
MLLAMA_CROSS = [1, 3]
MLLAMA_LAYERS = (0, None, 1, None, 2)  # tuned layer -> base layer (None: cross-attention, new)


@dataclass(frozen=True)
class Family:
    """A tuned class, its base, where tuned's language model lives, and an image input."""

    name: str
    tuned: Callable[[], tf.PreTrainedModel]
    base: Callable[[], tf.PreTrainedModel]
    lm: dict[str, tuple[str, str]]  # layout -> (language-model prefix, lm_head name)
    image: Callable[[tf.PreTrainedModel], dict]
    layers: tuple[int | None, ...] | None = None  # tuned layer -> base layer; None: identity
    tied: bool = False  # both tie lm_head to the embedding and store none

    def base_name(self, layout: str, tuned_name: str) -> str | None:
        """The base tensor ``tuned_name`` was tuned from; None outside the language model or in
        a new layer."""
        prefix, head = self.lm[layout]
        if tuned_name == head:
            return "lm_head.weight"
        if not tuned_name.startswith(prefix):
            return None
        rest = tuned_name[len(prefix) :]
        if self.layers is not None and rest.startswith("layers."):
            _, index, tail = rest.split(".", 2)
            base_index = self.layers[int(index)]
            return None if base_index is None else f"model.layers.{base_index}.{tail}"
        return "model." + rest


def _clip():
    return tf.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=SIDE,
        patch_size=PATCH,
    )


def _siglip():
    return tf.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=SIDE,
        patch_size=PATCH,
    )


def _text(config_cls, vocab=GROWN, **extra):
    return config_cls(**{**TEXT, "vocab_size": vocab, "tie_word_embeddings": False, **extra})


def _base(model_cls, config_cls, **extra):
    return lambda: model_cls(_text(config_cls, VOCAB, **extra))


def _ids(count: int, image: int = IMAGE) -> torch.Tensor:
    return torch.tensor([[1, *[image] * count, 5, 6]])


def _pixels(*lead: int, side: int = SIDE) -> torch.Tensor:
    return torch.randn(*lead, 3, side, side, generator=torch.Generator().manual_seed(3))


def _image_tokens(model, **inputs) -> int:
    """How many image tokens the model expects for ``inputs`` (its image features' rows)."""
    features = model.model.get_image_features(**inputs)
    features = getattr(features, "pooler_output", features)
    if isinstance(features, (list, tuple)):
        return sum(f.reshape(-1, f.shape[-1]).shape[0] for f in features)
    return features.reshape(-1, features.shape[-1]).shape[0]


def _plain_image(model) -> dict:
    pixels = _pixels(1)
    return {"input_ids": _ids(_image_tokens(model, pixel_values=pixels)), "pixel_values": pixels}


def _sized_image(model, patches: int | None = None, side: int = SIDE) -> dict:
    pixels = _pixels(1, side=side) if patches is None else _pixels(1, patches)
    extra = {"image_sizes": torch.tensor([[side, side]])}
    count = _image_tokens(model, pixel_values=pixels, **extra)
    return {"input_ids": _ids(count), "pixel_values": pixels, **extra}


def _qwen_image(model) -> dict:
    vision = model.config.vision_config
    merge, temporal = vision.spatial_merge_size, vision.temporal_patch_size
    grid = torch.tensor([[1, SIDE // PATCH, SIDE // PATCH]])
    flat = _pixels(temporal).reshape(temporal, 3, 2, PATCH, 2, PATCH)
    flat = flat.permute(2, 4, 1, 0, 3, 5).reshape(4, 3 * temporal * PATCH * PATCH)
    ids = torch.tensor([[1, 126, *[IMAGE] * (4 // merge**2), 127, 5, 6]])
    return {"input_ids": ids, "pixel_values": flat, "image_grid_thw": grid}


def _idefics3_image(model) -> dict:
    pixels = _pixels(1, 1)
    return {"input_ids": _ids(1), "pixel_values": pixels}


def _mllama_image(model) -> dict:
    ids = torch.tensor([[1, VOCAB, 5, 6]])
    return {
        "input_ids": ids,
        "pixel_values": _pixels(1, 1, 1),
        "aspect_ratio_ids": torch.tensor([[1]]),
        "aspect_ratio_mask": torch.tensor([[[1]]]),
        "cross_attention_mask": torch.ones(1, ids.shape[1], 1, 1, dtype=torch.long),
    }


def _llava():
    config = tf.LlavaConfig(
        vision_config=_clip(), text_config=_text(tf.LlamaConfig), image_token_index=IMAGE
    )
    return tf.LlavaForConditionalGeneration(config)


def _llava_next():
    config = tf.LlavaNextConfig(
        vision_config=_clip(),
        text_config=_text(tf.LlamaConfig),
        image_token_index=IMAGE,
        image_grid_pinpoints=[[SIDE, SIDE]],
    )
    return tf.LlavaNextForConditionalGeneration(config)


def _onevision():
    config = tf.LlavaOnevisionConfig(
        vision_config=_siglip(),
        text_config=_text(tf.Qwen2Config),
        image_token_index=IMAGE,
        image_grid_pinpoints=[[SIDE, SIDE]],
    )
    return tf.LlavaOnevisionForConditionalGeneration(config)


def _qwen_vl(model_cls, config_cls, vision: dict):
    text = {**TEXT, "vocab_size": GROWN, "tie_word_embeddings": False}
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    config = config_cls(
        text_config=text,
        vision_config={"patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2}
        | vision,
        image_token_id=IMAGE,
        video_token_id=VOCAB,
        vision_start_token_id=126,
        vision_end_token_id=127,
        tie_word_embeddings=False,
    )
    return model_cls(config)


def _qwen2_vl():
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2}
    return _qwen_vl(tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig, vision)


def _qwen25_vl():
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        out_hidden_size=32,
        num_heads=2,
        fullatt_block_indexes=[0],
    )
    return _qwen_vl(tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig, vision)


def _idefics3():
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=SIDE,
        patch_size=PATCH,
    )
    config = tf.Idefics3Config(
        vision_config=vision,
        text_config=_text(tf.LlamaConfig),
        scale_factor=2,
        image_token_id=IMAGE,
        tie_word_embeddings=False,
    )
    return tf.Idefics3ForConditionalGeneration(config)


def _gemma3():
    text = _text(tf.Gemma3TextConfig, head_dim=16, tie_word_embeddings=True)
    config = tf.Gemma3Config(
        vision_config=_siglip(),
        text_config=text,
        mm_tokens_per_image=4,
        image_token_index=IMAGE,
        boi_token_index=126,
        eoi_token_index=127,
    )
    return tf.Gemma3ForConditionalGeneration(config)


def _paligemma():
    text = _text(tf.GemmaConfig, head_dim=16, tie_word_embeddings=True)
    config = tf.PaliGemmaConfig(
        vision_config=_siglip(), text_config=text, image_token_index=IMAGE, projection_dim=32
    )
    return tf.PaliGemmaForConditionalGeneration(config)


def _mistral3():
    vision = tf.PixtralVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=2 * SIDE,  # one merged image token would trip Mistral3's squeeze(0)
        patch_size=PATCH,
        head_dim=8,
    )
    config = tf.Mistral3Config(
        vision_config=vision,
        text_config=_text(tf.MistralConfig),
        image_token_index=IMAGE,
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    return tf.Mistral3ForConditionalGeneration(config)


def _mllama():
    vision = tf.MllamaVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_global_layers=1,
        num_attention_heads=2,
        image_size=SIDE,
        patch_size=PATCH,
        vision_output_dim=32,
        intermediate_layers_indices=[0],
        max_num_tiles=1,
        supported_aspect_ratios=[[1, 1]],
    )
    text = tf.MllamaTextConfig(
        vocab_size=VOCAB,
        **{**TEXT, "num_hidden_layers": 5},
        cross_attention_layers=MLLAMA_CROSS,
        tie_word_embeddings=False,
    )
    config = tf.MllamaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB)
    return tf.MllamaForConditionalGeneration(config)


def _mllama_base():
    return tf.LlamaForCausalLM(_text(tf.LlamaConfig, VOCAB, num_hidden_layers=3))


def _internvl():
    vision = tf.InternVLVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=[SIDE, SIDE],
        patch_size=[PATCH, PATCH],
    )
    config = tf.InternVLConfig(
        vision_config=vision,
        text_config=_text(tf.Qwen2Config),
        image_token_id=IMAGE,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    return tf.InternVLForConditionalGeneration(config)


_LLAMA = _base(tf.LlamaForCausalLM, tf.LlamaConfig)
_QWEN2 = _base(tf.Qwen2ForCausalLM, tf.Qwen2Config)
FAMILIES = {
    f.name: f
    for f in [
        Family("llava", _llava, _LLAMA, WRAPPED, _plain_image),
        Family("llava_next", _llava_next, _LLAMA, WRAPPED, lambda m: _sized_image(m, 2)),
        Family("llava_onevision", _onevision, _QWEN2, WRAPPED, lambda m: _sized_image(m, 2)),
        Family(
            "qwen2_vl",
            _qwen2_vl,
            _QWEN2,
            {"original": ("model.", "lm_head.weight"), "newer": NEWER},
            _qwen_image,
        ),
        Family(
            "qwen2_5_vl",
            _qwen25_vl,
            _QWEN2,
            {"original": ("model.", "lm_head.weight"), "newer": NEWER},
            _qwen_image,
        ),
        Family(
            "idefics3",
            _idefics3,
            _LLAMA,
            dict.fromkeys(("original", "newer"), ("model.text_model.", "lm_head.weight")),
            _idefics3_image,
        ),
        Family(
            "gemma3",
            _gemma3,
            _base(tf.Gemma3ForCausalLM, tf.Gemma3TextConfig, head_dim=16, tie_word_embeddings=True),
            WRAPPED,
            _plain_image,
            tied=True,
        ),
        Family(
            "paligemma",
            _paligemma,
            _base(tf.GemmaForCausalLM, tf.GemmaConfig, head_dim=16, tie_word_embeddings=True),
            WRAPPED,
            _plain_image,
            tied=True,
        ),
        Family(
            "mistral3",
            _mistral3,
            _base(tf.MistralForCausalLM, tf.MistralConfig),
            WRAPPED,
            lambda m: _sized_image(m, side=2 * SIDE),
        ),
        Family("mllama", _mllama, _mllama_base, WRAPPED, _mllama_image, layers=MLLAMA_LAYERS),
        Family("internvl", _internvl, _QWEN2, WRAPPED, _plain_image),
    ]
}
