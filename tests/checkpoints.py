"""Small checkpoints on disk for IO and CLI tests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from fusion_kernels.demo import PairSpec, generate_pair

#: The commit a cached Hub snapshot is stored under by default.
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY = PairSpec(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=64, shards=2)


#: The tiny Llama text model the transformers-based tests build (vocabulary aside).
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
TINY_VOCAB = 128


def tiny_llama_config(**changes):
    """A ``transformers.LlamaConfig`` of :data:`TINY_TEXT` with a :data:`TINY_VOCAB` vocabulary,
    fields in ``changes`` replaced."""
    import transformers

    return transformers.LlamaConfig(**{**TINY_TEXT, "vocab_size": TINY_VOCAB, **changes})


def tiny_pair(root: Path, **changes) -> tuple[Path, Path]:
    """A two-shard Llama-layout pair small enough for many tests."""
    spec = PairSpec(**{**TINY.__dict__, **changes})
    return generate_pair(root, spec)


def write_single(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A directory with one model.safetensors (and a config.json when given)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below root, to prove inputs are untouched."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str = COMMIT, ref: str = "main"):
    """Put the files of ``source`` in ``cache`` as huggingface_hub stores a downloaded snapshot."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    if ref:
        (folder / "refs" / ref).write_text(commit)
    return snapshot
