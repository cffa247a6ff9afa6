"""Byte sizes as people write them: ``5GB``, ``500MB``, ``2GiB`` or a plain byte count."""

from __future__ import annotations

import re

from .errors import ParameterError

#: Decimal (KB, MB, ...) and binary (KiB, MiB, ...) units, upper-cased, in bytes.
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count → bytes; raises
    :class:`ParameterError` for anything else, zero, or more than a file offset can hold."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise ParameterError(f"size {text!r} must look like 5GB, 500MB, 2GiB or a byte count")
    value = float(match.group(1)) * SIZE_UNITS[unit]
    # A size is used as a file offset and a buffer length: both are int64.
    if not value < 2**63:
        raise ParameterError(f"size {text!r} is too large; at most 8EiB")
    size = int(value)
    if size <= 0:
        raise ParameterError(f"size {text!r} must be positive")
    return size


def format_size(nbytes: float, per: str = "") -> str:
    """A byte count (or rate, with ``per="/s"``) for people: three significant figures in the
    unit that fits (``41.4 kB``, ``1.23 GB/s``), decimal units as ``--max-shard-size`` reads."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(nbytes) < 999.5 or unit == "TB":
            break
        nbytes /= 1000
    figures = ".0f" if unit == "B" or abs(nbytes) >= 999.5 else ".3g"
    return f"{nbytes:{figures}} {unit}{per}"
