"""A model with a PEFT LoRA adapter merged in, read a tensor at a time (``--tuned MODEL+ADAPTER``).

:class:`LoraCheckpoint` has the :class:`~fusion_kernels.io.checkpoint.Checkpoint` interface; a
tensor the adapter touches is computed when it is read, as PEFT's ``merge_and_unload`` computes it:

- a LoRA pair (``lora_A``/``lora_B``, or ``lora_embedding_A``/``_B``) adds
  ``transpose(f32(B) @ f32(A)) · scale`` to the weight, accumulated in float32 and rounded once
  to the model's dtype. ``scale`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), ``alpha``
  from ``alpha_pattern`` when a key matches the module (:mod:`.adapter_config`); the transpose
  applies where the model stores the weight ``[in, out]`` (a transformers ``Conv1D``, GPT-2
  style) and always for embeddings; PEFT decides this by the module's class, not by
  ``fan_in_fan_out``, and so does this view (by the shapes, or by the model's ``config.json``
  for a square weight). The adapter weights are taken in float32, as PEFT loads them by default
  (``autocast_adapter_dtype``).
- a whole tensor in the adapter (``modules_to_save``, or an embedding saved as ``base_layer``)
  replaces the model's, cast to the model's dtype; it must have the model tensor's shape.

The merged model is never held or written whole: each tensor exists only while it is merged.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import MERGEABLE
from ..errors import CheckpointError
from .adapter_config import (
    ADAPTER_CONFIG,
    MODEL_CONFIG,
    alpha_for,
    is_conv1d,
    model_types,
    rank_for,
    read_config,
)
from .binreader import BinCheckpoint
from .checkpoint import Checkpoint, TensorInfo
from .reader import SafetensorsCheckpoint

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_PAIR = re.compile(r"^(.*)\.(lora_A|lora_B)\.weight$|^(.*)\.(lora_embedding_A|lora_embedding_B)$")


def is_adapter(path: Path) -> bool:
    # exists, not is_file: a FIFO or directory by that name is refused when opened, by name.
    return path.is_dir() and (path / ADAPTER_CONFIG).exists()


@dataclass(frozen=True)
class _Pair:
    """One LoRA update of a model tensor: the adapter tensors, scale and transpose."""

    a: str
    b: str
    scale: float
    transpose: bool


class LoraCheckpoint(Checkpoint):
    """``model`` (any checkpoint) as if the adapter in ``adapter_dir`` were merged into it.

    Structure is checked here, before any weight is read: every adapter tensor must update or
    replace a model tensor of a float dtype and the right shape. A tensor the adapter leaves
    alone is read as the model reads it (direct reads, views of its mapping); one it touches is
    computed whole when it is read.

    Args:
        model: the checkpoint the adapter was trained on.
        adapter_dir: the PEFT adapter's directory.
        reference: the text that named both (default ``MODEL+ADAPTER`` of their references).
        roots: the local paths read (default the model's and ``adapter_dir``).
    """

    def __init__(
        self,
        model: Checkpoint,
        adapter_dir: str | os.PathLike,
        *,
        reference: str | None = None,
        roots: list[Path] | None = None,
    ):
        if reference is None:
            reference = f"{model.reference}+{adapter_dir}"
        if roots is None:
            roots = [*model.roots, Path(adapter_dir)]
        super().__init__(model.path, reference=reference, roots=roots)
        self.model = model
        self.adapter_dir = Path(adapter_dir)
        self.config = read_config(self.adapter_dir)
        self.weights = _open_weights(self.adapter_dir)
        self.directory, self.files = model.directory, model.files
        self.metadata, self.index = model.metadata, model.index
        self.tensors = dict(model.tensors)
        self.pairs: dict[str, _Pair] = {}
        self.replaced: dict[str, str] = {}
        self._plan()
        self._cached: tuple[str, torch.Tensor] | None = None

    def _plan(self) -> None:
        halves: dict[str, dict[str, str]] = {}
        for key in self.weights.names():
            if not key.startswith(_PREFIX):
                raise CheckpointError(
                    f"{self.weights.path}: adapter tensor {key!r} does not start with "
                    f"{_PREFIX!r}; not a PEFT adapter"
                )
            match = _PAIR.match(key[len(_PREFIX) :])
            if match is None:
                self._replace(key)
                continue
            module = match.group(1) or match.group(3)
            part = (match.group(2) or match.group(4))[-1]  # "A" or "B"
            halves.setdefault((module, match.group(3) is not None), {})[part] = key
        for (module, embedding), parts in halves.items():
            self._pair(module, parts, embedding)

    def _replace(self, key: str) -> None:
        target = key[len(_PREFIX) :].replace(".base_layer.", ".").replace(".modules_to_save.", ".")
        info = self._target(target, key)
        shape = self.weights.info(key).shape
        if tuple(shape) != tuple(info.shape):
            # PEFT loads the saved tensor into the model's module, which refuses another shape.
            raise CheckpointError(
                f"{self.weights.path}: {key!r} is {list(shape)} but replaces {target!r} "
                f"{list(info.shape)} in {self.model.path}; pair the adapter with the model it "
                "was trained on (resize the model's vocabulary first if training did)"
            )
        self.replaced[target] = key

    def _pair(self, module: str, parts: dict[str, str], embedding: bool) -> None:
        if "A" not in parts or "B" not in parts:
            raise CheckpointError(
                f"{self.weights.path}: module {module!r} has only one of lora_A and lora_B"
            )
        target = module + ".weight"
        info = self._target(target, parts["A"])
        a, b = self.weights.info(parts["A"]), self.weights.info(parts["B"])
        rank = a.shape[0] if a.shape else 0
        if rank == 0:
            raise CheckpointError(f"{self.weights.path}: LoRA {module!r} has rank 0")
        product = (b.shape[0], a.shape[1]) if len(a.shape) == len(b.shape) == 2 else None
        transpose = embedding or self._stored_transposed(module, info.shape, product)
        expected = product[::-1] if product and transpose else product
        if b.shape[-1:] != (rank,) or expected != tuple(info.shape):
            raise CheckpointError(
                f"{self.weights.path}: LoRA {module!r} (A {list(a.shape)}, B {list(b.shape)}) "
                f"does not fit {target!r} {list(info.shape)} in {self.model.path}"
            )
        if rank != rank_for(self.config, module):
            raise CheckpointError(
                f"{self.weights.path}: LoRA {module!r} has rank {rank} but "
                f"{self.adapter_dir / ADAPTER_CONFIG} gives it rank "
                f"{rank_for(self.config, module)} (r / rank_pattern); PEFT refuses to load it: "
                "fix the config"
            )
        for half in (a, b):
            if half.dtype not in MERGEABLE:
                raise CheckpointError(f"{self.weights.path}: {half.name!r} is {half.dtype}")
        alpha = alpha_for(self.config, module)
        scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        self.pairs[target] = _Pair(a.name, b.name, scale, transpose)

    def _stored_transposed(self, module: str, shape, product) -> bool:
        """Whether the model stores ``module``'s weight ``[in, out]``, the transpose of ``B @ A``
        (``product``: its ``(out, in)``), as a transformers ``Conv1D`` does; PEFT transposes
        there and nowhere else but embeddings. A weight that is not square says it by its shape;
        a square one by the module's class, read from the model's ``config.json``."""
        if product is None:
            return False
        if product[0] != product[1]:
            return tuple(shape) == product[::-1]
        if self.model_types:
            return is_conv1d(module, self.model_types)
        if self.config.get("fan_in_fan_out") in (None, False):
            return False
        raise CheckpointError(
            f"{self.adapter_dir / ADAPTER_CONFIG}: fan_in_fan_out is set, and whether "
            f"{module!r} is a Conv1D (weight [in, out]) or an nn.Linear module cannot be told "
            f"from its square weight: {self.model.directory / MODEL_CONFIG} names no model_type; "
            "add the model's config.json"
        )

    @functools.cached_property
    def model_types(self) -> set[str]:
        """The model's ``model_type`` values (its ``config.json``), which say where PEFT finds a
        Conv1D."""
        return model_types(self.model.directory)

    def _target(self, target: str, key: str):
        info = self.model.tensors.get(target)
        if info is None:
            raise CheckpointError(
                f"{self.weights.path}: adapter tensor {key!r} updates {target!r}, which "
                f"{self.model.path} does not have; pair the adapter with the model it was "
                "trained on"
            )
        if info.dtype not in MERGEABLE:
            raise CheckpointError(f"{info.file}: {target!r} is {info.dtype}, not a float weight")
        return info

    # The Checkpoint interface -----------------------------------------------------------------

    def _computed(self, name: str) -> bool:
        """Whether the adapter updates or replaces the tensor (else it is the model's)."""
        return name in self.pairs or name in self.replaced

    def view(self, name: str, populate: bool = True) -> torch.Tensor:
        if self._computed(name):
            return self._merged(name)
        return self.model.view(name, populate)

    def read(self, name: str) -> torch.Tensor:
        if self._computed(name):
            return self._merged(name)
        return self.model.read(name)

    def mappable(self, name: str) -> bool:
        return not self._computed(name) and self.model.mappable(name)

    def populate(self, name: str, begin: int = 0, end: int | None = None) -> None:
        if not self._computed(name):
            self.model.populate(name, begin, end)

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        if not self._computed(name):
            self.model.release(name, begin, end)

    def prefetch(self, name: str, begin: int = 0, end: int | None = None) -> None:
        if not self._computed(name):
            self.model.prefetch(name, begin, end)

    def direct_bytes(self, name: str) -> int | None:
        return None if self._computed(name) else self.model.direct_bytes(name)

    def read_direct(self, name: str, buffer: torch.Tensor) -> torch.Tensor | None:
        return None if self._computed(name) else self.model.read_direct(name, buffer)

    def row_origin(self, name: str) -> tuple[Checkpoint, TensorInfo] | None:
        """``(checkpoint, TensorInfo)`` whose rows are this tensor's rows, for a merge that
        reads it in chunks (cast to the model's dtype); None for a tensor a LoRA pair updates.

        An updated tensor is computed whole: its product ``B @ A`` is one matrix product, and
        a product of some rows of B is not bit for bit those rows of the whole product (BLAS
        takes other paths for other shapes), so rows computed apart would not be the bytes
        PEFT's ``merge_and_unload`` gives. A replaced tensor's rows are the adapter's.
        """
        if name in self.pairs:
            return None
        if name in self.replaced:
            return self.weights, self.weights.info(self.replaced[name])
        return self.model.row_origin(name)

    def _read_range(self, name: str, offset: int, out) -> None:
        """Bytes of a tensor (staged transfers read one in chunks: the last merged is kept)."""
        if not self._computed(name):
            self.model.read_into(name, offset, out)
            return
        if self._cached is None or self._cached[0] != name:
            self._cached = (name, self._merged(name).reshape(-1).view(torch.uint8))
        out[:] = self._cached[1][offset : offset + len(out)].numpy()
        if offset + len(out) >= self._cached[1].numel():
            self._cached = None

    def close(self) -> None:
        self.model.close()
        self.weights.close()

    # Merging ----------------------------------------------------------------------------------

    def _merged(self, name: str) -> torch.Tensor:
        """The tensor with the adapter merged in, in the model's dtype, in its own memory."""
        info = self.tensors[name]
        if name in self.replaced:
            weight = self.weights.read(self.replaced[name]).to(info.torch_dtype)
        else:
            weight = self.model.view(name)
        pair = self.pairs.get(name)
        if pair is None:
            return weight
        a = self.weights.read(pair.a).float()
        b = self.weights.read(pair.b).float()
        # PEFT's order of operations: (B @ A), transposed, times the scale (one rounding each).
        product = (b @ a).mul_(pair.scale)
        delta = product.T if pair.transpose else product
        # PEFT adds delta to the weight in float32 and rounds once to the weight's dtype; the
        # sum is the same with the operands swapped, so it accumulates into delta, the weight is
        # read where it lies (no copy), and one cast writes the result.
        delta.add_(weight)
        if name not in self.replaced:
            self.model.release(name)
        merged = torch.empty(info.shape, dtype=info.torch_dtype)
        merged.copy_(delta)
        return merged


def _open_weights(adapter_dir: Path) -> Checkpoint:
    for filename in ADAPTER_WEIGHTS:
        path = adapter_dir / filename
        if path.exists():
            kind = SafetensorsCheckpoint if path.suffix == ".safetensors" else BinCheckpoint
            return kind(path)
    raise CheckpointError(f"{adapter_dir}: no {' or '.join(ADAPTER_WEIGHTS)} beside its config")
