"""Neuron rules on their own: the defaults, user rules first, parsing, and rank checks."""

import pytest

from fusion_kernels.errors import ParameterError, PlanError
from fusion_kernels.neurons import NeuronRule, NeuronRules, default_axis, parse_rule


@pytest.mark.parametrize(
    "name,axis",
    [
        ("model.layers.0.self_attn.q_proj.weight", "row"),
        ("language_model.model.layers.3.self_attn.qkv_proj.weight", "row"),
        ("model.layers.0.mlp.gate_up_proj.weight", "row"),
        ("model.layers.0.self_attn.o_proj.weight", "col"),
        ("model.layers.0.mlp.down_proj.weight", "col"),
        ("model.layers.0.mlp.down_proj.bias", "none"),
        ("model.embed_tokens.weight", "none"),
        ("lm_head.weight", "none"),
    ],
)
def test_default_rules(name, axis):
    assert default_axis(name, (4, 4)) == axis


def test_user_rules_come_first_and_the_first_match_wins():
    rules = NeuronRules(["embed_tokens=row", "proj=none", "q_proj=col"])
    assert rules.axis_for("model.embed_tokens.weight") == "row"
    assert rules.axis_for("model.layers.0.self_attn.q_proj.weight") == "none"
    assert NeuronRules(["x=row"], use_defaults=False).axis_for("mlp.up_proj.weight") == "none"


def test_the_last_equals_sign_splits_a_rule():
    assert parse_rule("a=b=col") == NeuronRule("a=b", "col")


@pytest.mark.parametrize(
    "text,message",
    [
        ("up_proj", "must look like REGEX=row|col|none"),
        ("=row", "must look like REGEX=row|col|none"),
        ("up_proj=diag", "axis must be row, col or none, not 'diag'"),
        ("(=row", "bad regular expression"),
    ],
)
def test_bad_rules_are_parameter_errors(text, message):
    with pytest.raises(ParameterError, match=message.replace("|", "\\|").replace("(", "\\(")):
        parse_rule(text)


def test_only_2d_weights_have_neurons():
    name = "model.layers.0.mlp.up_proj.weight"
    assert default_axis(name, (3, 4, 5)) == "none"  # a default rule: quietly none
    assert default_axis(name) == "row"  # the name alone
    with pytest.raises(PlanError, match="needs a 2-D weight; narrow the rule's regex"):
        NeuronRules(["up_proj=row"]).axis_for(name, (8,))
