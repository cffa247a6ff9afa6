"""A PEFT LoRA adapter's ``adapter_config.json``: read, checked, and the per-module rules PEFT
applies when it builds the adapter's layers (rank, alpha, which way a weight is stored).

Everything here is decided before any weight is read; anything PEFT would merge differently from
``W + scale · B @ A``, or would refuse to load, is refused with one line naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError
from ..params import check_pattern, float32_finite
from .safeload import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, load_json

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
# PEFT's LoraConfig defaults.
DEFAULT_RANK = 8
DEFAULT_ALPHA = 8
# Config entries PEFT merges differently from W + scale * B @ A; refused rather than ignored.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters",
    "layer_replication": "layer replication",
}
# transformers' models whose projections are ``Conv1D`` modules (weight stored [in, out]) rather
# than ``nn.Linear`` ([out, in]), and the names of those modules. PEFT transposes the LoRA product
# for a Conv1D and never for an nn.Linear, whatever ``fan_in_fan_out`` says.
_GPT2_STYLE = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
CONV1D_MODULES: dict[str, frozenset[str]] = {
    "gpt2": _GPT2_STYLE,
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "imagegpt": _GPT2_STYLE,
    "decision_transformer": _GPT2_STYLE,
    "clvp": frozenset({"c_proj", "c_fc"}),
    "clvp_decoder": frozenset({"c_proj", "c_fc"}),
}


def read_config(adapter_dir: Path) -> dict:
    """``adapter_dir/adapter_config.json``, checked: a LoRA adapter with nothing we would merge
    differently from PEFT, numbers a float32 holds, patterns that are regular expressions."""
    path = adapter_dir / ADAPTER_CONFIG
    config = load_json(path, MAX_INDEX_BYTES, CheckpointError)
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else config
        raise CheckpointError(f"{path}: a {kind} adapter; only LoRA adapters merge as tuned")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{path}: {what} ({key}) is not supported; merge it with PEFT")
    _check_alphas(path, config)
    _check_ranks(path, config)
    return config


def _check_alphas(path: Path, config: dict) -> None:
    """``lora_alpha`` and ``alpha_pattern`` are numbers a float32 holds (the scale is applied in
    float32), and the pattern keys regular expressions; refused here, before any work."""
    patterns = _patterns(path, config, "alpha_pattern", "numbers")
    for key, alpha in [("lora_alpha", config.get("lora_alpha", DEFAULT_ALPHA)), *patterns.items()]:
        if not float32_finite(alpha):
            raise CheckpointError(
                f"{path}: {key} must be a finite number (a float32), got {alpha!r}"
            )


def _check_ranks(path: Path, config: dict) -> None:
    """``r`` and ``rank_pattern``'s values are positive integers, the keys regular expressions."""
    patterns = _patterns(path, config, "rank_pattern", "ranks")
    for key, rank in [("r", config.get("r", DEFAULT_RANK)), *patterns.items()]:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise CheckpointError(f"{path}: {key} must be a positive integer rank, got {rank!r}")


def _patterns(path: Path, config: dict, field: str, values: str) -> dict:
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{path}: {field} must map module patterns to {values}")
    for key in patterns:
        check_pattern(key, f"{path}: {field} {key!r}")
    return patterns


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rule (get_pattern_key): the first key matching the module name after a dot.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def alpha_for(config: dict, module: str) -> float:
    """The ``lora_alpha`` PEFT gives ``module``: its ``alpha_pattern`` entry, else the default."""
    default = config.get("lora_alpha", DEFAULT_ALPHA)
    return _pattern_value(config.get("alpha_pattern") or {}, module, default)


def rank_for(config: dict, module: str) -> int:
    """The rank PEFT builds ``module``'s LoRA with: its ``rank_pattern`` entry, else ``r``. PEFT
    refuses to load tensors of another rank into it."""
    return _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", DEFAULT_RANK))


def model_types(model_dir: Path) -> set[str]:
    """Every ``model_type`` in ``model_dir/config.json`` (sub-configs included); empty without
    one."""
    path = model_dir / MODEL_CONFIG
    if not path.exists():
        return set()
    found: set[str] = set()
    pending = [load_json(path, MAX_CONFIG_BYTES, CheckpointError)]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if isinstance(node.get("model_type"), str):
                found.add(node["model_type"])
            pending.extend(node.values())
    return found


def is_conv1d(module: str, types: set[str]) -> bool:
    """Whether PEFT finds a transformers ``Conv1D`` at ``module`` in a model of these types."""
    last = module.rpartition(".")[2]
    return any(last in CONV1D_MODULES.get(kind, ()) for kind in types)
