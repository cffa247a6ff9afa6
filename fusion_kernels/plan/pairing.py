"""Pairing (part of planning): each tuned tensor's base tensor, and the one-to-one check.

A tuned name is rewritten into base names by the :class:`~fusion_kernels.plan.namemap.NameMap`, then
its layer index by the :class:`~fusion_kernels.plan.layermap.LayerMap`. The tuned language model is
the part of tuned that pairs with base's layers (its prefix, ``language_model.model.`` or
``model.language_model.``, and the tensors the name map rewrites); the rest (vision tower,
projector, image newline, connector) is copied. Strict pairing, the default, requires every base
tensor to pair with exactly one tuned tensor and every tensor of the tuned language model to pair
with a base tensor, unless the layer map declares its layer new; otherwise the plan fails naming
the first unpaired tensors and the likely cause, before anything is written.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from ..errors import PlanError
from ..io.checkpoint import Checkpoint
from .layermap import LayerMap
from .namemap import NameMap

_LAYER = re.compile(r"^(.*?)layers\.(\d+)\.(.+)$")
# How many unpaired names the error spells out.
_SHOWN = 3


@dataclass(frozen=True)
class Pair:
    """A tuned tensor's base tensor (None: none) and, when it has none, why it is copied."""

    base: str | None
    reason: str = ""


@dataclass
class Structure:
    """What the one-to-one check found; the lists are empty for a strict plan."""

    strict: bool = True
    language_model: tuple[str, ...] = ()
    new: list[str] = field(default_factory=list)
    unpaired_base: list[str] = field(default_factory=list)
    unpaired_tuned: list[str] = field(default_factory=list)
    paired_twice: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "strict": self.strict,
            "language_model_prefixes": list(self.language_model),
            "new_tensors": len(self.new),
            "unpaired_base": self.unpaired_base,
            "unpaired_tuned": self.unpaired_tuned,
            "paired_twice": self.paired_twice,
        }


def pair_all(
    base: Checkpoint, tuned: Checkpoint, name_map: NameMap, layer_map: LayerMap, strict: bool
) -> tuple[dict[str, Pair], Structure]:
    """Pair every tuned tensor; raises PlanError when ``strict`` and the pairing is not one to
    one (the message names the first unpaired tensors and the likely cause)."""
    pairs = {name: _pair(name, base, name_map, layer_map) for name in tuned.names()}
    prefixes = _language_model(pairs, name_map, layer_map)
    structure = Structure(strict, prefixes)
    for name, found in pairs.items():
        if found.base is None and found.reason.startswith("new layer"):
            structure.new.append(name)
        elif found.base is None and name.startswith(prefixes):
            structure.unpaired_tuned.append(name)
            pairs[name] = Pair(None, "no base counterpart")
    uses = Counter(p.base for p in pairs.values() if p.base is not None)
    structure.unpaired_base = [n for n in base.names() if n not in uses]
    structure.paired_twice = [n for n, count in uses.items() if count > 1 and not _tied(n, pairs)]
    if strict and (structure.unpaired_base or structure.unpaired_tuned or structure.paired_twice):
        raise PlanError(_refusal(base, pairs, layer_map, structure))
    return pairs, structure


def _pair(name: str, base: Checkpoint, name_map: NameMap, layer_map: LayerMap) -> Pair:
    for candidate in name_map.candidates(name):
        renamed = layer_map.rename(candidate)
        if renamed is None:
            return Pair(None, f"new layer per {layer_map.source}")
        if renamed in base.tensors:
            return Pair(renamed)
    return Pair(None, "outside the language model")


def _language_model(pairs: dict[str, Pair], name_map: NameMap, layer_map: LayerMap):
    """The tuned prefixes that hold the language model: where its layers pair with base's (or are
    new), and every non-empty prefix the name map rewrites. Empty: all of tuned."""
    layer_prefixes = Counter()
    for name, found in pairs.items():
        match = _LAYER.match(name)
        in_layers = found.base is not None and found.base.startswith(layer_map.prefix + "layers.")
        if match and (in_layers or found.reason.startswith("new layer")):
            layer_prefixes[match.group(1)] += 1
    if not layer_prefixes:
        return ("",)
    rule_prefixes = {t for t, _ in name_map.rules if t}
    return tuple(sorted({layer_prefixes.most_common(1)[0][0], *rule_prefixes}))


def _tied(base_name: str, pairs: dict[str, Pair]) -> bool:
    """A base with tied embeddings pairs its embedding with tuned's embedding and lm_head."""
    users = [t for t, p in pairs.items() if p.base == base_name]
    heads = [t for t in users if t.endswith("lm_head.weight")]
    return base_name.endswith("embed_tokens.weight") and len(users) == 2 and len(heads) == 1


