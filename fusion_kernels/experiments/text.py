"""The English of the miniature: docstrings of Python's standard library, collected in a fixed
order, as character token ids; the held-out windows language ability (LA) is measured on, and
their digest, which a model directory records so its evaluation reads the same text.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings
from functools import lru_cache
from typing import Any

import torch

from .spec import CHAR_ID, MiniatureSpec

#: Standard-library modules whose docstrings are the English corpus, in a fixed order.
MODULES = (
    "abc",
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "cmath",
    "codecs",
    "collections",
    "colorsys",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email.message",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "getopt",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "linecache",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "pprint",
    "pydoc",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "socket",
    "socketserver",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
)


def collect_docstrings(modules: tuple[str, ...] | list[str] = MODULES) -> list[str]:
    """Docstrings of the modules and their public classes, functions and methods, deduplicated,
    in module order then name order (what the installed Python ships, so it varies by version)."""
    docs: list[str] = []
    seen: set[str] = set()

    def add(doc: Any) -> None:
        if not isinstance(doc, str):
            return
        doc = inspect.cleandoc(doc)
        if len(doc) >= 40 and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    with warnings.catch_warnings():
        # Touching deprecated aliases (typing.io, ...) warns; their text is as good as any.
        warnings.simplefilter("ignore")
        for module_name in modules:
            module = importlib.import_module(module_name)
            add(module.__doc__)
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                add(getattr(obj, "__doc__", None))
                if inspect.isclass(obj):
                    for member_name, member in sorted(vars(obj).items()):
                        if not member_name.startswith("_"):
                            add(getattr(member, "__doc__", None))
    return docs


def encode(text: str) -> torch.Tensor:
    """Token ids of ``text``; characters outside the vocabulary are dropped."""
    return torch.tensor([CHAR_ID[c] for c in text if c in CHAR_ID], dtype=torch.long)


@lru_cache(maxsize=2)
def corpus(modules: tuple[str, ...] = tuple(MODULES)) -> tuple[torch.Tensor, torch.Tensor]:
    """(training text, held-out text) as token ids; every tenth docstring is held out."""
    docs = collect_docstrings(modules)
    train = "\n\n".join(d for i, d in enumerate(docs) if i % 10 != 9)
    held_out = "\n\n".join(d for i, d in enumerate(docs) if i % 10 == 9)
    return encode(train), encode(held_out)


def text_batch(ids: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``length`` tokens."""
    starts = torch.randint(0, len(ids) - length, (batch,), generator=gen)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def held_out_windows(spec: MiniatureSpec) -> torch.Tensor:
    """The held-out text LA is measured on: the first ``eval_windows`` non-overlapping windows."""
    held_out = corpus()[1]
    length = spec.context + 1
    count = min(spec.eval_windows, len(held_out) // length)
    return held_out[: count * length].view(count, length)


def held_out_sha256(spec: MiniatureSpec) -> str:
    """The digest of :func:`held_out_windows`, recorded by a model directory and checked on load."""
    return hashlib.sha256(held_out_windows(spec).numpy().tobytes()).hexdigest()
