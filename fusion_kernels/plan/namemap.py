"""Name mapping from the tuned checkpoint to the base (part of planning).

A multimodal fine-tune wraps the language model under a prefix: ``language_model.model.layers.0…``
and ``language_model.lm_head.weight`` in the classic LLaVA layout,
``model.language_model.layers.0…`` with a top-level ``lm_head.weight`` in the newer transformers
layout, while the base LLM says ``model.layers.0…`` and ``lm_head.weight``. A :class:`NameMap` is
a list of prefix rewrites (tuned prefix → base prefix), longest first, with the identity as the
last resort; ``detect`` finds it from names and shapes.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from ..errors import ParameterError, PlanError
from ..io.checkpoint import Checkpoint

_LAYER = re.compile(r"^(.*?)(layers\.\d+\..*)$")


@dataclass(frozen=True)
class NameMap:
    """Prefix rewrites ``(tuned_prefix, base_prefix)``; ``detected``: inferred, not given."""

    rules: tuple[tuple[str, str], ...] = ()
    detected: bool = False

    def base_name(self, tuned_name: str, base_names) -> str | None:
        """The base tensor for ``tuned_name`` (the first rule landing on a base name), or None."""
        return next((c for c in self.candidates(tuned_name) if c in base_names), None)

    def candidates(self, tuned_name: str):
        """``tuned_name`` rewritten by each rule that applies, in order, the identity last."""
        for tuned_prefix, base_prefix in (*self.rules, ("", "")):
            if tuned_name.startswith(tuned_prefix):
                yield base_prefix + tuned_name[len(tuned_prefix) :]

    @property
    def is_identity(self) -> bool:
        return all(t == b for t, b in self.rules)

    def describe(self) -> list[str]:
        return [f"{t or '(top level)'} -> {b or '(top level)'}" for t, b in self.rules] or [
            "identity"
        ]


def parse_map(text: str) -> tuple[str, str]:
    """``TUNED_PREFIX=BASE_PREFIX`` (either side may be empty: the top level)."""
    tuned_prefix, sep, base_prefix = text.partition("=")
    if not sep:
        raise ParameterError(
            f"--map {text!r} must look like TUNED_PREFIX=BASE_PREFIX (either may be empty: the "
            "top level, e.g. language_model.= )"
        )
    return tuned_prefix, base_prefix


def user_map(base: Checkpoint, tuned: Checkpoint, texts: list[str]) -> NameMap:
    """A map from ``--map`` options; each rule must pair at least one tensor, else it is wrong."""
    rules = tuple(sorted((parse_map(t) for t in texts), key=lambda r: -len(r[0])))
    for tuned_prefix, base_prefix in rules:
        hits = [
            n
            for n in tuned.tensors
            if n.startswith(tuned_prefix) and base_prefix + n[len(tuned_prefix) :] in base.tensors
        ]
        if not hits:
            raise PlanError(
                f"--map {tuned_prefix}={base_prefix} pairs no tuned tensor with a base tensor "
                f"(e.g. tuned {next(iter(tuned.tensors))!r}, base {next(iter(base.tensors))!r})"
            )
    return NameMap(rules)


def detect(base: Checkpoint, tuned: Checkpoint) -> NameMap:
    """Infer the map: the tuned prefix whose layer tensors match base's layers by name and shape,
    where each remaining base top-level tensor (``lm_head.weight``) lives in tuned, and, when base
    ties its lm_head to the embeddings (stores none), tuned's lm_head merges against those."""
    base_prefix, base_layers = _layer_signature(base)
    identity = bool(base.tensors.keys() & tuned.tensors.keys()) and _identity_fits(base, tuned)
    rules = [] if identity else _wrapped_rules(base, tuned, base_prefix, base_layers)
    rules.extend(_tied_head_rule(base, tuned, rules, base_prefix))
    return NameMap(tuple(sorted(set(rules), key=lambda r: -len(r[0]))), detected=bool(rules))


def _wrapped_rules(base, tuned, base_prefix, base_layers) -> list[tuple[str, str]]:
    """Rules for a tuned checkpoint that wraps base's language model under a prefix."""
    scores = Counter()
    for name, info in tuned.tensors.items():
        match = _LAYER.match(name)
        if match and (match.group(2), info.shape[1:]) in base_layers:
            scores[match.group(1)] += 1
    if not scores:
        return []
    ranked = scores.most_common(2)
    if len(ranked) == 2 and ranked[0][1] == ranked[1][1]:
        raise PlanError(
            f"tuned names match base layers under two prefixes, {ranked[0][0]!r} and "
            f"{ranked[1][0]!r}; say which with --map TUNED_PREFIX={base_prefix}"
        )
    lm_prefix = ranked[0][0]
    return [(lm_prefix, base_prefix), *_top_level_rules(base, tuned, base_prefix, lm_prefix)]


def _tied_head_rule(base, tuned, rules, base_prefix) -> list[tuple[str, str]]:
    embed = base_prefix + "embed_tokens.weight"
    if embed not in base.tensors or any(n.endswith("lm_head.weight") for n in base.tensors):
        return []
    mapping = NameMap(tuple(rules))
    for name, info in tuned.tensors.items():
        unpaired = mapping.base_name(name, base.tensors) is None
        if (
            name.endswith("lm_head.weight")
            and unpaired
            and info.shape[1:] == base.info(embed).shape[1:]
        ):
            return [(name.removesuffix("weight"), base_prefix + "embed_tokens.")]
    return []


def _identity_fits(base: Checkpoint, tuned: Checkpoint) -> bool:
    """True when tuned names already are base names (the plain LLM-to-LLM merge)."""
    shared = base.tensors.keys() & tuned.tensors.keys()
    layer_names = [n for n in base.tensors if _LAYER.match(n)]
    return len(shared) >= max(1, len(layer_names)) or len(shared) == len(base.tensors)


def layer_prefix(ckpt: Checkpoint) -> str:
    """The prefix of the checkpoint's (most numerous) ``layers.N.`` tensors: ``model.`` for a
    Llama-style LLM; empty when it has none."""
    return _layer_signature(ckpt)[0]


def _layer_signature(ckpt: Checkpoint) -> tuple[str, set]:
    prefixes, signature = Counter(), set()
    for name, info in ckpt.tensors.items():
        match = _LAYER.match(name)
        if match:
            prefixes[match.group(1)] += 1
            signature.add((match.group(2), info.shape[1:]))
    return (prefixes.most_common(1)[0][0] if prefixes else ""), signature


def _top_level_rules(base, tuned, base_prefix, lm_prefix) -> list[tuple[str, str]]:
    """Rules for base tensors outside the layer prefix, e.g. ``lm_head.weight``."""
    rules = []
    for name, info in base.tensors.items():
        if name.startswith(base_prefix) and base_prefix:
            continue
        holders = [
            t
            for t, ti in tuned.tensors.items()
            if (t == name or t.endswith("." + name)) and ti.shape[1:] == info.shape[1:]
        ]
        prefixes = {t[: len(t) - len(name)] for t in holders}
        # Prefer the one beside the language model (classic LLaVA: language_model.lm_head).
        beside = {p for p in prefixes if lm_prefix.startswith(p)}
        chosen = beside or prefixes
        if len(chosen) > 1:
            raise PlanError(
                f"base tensor {name!r} matches several tuned tensors "
                f"({', '.join(repr(p + name) for p in sorted(chosen))}); choose with --map"
            )
        if chosen:
            rules.append((chosen.pop(), ""))
    return rules
