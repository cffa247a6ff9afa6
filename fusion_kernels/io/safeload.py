"""Reading the small documents a run is given (index files, headers, YAML configs) safely.

Every input file is opened only if it is a regular file (a FIFO or device would block or never
end), read up to a size limit, decoded as strict UTF-8, and parsed with a bounded nesting depth;
YAML aliases are refused (an alias bomb expands a few hundred bytes into gigabytes). Every
failure is the caller's :class:`~fusion_kernels.errors.FusionError` subclass with one line naming
the file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FusionError

#: Deeper nesting than this is refused; real index files, headers and configs nest 2–6 deep.
MAX_DEPTH = 64
#: Size limits: a config is a few KB; an index lists every tensor (a few MB for the largest).
MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 64 << 20

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def open_regular(path: Path, error: type[FusionError] = FusionError) -> int:
    """An O_RDONLY descriptor of ``path`` (symlinks followed), refused unless it is a regular file.

    The file is opened non-blocking and checked with fstat on the opened descriptor, so a FIFO is
    refused without waiting for a writer, and nothing can be swapped in between check and open.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: not a regular file ({describe_mode(mode)}); point at the file itself")
    os.set_blocking(fd, True)
    return fd


def describe_mode(mode: int) -> str:
    """What a file that is not a regular file is, for messages."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def read_bytes(path: Path, limit: int, error: type[FusionError] = FusionError) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    fd = open_regular(path, error)
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{path}: larger than {limit} bytes; not a file of this kind")
    return data


def read_text(path: Path, limit: int, error: type[FusionError] = FusionError) -> str:
    """A regular file's text, which must be UTF-8."""
    data = read_bytes(path, limit, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def json_depth(raw: bytes) -> int:
    """The deepest bracket nesting of a JSON document (strings are skipped), without parsing it."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    steps = np.zeros(len(skeleton), dtype=np.int64)
    steps[(skeleton == ord("[")) | (skeleton == ord("{"))] = 1
    steps[(skeleton == ord("]")) | (skeleton == ord("}"))] = -1
    return int(np.cumsum(steps).max(initial=0))


def parse_json(raw: bytes, where: Path | str, error: type[FusionError] = FusionError) -> Any:
    """Parse a JSON document of bounded depth; ``where`` names it in the error."""
    if json_depth(raw) > MAX_DEPTH:
        raise error(f"{where}: JSON nested deeper than {MAX_DEPTH} levels; not a valid file")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 (byte {exc.start})") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{where}: not valid JSON ({exc})") from None


def load_json(path: Path, limit: int, error: type[FusionError] = FusionError) -> Any:
    """A JSON file: regular, at most ``limit`` bytes, UTF-8, of bounded depth."""
    return parse_json(read_bytes(path, limit, error), path, error)


def load_yaml(path: Path, error: type[FusionError] = FusionError) -> Any:
    """A YAML file: regular, at most :data:`MAX_CONFIG_BYTES`, UTF-8, of bounded depth, without
    aliases (anchors alone are harmless)."""
    return parse_yaml(read_text(path, MAX_CONFIG_BYTES, error), path, error)


def parse_yaml(text: str, where: Path | str, error: type[FusionError] = FusionError) -> Any:
    """Parse a YAML document of bounded depth and without aliases; ``where`` names it in the
    error."""
    import yaml

    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as exc:
        raise error(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise error(f"{where} is not valid YAML: {problem}") from None
    except RecursionError:
        raise error(f"{where}: YAML nested too deeply") from None
    finally:
        loader.dispose()


class _Refused(Exception):
    pass


def _bounded_loader_class():
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader that refuses aliases and nesting deeper than :data:`MAX_DEPTH`."""

        _depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise _Refused(
                    f"line {mark.line + 1}: YAML aliases (*name) are not accepted; write the "
                    "value out"
                )
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH:
                    raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    return BoundedLoader


class _LazyLoader:
    """Builds the loader class on first use, so importing this module does not import yaml."""

    _cls = None

    def __call__(self, text: str):
        if _LazyLoader._cls is None:
            _LazyLoader._cls = _bounded_loader_class()
        return _LazyLoader._cls(text)


_BoundedLoader = _LazyLoader()
