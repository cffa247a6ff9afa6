"""What ``--base`` and ``--tuned`` may name, opened as one checkpoint interface.

A reference is a local path (a directory or a single weights file; safetensors or ``.bin``), a
Hugging Face Hub id (``org/name`` or ``org/name@revision``, see :mod:`fusion_kernels.io.hub`), or
``MODEL+ADAPTER``: MODEL (either of the above) with a PEFT LoRA adapter merged in as it is read
(see :mod:`fusion_kernels.io.lora`). A path that exists always wins over the other readings.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from .binreader import BinCheckpoint, is_bin_checkpoint
from .checkpoint import Checkpoint
from .hub import cached_repo_folder, is_hub_id, resolve
from .lora import LoraCheckpoint, is_adapter
from .reader import SafetensorsCheckpoint
from .safetensors_header import INDEX_NAME


def open_checkpoint(reference: str | os.PathLike) -> Checkpoint:
    """Open a reference for reading, with its ``reference`` (the text given) and ``roots``
    (every local path it reads, which an output may not overlap)."""
    text = os.fspath(reference)
    split = split_adapter(text)
    if split is None:
        path, roots = local_path(text)
        return _open_local(path, text, roots)
    model = open_checkpoint(split[0])
    adapter_dir, adapter_roots = local_path(split[1])
    if not is_adapter(adapter_dir):
        raise CheckpointError(
            f"{adapter_dir}: no adapter_config.json; after '+' give a PEFT LoRA adapter"
        )
    roots = [*model.roots, *adapter_roots]
    return LoraCheckpoint(model, adapter_dir, reference=text, roots=roots)


def split_adapter(text: str) -> tuple[str, str] | None:
    """``MODEL+ADAPTER`` → ``(MODEL, ADAPTER)``; None for a plain reference. The first ``+``
    whose both sides name something (a path that exists, or a Hub id) splits."""
    if "+" not in text or Path(text).exists():
        return None
    position = text.find("+")
    while position >= 0:
        model, adapter = text[:position], text[position + 1 :]
        if _names_something(model) and _names_something(adapter):
            return model, adapter
        position = text.find("+", position + 1)
    raise CheckpointError(
        f"{text}: MODEL+ADAPTER, but no '+' splits it into a model and an adapter that exist "
        "(local paths or Hub ids)"
    )


def _names_something(text: str) -> bool:
    return bool(text) and (Path(text).exists() or is_hub_id(text))


def local_path(text: str) -> tuple[Path, list[Path]]:
    """The local path of a reference and the paths it reads (a Hub id: its cache folder too)."""
    path = Path(text)
    if path.exists() or not is_hub_id(text):
        return path, [path]
    snapshot = resolve(text)
    return snapshot.directory, [snapshot.directory, snapshot.repo_folder]


def reference_paths(text: str) -> list[Path]:
    """The local paths a reference reads, found without opening or downloading anything: each
    side of ``MODEL+ADAPTER``, a path that exists, a Hub id's cache folder when it is there."""
    try:
        parts = split_adapter(text) or (text,)
    except CheckpointError:
        parts = (text,)
    found = []
    for part in parts:
        if Path(part).exists():
            found.append(Path(part))
        elif is_hub_id(part) and cached_repo_folder(part).exists():
            found.append(cached_repo_folder(part))
    return found


def _open_local(path: Path, reference: str, roots: list[Path]) -> Checkpoint:
    """The checkpoint at a local path, of the kind its files say."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        model_files = [path / INDEX_NAME, path / "model.safetensors"]
        if is_adapter(path) and not any(f.exists() for f in model_files):
            raise CheckpointError(
                f"{path}: a LoRA adapter, not a model; give it as --tuned MODEL+{path}"
            )
        has_safetensors = model_files[0].exists() or any(path.glob("*.safetensors"))
        is_bin = not has_safetensors and is_bin_checkpoint(path)
    else:
        is_bin = is_bin_checkpoint(path)
    kind = BinCheckpoint if is_bin else SafetensorsCheckpoint
    return kind(path, reference=reference, roots=roots)
