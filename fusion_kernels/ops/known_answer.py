"""The known-answer check: a device is trusted only once it has merged known tensors right.

The device path (Triton on CUDA) is tested against the torch reference under Triton's
interpreter and on the GPUs it was run on, but a card it has never run on may compile or round
differently, and a merge would write whatever it computes. Before the first tensor goes to such a
device, :func:`check_device` merges a few small tensors there, covering every selection
(magnitude exact and approx, breadcrumbs, random, della, none) and restore (none, replace,
rescale on rows and columns) path plus the user's own parameters, and compares each result
with the torch reference on the CPU: counts exactly, values byte for byte, except where a scale is
a ratio of float64 sums (the l1 rescale, restore=rescale on a neuron axis), whose last bit may
follow the summation order (1 ulp, as every backend's tests allow). It takes milliseconds. A
mismatch refuses the merge before anything is written, naming the device, the case and what
differed.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from ..errors import FusionError
from ..params import MergeParams
from .reference import merge_reference

#: Device types whose merges are the tested reference path: no check needed.
TRUSTED_DEVICE_TYPES = ("cpu",)
NAME = "model.layers.0.mlp.down_proj.weight"

_ROWS, _COLS = (24, 40), (40, 24)
_B16, _F16, _F32 = torch.bfloat16, torch.float16, torch.float32
# (params, shape, axis, dtype): every selection and restore path at least once.
CASES: tuple[tuple[MergeParams, tuple[int, ...], str, torch.dtype], ...] = (
    (MergeParams("magnitude", 0.3, restore="replace"), _ROWS, "row", _B16),
    (MergeParams("magnitude", 0.5, restore="rescale", select="approx"), _COLS, "col", _F16),
    (MergeParams("breadcrumbs", 0.3, 0.05, restore="rescale"), _ROWS, "row", _F32),
    (MergeParams("breadcrumbs", 0.2, 0.02, select="approx"), (1000,), "none", _B16),
    (MergeParams("random", 0.4, rescale="inverse", restore="replace"), _ROWS, "col", _B16),
    (MergeParams("random", 0.4, rescale="l1", restore="rescale"), _ROWS, "row", _F16),
    (MergeParams("della", 0.4, rescale="inverse", restore="rescale"), _ROWS, "col", _F32),
    (MergeParams("della", 0.4, rescale="l1", restore="replace"), _ROWS, "row", _B16),
    (MergeParams("none", weight=0.7, restore="rescale"), _ROWS, "row", _B16),
)


class DeviceCheckError(FusionError):
    """A device merged a known-answer tensor differently from the reference."""


def check_device(
    device: torch.device, backend: str | None, params: MergeParams
) -> dict[str, object] | None:
    """Run the known-answer check on ``device`` (None where the device type is trusted).

    ``backend`` is chosen as the merge chooses it. Returns what the report records; raises
    :class:`DeviceCheckError` on the first mismatch.
    """
    if device.type in TRUSTED_DEVICE_TYPES:
        return None
    cases = [*CASES, (params, _ROWS, "row", _B16)]
    used = ""
    for index, (case, shape, axis, dtype) in enumerate(cases):
        used = _check_case(device, backend, case, _pair(shape, dtype, index), axis)
    return {"device": str(device), "backend": used, "cases": len(cases), "passed": True}


def _pair(shape, dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and tuned near it, some |Δ| tied (a few magnitudes), some spread."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    spread = 0.02 * torch.randn(shape, generator=gen)
    tied = 0.01 * torch.randint(-3, 4, shape, generator=gen).float()
    pick = torch.rand(shape, generator=gen) < 0.5
    return base.to(dtype), (base + torch.where(pick, tied, spread)).to(dtype)


def _check_case(device, backend, params: MergeParams, pair, axis: str) -> str:
    """Merge one case on the device and against the reference; the backend used."""
    from . import merge_tensor  # the package imports this module's users, not the reverse

    base, tuned = pair
    want = torch.full_like(base, float("nan"))
    want_stats = merge_reference(base, tuned, want, NAME, axis, params)
    got, stats = merge_tensor(
        base.to(device), tuned.to(device), NAME, axis=axis, backend=backend, params=params
    )
    got = got.cpu()
    ulps = _allowed_ulps(params, axis)
    differ = _ulp_distance(got, want) > ulps
    expected = asdict(want_stats)
    found = {key: getattr(stats, key) for key in expected}
    scale_ok = math.isclose(found.pop("l1_scale"), expected.pop("l1_scale"), rel_tol=ulps * 2**-23)
    if bool(differ.any()) or found != expected or not scale_ok:
        raise DeviceCheckError(
            f"known-answer check failed on {_describe(device)} (backend {stats.backend}, "
            f"{_method(params)}, axis {axis}, {str(base.dtype).removeprefix('torch.')}): "
            f"{_difference(differ, got, want, found, expected)}; its merges cannot be trusted: "
            "use --device cpu"
        )
    return stats.backend


def _allowed_ulps(params: MergeParams, axis: str) -> int:
    """1 where a scale is a ratio of float64 sums (summation order may move its last bit)."""
    l1 = params.suppress in ("random", "della") and params.rescale_mode == "l1"
    return int(l1 or (params.restore == "rescale" and axis != "none"))


def _ulp_distance(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Units in the last place between equal-shaped tensors; NaN against a number is far."""
    width = got.element_size()

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.reshape(-1).view({2: torch.int16, 4: torch.int32}[width]).to(torch.int64)
        return torch.where(bits < 0, -(bits + (1 << (8 * width - 1))), bits)

    distance = (ordered(got) - ordered(want)).abs()
    return torch.where(got.reshape(-1).isnan() != want.reshape(-1).isnan(), 1 << 40, distance)


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _method(params: MergeParams) -> str:
    parts = [f"suppress {params.suppress}", f"restore {params.restore}"]
    if params.suppress in ("random", "della"):
        parts.append(f"rescale {params.rescale_mode}")
    if params.select != "exact":
        parts.append(f"select {params.select}")
    return ", ".join(parts)


def _difference(differ, got, want, found: dict, expected: dict) -> str:
    count = int(differ.sum())
    if count:
        first = int(differ.nonzero()[0])
        value, reference = got.reshape(-1)[first].item(), want.reshape(-1)[first].item()
        return (
            f"{count} of {differ.numel()} entries differ from the reference (first at flat "
            f"index {first}: {value!r}, reference {reference!r})"
        )
    for key in expected:
        if found[key] != expected[key]:
            return f"{key} is {found[key]!r}, reference {expected[key]!r}"
    return "the l1 scale differs from the reference's by more than 1 ulp"


__all__ = ["CASES", "TRUSTED_DEVICE_TYPES", "DeviceCheckError", "check_device"]