def _refusal(base: Checkpoint, pairs, layer_map: LayerMap, structure: Structure) -> str:
    parts = []
    if structure.unpaired_tuned:
        parts.append(
            f"tuned language-model tensors without a base counterpart: "
            f"{_first(structure.unpaired_tuned)}"
        )
    if structure.unpaired_base:
        parts.append(f"base tensors without a tuned counterpart: {_first(structure.unpaired_base)}")
    if structure.paired_twice:
        parts.append(f"base tensors paired more than once: {_first(structure.paired_twice)}")
    return (
        f"base and tuned do not pair one to one: {'; '.join(parts)}; likely "
        f"{_likely_cause(base, pairs, layer_map, structure)}; check --base (or --map/--layer-map), "
        "or pass --allow-unpaired to merge anyway"
    )


def _first(names: list[str]) -> str:
    more = f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(repr(n) for n in names[:_SHOWN]) + more


def _likely_cause(base: Checkpoint, pairs, layer_map: LayerMap, structure: Structure) -> str:
    paired = sum(p.base is not None for p in pairs.values())
    if paired == 0 or paired < len(base.tensors) / 2:
        return (
            f"the wrong base ({paired} of its {len(base.tensors)} tensors pair with tuned's "
            "language model)"
        )
    if _untied_base_of_tied_tuned(structure, pairs):
        return (
            "a tie mismatch, not another architecture (tie_word_embeddings is false in base, "
            "which stores its own lm_head.weight, and true in tuned, whose lm_head is the "
            "embedding and is not stored; use the base tuned started from, or save tuned with "
            "tie_word_embeddings false so that its lm_head is written)"
        )
    base_layers, base_parts = _layers(base.names(), (layer_map.prefix,))
    tuned_names = [n for n in pairs if n not in structure.new]
    tuned_layers, tuned_parts = _layers(tuned_names, structure.language_model)
    if len(base_layers) != len(tuned_layers):
        new = f" besides {len(layer_map.new_layers)} new ones" if layer_map.new_layers else ""
        return (
            f"a different depth (base has {_count(base_layers, 'layer')}, tuned's language model "
            f"{len(tuned_layers)}{new}; use the base it was tuned from, or --layer-map)"
        )
    unmapped = _unmapped(pairs, structure.unpaired_base)
    if unmapped:
        tuned_name, base_name = unmapped
        prefix = tuned_name.removesuffix(base_name)
        return (
            f"a name map that misses some tensors (no rule pairs tuned {tuned_name!r} with base "
            f"{base_name!r}; add --map {prefix}= : an empty BASE_PREFIX is the top level)"
        )
    if base_parts != tuned_parts:
        only_base, only_tuned = sorted(base_parts - tuned_parts), sorted(tuned_parts - base_parts)
        detail = (
            f"base layers have {', '.join(only_base[:_SHOWN])} that tuned's lack"
            if only_base
            else f"tuned's layers have {', '.join(only_tuned[:_SHOWN])} that base's lack"
        )
        return f"a base of another family ({detail}; use the text model tuned started from)"
    return "a base of another architecture (the layers match but other tensors do not)"


def _unmapped(pairs, unpaired_base: list[str]) -> tuple[str, str] | None:
    """``(tuned, base)``: an unpaired base tensor that an unpaired tuned tensor holds under a
    prefix no rule rewrites (``language_model.lm_head.weight`` for ``lm_head.weight``)."""
    unpaired_tuned = [t for t, p in pairs.items() if p.base is None]
    for base_name in unpaired_base:
        for tuned_name in unpaired_tuned:
            if tuned_name.endswith("." + base_name):
                return tuned_name, base_name
    return None


def _untied_base_of_tied_tuned(structure: Structure, pairs) -> bool:
    """Base's lm_head is the only unpaired tensor and tuned has no lm_head of its own."""
    heads = [n for n in structure.unpaired_base if n.endswith("lm_head.weight")]
    return (
        len(heads) == len(structure.unpaired_base) == 1
        and not structure.unpaired_tuned
        and not any(n.endswith("lm_head.weight") for n in pairs)
    )


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'s' * (len(items) != 1)}"


def _layers(names, prefixes: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """Layer indices and the names within a layer (``mlp.up_proj.weight``) under ``prefixes``."""
    indices, parts = set(), set()
    for name in names:
        match = _LAYER.match(name)
        if match and match.group(1) in prefixes:
            indices.add(match.group(2))
            parts.add(match.group(3))
    return indices, parts
