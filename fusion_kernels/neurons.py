"""Which slices of a weight are neurons (SPEC.md "Neurons"): default name rules plus user rules.

A rule maps a regular expression (searched in the tensor name) to an axis: ``row``, ``col`` or
``none``. User rules are checked first, in the order given; the first match wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ParameterError, PlanError
from .params import check_pattern

AXES = ("row", "col", "none")


@dataclass(frozen=True)
class NeuronRule:
    """``pattern`` (a regex searched in the tensor name) → ``axis`` (row, col or none)."""

    pattern: str
    axis: str

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


# Llama, Mistral, Qwen2 and their LLaVA wrappings: q/k/v and gate/up produce one output per row
# (a row is a neuron); o_proj and down_proj consume one neuron per column.
DEFAULT_RULES: tuple[NeuronRule, ...] = (
    NeuronRule(r"self_attn\.(q|k|v|qkv)_proj\.weight$", "row"),
    NeuronRule(r"mlp\.(gate|up|gate_up)_proj\.weight$", "row"),
    NeuronRule(r"self_attn\.o_proj\.weight$", "col"),
    NeuronRule(r"mlp\.down_proj\.weight$", "col"),
)


def parse_rule(text: str) -> NeuronRule:
    """Parse ``REGEX=row|col|none`` (the last ``=`` splits, so the regex may contain ``=``)."""
    pattern, sep, axis = text.rpartition("=")
    if not sep or not pattern:
        raise ParameterError(f"neuron rule {text!r} must look like REGEX=row|col|none")
    if axis not in AXES:
        raise ParameterError(f"neuron rule {text!r}: axis must be row, col or none, not {axis!r}")
    check_pattern(pattern, f"neuron rule {text!r}")
    return NeuronRule(pattern, axis)


class NeuronRules:
    """User rules in front of the defaults; ``axis_for(name)`` gives the neuron axis of a tensor."""

    def __init__(self, user_rules: Iterable[NeuronRule | str] = (), use_defaults: bool = True):
        parsed = [r if isinstance(r, NeuronRule) else parse_rule(r) for r in user_rules]
        self.rules: Sequence[NeuronRule] = (*parsed, *(DEFAULT_RULES if use_defaults else ()))

    def match(self, name: str) -> NeuronRule | None:
        """The first rule that matches ``name``, or None."""
        return next((rule for rule in self.rules if rule.matches(name)), None)

    def axis_for(self, name: str, shape: Sequence[int] | None = None) -> str:
        """``row``, ``col`` or ``none`` for the tensor called ``name`` of ``shape``.

        Only 2-D weights have neurons. A default rule that matches a tensor of another rank gives
        ``none`` (a norm or a 3-D expert stack named like a projection); a user rule that does is a
        mistake in the rule, so it raises :class:`PlanError`. ``shape=None`` checks the name alone.
        """
        rule = self.match(name)
        if rule is None or rule.axis == "none":
            return "none"
        if shape is None or len(shape) == 2:
            return rule.axis
        if rule in DEFAULT_RULES:
            return "none"
        raise PlanError(
            f"tensor {name!r} has shape {list(shape)}, but neuron rule "
            f"{rule.pattern!r}={rule.axis} needs a 2-D weight; narrow the rule's regex"
        )


def default_axis(name: str, shape: Sequence[int] | None = None) -> str:
    """The axis SPEC's default rules give ``name`` (of ``shape``, when given)."""
    return NeuronRules().axis_for(name, shape)
