"""The shape of a mergekit YAML file that ``--config`` reads: its keys, its models, its parameter
mappings and dtypes, each checked with a message naming what is wrong or unsupported."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..dtypes import MERGE_DTYPE_NAMES, dtype_from_name
from ..errors import ParameterError

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
UNSUPPORTED_KEYS = {
    "slices": "layer slices",
    "modules": "per-module definitions",
    "tokenizer_source": "tokenizer merging (the tuned model's tokenizer is copied)",
    "tokenizer": "tokenizer merging (the tuned model's tokenizer is copied)",
    "chat_template": "chat templates (the tuned model's is copied)",
}


def check_keys(data: Mapping) -> None:
    """Refuse top-level keys ``--config`` does not read (naming the full mergekit for some)."""
    for key in data:
        if key in UNSUPPORTED_KEYS:
            raise ParameterError(
                f"key {key!r} ({UNSUPPORTED_KEYS[key]}) is not supported by --config; "
                "run python -m fusion_kernels.mergekit for the full mergekit"
            )
        if key not in TOP_KEYS:
            raise ParameterError(f"unknown key {key!r}; supported: {', '.join(sorted(TOP_KEYS))}")


def model_path(reference: Any, where: str) -> Path:
    """A model reference (``where``: the key that gave it) as a path-like reference."""
    if not isinstance(reference, str) or not reference:
        raise ParameterError(
            f"{where} must be a model (a directory, Hub id or MODEL+LORA), got {reference!r}"
        )
    # A path, a Hub id (org/name@rev) or MODEL+LORA; fusion_kernels.io.sources opens each.
    return Path(reference)


def tuned_model(models: Any, base: str) -> tuple[Path, Mapping]:
    """The one model besides the base and its ``parameters`` (the base's are mergekit's to
    ignore: every parameter here is per non-base input)."""
    if not isinstance(models, list) or not all(isinstance(m, Mapping) for m in models):
        raise ParameterError("models must be a list of {model: PATH, parameters: {...}}")
    others = []
    for entry in models:
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise ParameterError(f"models entry has unsupported key(s) {sorted(extra)}")
        if entry.get("model") != base:
            others.append(entry)
    if len(others) != 1:
        raise ParameterError(
            f"--config merges exactly one model into base_model; models lists {len(others)} "
            "besides the base"
        )
    (entry,) = others
    return model_path(entry.get("model"), "model"), settings_of(entry.get("parameters"), "model")


def settings_of(value: Any, where: str) -> Mapping:
    """A ``parameters`` mapping (empty when absent)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ParameterError(f"{where} parameters must be a mapping, got {value!r}")
    return value


def check_parameter_names(definitions, model_settings: Mapping, global_settings: Mapping):
    """Every parameter is one of the method's, and whole-merge ones are top-level only."""
    known = ", ".join(definitions)
    for where, settings in (("the model's", model_settings), ("top-level", global_settings)):
        for key in settings:
            if key not in definitions:
                raise ParameterError(f"unknown parameter {key!r} in {where} parameters; {known}")
    for key in model_settings:
        if definitions[key].shared:
            raise ParameterError(
                f"parameter {key!r} applies to the whole merge: mergekit reads it from the "
                "top-level parameters only, so move it there"
            )


def parse_dtype(value: Any, where: str) -> torch.dtype | None:
    """``dtype``/``out_dtype`` (``where``) as a torch dtype; None when absent."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    dtype = dtype_from_name(name)
    if dtype is None:
        names = ", ".join(MERGE_DTYPE_NAMES.values())
        raise ParameterError(f"{where} {value!r} is not supported; use {names}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")
