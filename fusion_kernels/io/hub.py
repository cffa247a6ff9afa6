"""Hugging Face Hub ids (``org/name``, ``org/name@revision``) resolved to local snapshots.

Resolution goes through ``huggingface_hub``'s cache: a snapshot already there is used as it is
(offline, or when the Hub is unreachable); otherwise only the files a merge reads are downloaded:
weights (safetensors, or ``.bin`` when the repository has no safetensors), configs, tokenizer,
processor and chat-template files, and the model card (for its license). ``HF_HUB_OFFLINE``,
``HF_HUB_CACHE`` and ``HF_HOME`` are read when an id is resolved, not at import. Files in the
cache are inputs like any other: read, never written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")

#: What a merge reads from a repository besides its weights.
SIDE_FILES = ("*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt", "README.md")
SAFETENSORS_FILES = ("*.safetensors",)
BIN_FILES = ("pytorch_model*.bin", "adapter_model.bin")


@dataclass(frozen=True)
class HubSnapshot:
    """A resolved id: the snapshot directory and the repository's cache folder (both inputs)."""

    reference: str
    directory: Path
    repo_folder: Path


def is_hub_id(text: str) -> bool:
    """True for ``org/name`` or ``org/name@revision`` (a local path that exists is not an id)."""
    return _ID.fullmatch(text) is not None and not Path(text).exists()


def parse_id(text: str) -> tuple[str, str | None]:
    """``org/name@rev`` → ``("org/name", "rev")``; no revision → ``None`` (the default branch)."""
    repo, _, revision = text.partition("@")
    return repo, revision or None


def cache_dir() -> Path:
    """The Hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_repo_folder(text: str) -> Path:
    """Where the cache keeps the repository of a Hub id (``models--ORG--NAME``), whether or not
    it is there; nothing is downloaded."""
    repo, _ = parse_id(text)
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def resolve(text: str) -> HubSnapshot:
    """The local snapshot of a Hub id, downloading what a merge reads when it is not cached.

    Raises CheckpointError (one line: the id, why, and what to do) when huggingface_hub is
    missing, or the id is neither cached nor reachable.
    """
    repo, revision = parse_id(text)
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{text}: not a local path, and huggingface_hub (needed for Hub ids) is not "
            "installed; pip install huggingface_hub or give a local directory"
        ) from None
    cache, is_offline = cache_dir(), offline()
    patterns = _patterns(huggingface_hub, repo, revision, is_offline)
    try:
        folder = huggingface_hub.snapshot_download(
            repo,
            revision=revision,
            cache_dir=cache,
            allow_patterns=patterns,
            local_files_only=is_offline,
        )
    except Exception as exc:  # every Hub failure gets the same answer
        # A cached snapshot that lacks files we did not need (the other weight format, a card)
        # is still usable: opening the checkpoint names any file that is really missing.
        if getattr(exc, "snapshot_path", None):
            directory = Path(exc.snapshot_path)
            return HubSnapshot(text, directory, directory.parent.parent)
        where = "HF_HUB_OFFLINE is set" if is_offline else "the Hub could not be reached"
        raise CheckpointError(
            f"{text}: no such local path, not in the Hugging Face cache {cache} and {where} "
            f"({type(exc).__name__}); download it first (hf download {repo}"
            f"{' --revision ' + revision if revision else ''}) or give a local directory"
        ) from None
    directory = Path(folder)
    return HubSnapshot(text, directory, directory.parent.parent)


def _patterns(huggingface_hub, repo: str, revision: str | None, is_offline: bool) -> list[str]:
    """Side files plus one weight format: safetensors when the repository has them, else .bin."""
    weights = [*SAFETENSORS_FILES, *BIN_FILES]
    if is_offline:
        return [*SIDE_FILES, *weights]
    try:
        files = huggingface_hub.list_repo_files(repo, revision=revision)
    except Exception:  # unreachable: snapshot_download falls back to the cache
        return [*SIDE_FILES, *weights]
    if any(f.endswith(".safetensors") for f in files):
        weights = list(SAFETENSORS_FILES)
    return [*SIDE_FILES, *weights]
