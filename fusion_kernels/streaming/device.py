"""The device a merge (or locate, or a sweep) runs on, as the user names it."""

from __future__ import annotations

import torch

from ..errors import ParameterError


def parse_device(text: str | torch.device) -> torch.device:
    """The device a merge runs on: ``cpu``, ``cuda`` or ``cuda:N``, checked to exist here."""
    usage = "use cpu, cuda or cuda:N"
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ParameterError(f"--device {text!r} is not a device; {usage}") from None
    if device.type not in ("cpu", "cuda"):
        raise ParameterError(f"--device {text!r} is not supported; {usage}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ParameterError(f"--device {text!r}: no CUDA device here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ParameterError(
                f"--device {text!r}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
    return device
