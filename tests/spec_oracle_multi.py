"""SPEC.md's "Several tuned models" written a second time, as plain Python over lists.

Each model is located by :func:`spec_oracle.spec_locate` (SPEC's one-model rules, with the
model's own seed); everything after that (entry weights, sign election, sums, normalize, λ) is
done here entry by entry with a float32 rounding after every operation, independent of
fusion_kernels.ops.
"""

from __future__ import annotations

import torch
from spec_oracle import f32, spec_locate


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _weighted(base, tuned, name, axis, p: dict, model: int):
    """(W_t, ω_t) of one model as lists, and its (kept, restored, fallbacks, l1_scale)."""
    _, located, in_r, counts = spec_locate(base, tuned, name, axis, {**p, "weight": 1.0}, model)
    w = f32(p.get("weight", 1.0))
    omega = [1.0 if r else w for r in in_r]
    return [f32(o * x) for o, x in zip(omega, located, strict=True)], omega, counts


def _entry(weighted: list[float], omegas: list[float], combine: dict) -> tuple[float, int]:
    """(λ·M, drops) of one entry from its models' W and ω, in model order."""
    consensus = combine.get("consensus", "none")
    if consensus == "none":
        keep = [True] * len(weighted)
    else:
        if consensus == "sum":
            total = weighted[0]
            for x in weighted[1:]:
                total = f32(total + x)
            sigma = 1 if total >= 0 else -1
        else:
            sigma = 1 if sum(_sign(x) for x in weighted) >= 0 else -1
        keep = [_sign(x) == sigma for x in weighted]
    drops = sum(1 for x, k in zip(weighted, keep, strict=True) if x != 0 and not k)
    terms = [x if k else 0.0 for x, k in zip(weighted, keep, strict=True)]
    m = terms[0]
    for x in terms[1:]:
        m = f32(m + x)
    if combine.get("normalize", False):
        parts = [o if k else 0.0 for o, k in zip(omegas, keep, strict=True)]
        divisor = parts[0]
        for x in parts[1:]:
            divisor = f32(divisor + x)
        if divisor != 0:
            m = f32(m / divisor)
    return f32(f32(combine.get("lambda", 1.0)) * m), drops


def spec_merge_multi(base, tuned: list, name: str, axis: str, params: list[dict], combine: dict):
    """(merged tensor, [(kept, restored, fallbacks, l1_scale) per model], dropped)."""
    located = [
        _weighted(base, t, name, axis, p, model)
        for model, (t, p) in enumerate(zip(tuned, params, strict=True), start=1)
    ]
    b = base.float().reshape(-1).tolist()
    merged, dropped = [], 0
    for i, bi in enumerate(b):
        new, drops = _entry([w[i] for w, _, _ in located], [o[i] for _, o, _ in located], combine)
        merged.append(f32(bi + new))
        dropped += drops
    out = torch.tensor(merged, dtype=torch.float32).reshape(base.shape).to(base.dtype)
    return out, [counts for _, _, counts in located], dropped
