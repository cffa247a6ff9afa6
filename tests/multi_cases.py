"""Inputs and the comparison rule of the tests of a merge of several tuned models: a base with N
tuned models whose deltas partly agree and partly conflict in sign, per-model parameters, the
combine settings, and :func:`assert_same_multi`, the rule every backend is held to."""

from __future__ import annotations

import torch
from conftest import assert_tensors_equal, assert_within_ulp, double_summed_scale

from fusion_kernels.params import Combine, params_for

#: Per-model weights w_t (model t takes WEIGHTS[t - 1]).
WEIGHTS = (1.0, 0.6, 1.25, 0.5, 0.8)
#: A different method per model, restores and random masks included.
MIXED_METHODS = ("neu-p-ties", "dare", "della", "neu-s-bread", "task_arithmetic")
COMBINES = [
    Combine(),
    Combine("sum"),
    Combine("count"),
    Combine("sum", True),
    Combine("none", True, 0.7),
    Combine("count", True, 1.5),
]


def combine_id(c: Combine) -> str:
    return (
        f"{c.consensus}{'-norm' if c.normalize else ''}{f'-l{c.lambda_}' if c.lambda_ != 1 else ''}"
    )


def make_models(shape, dtype, models: int, seed: int = 0, tied: bool = False):
    """(base, [tuned_1 … tuned_N]) in ``dtype``: each delta is a shared direction plus the
    model's own, so signs agree in some entries and conflict in others; ``tied`` draws the
    magnitudes from a few levels (many exact |Δ| ties, as bf16 fine-tunes have)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    shared = torch.randn(shape, generator=gen)
    tuned = []
    for _ in range(models):
        own = torch.randn(shape, generator=gen)
        delta = 0.02 * (shared + 1.5 * own)
        if tied:
            levels = torch.tensor([0.0, 0.005, 0.01, 0.02])
            delta = levels[torch.randint(0, 4, shape, generator=gen)] * torch.sign(delta)
        tuned.append((base + delta).to(dtype))
    return base.to(dtype), tuned


def model_params(method: str, models: int, mixed: bool = False):
    """Per-model parameters: the preset with each model's weight, or one method per model."""
    if mixed:
        return [params_for(MIXED_METHODS[t], weight=WEIGHTS[t]) for t in range(models)]
    return [params_for(method, weight=WEIGHTS[t]) for t in range(models)]


def assert_same_multi(out, stats, ref_out, ref_stats, params, axis: str, what: str = ""):
    """Each model's kept, restored and fallbacks equal, the drops equal, and the output bit for
    bit; where some model's scale is a ratio of double sums (l1, Neu-S; see conftest), SPEC
    allows that scale 1 ulp, so the output within one ulp per model."""
    got = [(s.kept, s.restored, s.fallbacks) for s in stats.models]
    want = [(s.kept, s.restored, s.fallbacks) for s in ref_stats.models]
    assert got == want, f"{what}: stats {stats.models} != reference {ref_stats.models}"
    assert stats.dropped == ref_stats.dropped, f"{what}: dropped {stats.dropped}"
    if not any(double_summed_scale(p, axis) for p in params):
        assert [s.l1_scale for s in stats.models] == [s.l1_scale for s in ref_stats.models], what
        assert_tensors_equal(out, ref_out, what)
    else:
        assert_within_ulp(out, ref_out, len(params), what)
