"""SPEC.md written a second time, as plain Python over lists, for small tensors.

Deliberately independent of fusion_kernels.ops (no sorting of packed keys, no torch.where):
if the reference and this oracle agree, both read SPEC the same way.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from fusion_kernels.hashing import STREAM_DROP, STREAM_TIE, entry_hash_int, mix32_int


def f32(x: float) -> float:
    return float(np.float32(x))


def spec_merge(base: torch.Tensor, tuned: torch.Tensor, name: str, axis: str, p: dict):
    """Returns (merged tensor, kept, restored, fallbacks, l1_scale) per SPEC.md."""
    b, new, _, counts = spec_locate(base, tuned, name, axis, p)
    merged = torch.tensor([f32(bi + x) for bi, x in zip(b, new, strict=True)], dtype=torch.float32)
    return (merged.reshape(base.shape).to(base.dtype), *counts)


def spec_locate(base, tuned, name: str, axis: str, p: dict, model: int = 1):
    """(f32 base as a list, Δ' as a list, whether each entry's neuron is restored, (kept,
    restored, fallbacks, l1_scale)); ``model`` is the tuned model's place in a merge of several
    (SPEC "Several tuned models": its hashes' seed mixes in mix32(model - 1))."""
    shape = base.shape
    b = base.float().reshape(-1).tolist()
    t = tuned.float().reshape(-1).tolist()
    d = [f32(ti - bi) for ti, bi in zip(t, b, strict=True)]
    n = len(d)
    K, seed = p.get("density", 0.2), p.get("seed", 0)
    method = p.get("suppress", "none")
    ts = mix32_int((seed % 2**32) ^ zlib.crc32(name.encode()) ^ mix32_int(model - 1))
    tie = [entry_hash_int(i, ts, STREAM_TIE) for i in range(n)]
    u = [entry_hash_int(i, ts, STREAM_DROP) / 2**32 for i in range(n)]
    order = sorted(range(n), key=lambda i: (-abs(d[i]), -tie[i], i))
    keep, scale, l1 = [False] * n, [1.0] * n, 1.0
    if method == "none":
        keep = [True] * n
    elif method == "magnitude":
        k = n if K >= 1 else 0 if K <= 0 else max(1, int(K * n))
        for i in order[:k]:
            keep[i] = True
    elif method == "breadcrumbs":
        k = int(K * n)
        start = min(int(p.get("gamma", 0.01) * n), n - k)
        for i in order[start : start + k]:
            keep[i] = True
    else:
        prob = [K] * n
        if method == "della":
            eps = p.get("epsilon", 0.15)
            L = shape[-1] if len(shape) else 1
            for row in range(n // L):
                members = [row * L + c for c in range(L)]
                ranked = sorted(members, key=lambda i: (abs(d[i]), tie[i], -i))
                for r, i in enumerate(ranked):
                    prob[i] = K if L == 1 else (K - eps) + ((2 * eps) * r) / (L - 1)
        keep = [u[i] < prob[i] for i in range(n)]
        mode = p.get("rescale") or "l1"
        if mode == "inverse":
            scale = [f32(1.0 / q) if q > 0 else 1.0 for q in prob]
        elif mode == "l1":
            total = math.fsum(abs(x) for x in d)
            kept = math.fsum(abs(d[i]) for i in range(n) if keep[i])
            l1 = 1.0 if total < 1e-7 or kept < 1e-7 else f32(total / kept)
            scale = [l1] * n
    sub = [f32(d[i] * scale[i]) if keep[i] else 0.0 for i in range(n)]
    alpha = f32(p.get("weight", 1.0))
    new = [f32(s * alpha) for s in sub]
    restored = fallbacks = 0
    in_r = [False] * n
    restore = p.get("restore", "none")
    if restore != "none" and axis != "none":
        rows, cols = shape
        neurons = rows if axis == "row" else cols

        def members(j):
            return (
                [j * cols + c for c in range(cols)]
                if axis == "row"
                else [r * cols + j for r in range(rows)]
            )

        change = [math.fsum(abs(d[i]) for i in members(j)) for j in range(neurons)]
        M = p.get("top_neurons", 0.3)
        m = 0 if M <= 0 else max(1, int(M * neurons))
        chosen = sorted(range(neurons), key=lambda j: (-change[j], j))[:m]
        restored = m
        for j in chosen:
            for i in members(j):
                in_r[i] = True
            kept_change = math.fsum(abs(sub[i]) for i in members(j))
            if restore == "replace" or kept_change == 0:
                fallbacks += restore == "rescale"
                for i in members(j):
                    new[i] = d[i]
            else:
                factor = f32(change[j] / kept_change)
                for i in members(j):
                    new[i] = f32(sub[i] * factor)
    return b, new, in_r, (sum(keep), restored, fallbacks, l1)
