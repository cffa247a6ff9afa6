"""Read a mergekit YAML configuration as a merge of ours (``--config CONFIG.yml``).

A file such as::

    merge_method: ties
    base_model: ./Meta-Llama-3-8B
    models:
      - model: ./llava-next-llama3
        parameters:
          weight: 1.0
          density: [{filter: self_attn, value: 0.3}, {value: 0.1}]
    dtype: bfloat16

becomes base and tuned paths, a :class:`~fusion_kernels.params.TensorParams` and the dtypes.
Parameters resolve as mergekit resolves them: a model's own ``parameters`` before the top-level
ones; a list of ``{filter, value}`` takes the first entry whose ``filter`` is a substring of the
tensor name (no filter, or ``*``, matches every tensor); unmatched lists fall through to the next
scope, then to the method's default. Defaults are those of mergekit's method specs
(``merge_methods/registry.py`` and ``generalized_task_arithmetic.py``). Models are local paths
(relative to the working directory as in mergekit), Hub ids (``org/name@revision``) or
``MODEL+LORA``, as for ``--base``/``--tuned``.

The method tables are :mod:`.methods`, the file's structure is checked in :mod:`.schema`, and
values resolve per tensor in :mod:`.resolution`. mergekit is not needed here; PyYAML is.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..dtypes import MERGE_DTYPES
from ..errors import ParameterError
from ..io.safeload import load_yaml
from ..neurons import NeuronRules
from ..params import TensorParams
from .methods import (
    NEURON_FUSION,
    SUPPORTED_METHODS,
    TASK_ARITHMETIC_METHODS,
    method_parameters,
    task_fields,
)
from .resolution import build_chain, constant_rules, tensor_params
from .schema import (
    check_keys,
    check_parameter_names,
    dtype_name,
    model_path,
    parse_dtype,
    settings_of,
    tuned_model,
)

__all__ = [
    "NEURON_FUSION",
    "SUPPORTED_METHODS",
    "TASK_ARITHMETIC_METHODS",
    "MergeConfigFile",
    "load_merge_config",
    "parse_merge_config",
    "referenced_paths",
]


@dataclass(frozen=True)
class MergeConfigFile:
    """A mergekit YAML file as our merge: pass ``base``, ``tuned``, ``params`` and ``rules`` to
    :func:`fusion_kernels.merge_checkpoints`, after :meth:`check_dtypes`."""

    path: Path
    method: str
    base: Path
    tuned: Path
    params: TensorParams
    rules: NeuronRules
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None

    def check_dtypes(self, checkpoint_dtypes: Iterable[torch.dtype]) -> None:
        """Refuse ``dtype``/``out_dtype`` that would change the result or the written dtype.

        The op always computes in float32 and writes each tensor in its checkpoint dtype, so
        ``dtype: float32`` (or the checkpoint's own dtype) is what we do anyway; a narrower
        ``dtype`` would round the weights first, and an output dtype other than the checkpoint's
        is a cast the writer does not do.
        """
        # Tensors of other dtypes (F64, F8, integers) are copied as they are, whatever dtype says.
        for ckpt in {d for d in checkpoint_dtypes if d in MERGE_DTYPES}:
            if self.dtype is not None and self.dtype not in (ckpt, torch.float32):
                raise ParameterError(
                    f"{self.path}: dtype {dtype_name(self.dtype)} would round the "
                    f"{dtype_name(ckpt)} weights before merging; fusion_kernels computes in "
                    "float32: drop dtype"
                )
            written = self.out_dtype or self.dtype or ckpt
            if written != ckpt:
                raise ParameterError(
                    f"{self.path}: the merge would be written as {dtype_name(written)}, but the "
                    f"checkpoint is {dtype_name(ckpt)} and fusion_kernels keeps it: set out_dtype: "
                    f"{dtype_name(ckpt)} (or drop dtype and out_dtype), or run python -m "
                    "fusion_kernels.mergekit"
                )


def load_merge_config(path: str | Path) -> MergeConfigFile:
    """Read and translate a mergekit YAML file; raises :class:`ParameterError` naming what is
    not supported or out of range."""
    path = Path(path)
    data = load_yaml(path, ParameterError)
    try:
        return parse_merge_config(data, path)
    except ParameterError as exc:
        raise ParameterError(f"{path}: {exc}") from None


def referenced_paths(data: Any) -> list[Path]:
    """Local paths a mergekit YAML document names as models (``base_model``, ``model``, in
    ``models`` and ``slices`` alike), each read as ``--base``/``--tuned`` read a reference: a
    ``MODEL+LORA`` names both, and a Hub id names its folder in the Hugging Face cache when it is
    there (nothing is downloaded)."""
    from ..io.sources import reference_paths

    found: list[Path] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            if key in ("model", "base_model") and isinstance(value, str):
                found += reference_paths(value)
            else:
                found += referenced_paths(value)
    elif isinstance(data, list):
        for item in data:
            found += referenced_paths(item)
    return found


def parse_merge_config(data: Any, path: Path = Path("<config>")) -> MergeConfigFile:
    """:func:`load_merge_config` on already-parsed YAML."""
    if not isinstance(data, Mapping):
        raise ParameterError("a merge config is a mapping with merge_method, base_model, models")
    check_keys(data)
    method = data.get("merge_method")
    if method not in SUPPORTED_METHODS:
        raise ParameterError(
            f"merge_method {method!r} is not supported; use one of {', '.join(SUPPORTED_METHODS)}"
        )
    base = model_path(data.get("base_model"), "base_model")
    tuned, model_settings = tuned_model(data.get("models"), str(data.get("base_model")))
    definitions = method_parameters(method)
    global_settings = settings_of(data.get("parameters"), "parameters")
    check_parameter_names(definitions, model_settings, global_settings)
    chains = {
        name: build_chain(name, [] if p.shared else [model_settings], global_settings)
        for name, p in definitions.items()
    }
    to_fields = dict if method == NEURON_FUSION else functools.partial(task_fields, method)
    rules = NeuronRules()
    if method == NEURON_FUSION:
        rules = constant_rules(chains.pop("neuron_rules"), definitions.pop("neuron_rules"))
    params = tensor_params(definitions, chains, to_fields)
    return MergeConfigFile(
        path=path,
        method=method,
        base=base,
        tuned=tuned,
        params=params,
        rules=rules,
        dtype=parse_dtype(data.get("dtype"), "dtype"),
        out_dtype=parse_dtype(data.get("out_dtype"), "out_dtype"),
    )
