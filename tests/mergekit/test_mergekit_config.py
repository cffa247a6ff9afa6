"""The mergekit YAML reader (``merge --config``): mergekit's defaults and filter semantics (with
mergekit as the oracle where installed), the mapping of its methods onto our parameters, per-tensor
resolution by name, and every unsupported input."""

from __future__ import annotations

import re

import pytest
import torch

from fusion_kernels import params_for
from fusion_kernels.errors import ParameterError
from fusion_kernels.mergekit.config import (
    TASK_ARITHMETIC_METHODS,
    load_merge_config,
    parse_merge_config,
)

# ---------------------------------------------------------------------------------------------
# Reading YAML: mergekit's defaults and filter semantics, and every unsupported input


def test_method_defaults_equal_mergekits_specs():
    pytest.importorskip("mergekit", reason="installed by the test extra")
    from mergekit.merge_methods import get
    from mergekit.merge_methods.base import ParameterScope

    for method, ours_spec in TASK_ARITHMETIC_METHODS.items():
        theirs = get(method)
        assert (theirs.consensus_method is not None) == ours_spec.consensus, method
        kind = theirs.sparsification_method
        suppress = {
            None: "none",
            "magnitude": "magnitude",
            "random": "random",
            "magnitude_outliers": "breadcrumbs",
            "della_magprune": "della",
        }
        assert suppress[kind.value if kind else None] == ours_spec.suppress, method
        expected = ours_spec.parameters()
        assert {p.name for p in theirs.spec.parameters} == set(expected), method
        for p in theirs.spec.parameters:
            mine = expected[p.name]
            assert (p.scope == ParameterScope.SHARED) == mine.shared, (method, p.name)
            assert p.required == mine.required, (method, p.name)
            assert p.required or p.default == mine.default, (method, p.name)


FILTER_CONFIG = {
    "merge_method": "breadcrumbs",
    "base_model": "base",
    "models": [
        {"model": "base"},
        {
            "model": "tuned",
            "parameters": {
                "weight": 0.5,
                "density": [
                    {"filter": "q_proj", "value": 0.7},
                    {"filter": "self_attn", "value": 0.3},
                ],
            },
        },
    ],
    "parameters": {
        "density": [{"filter": "mlp", "value": 0.4}, {"filter": "*", "value": 0.2}],
        "gamma": [{"filter": "layers.1.", "value": 0.05}, {"value": 0.02}],
        "lambda": [{"filter": "up_proj", "value": 2.0}, {"value": 1.0}],
    },
}


def test_filters_resolve_as_in_mergekit():
    pytest.importorskip("mergekit", reason="installed by the test extra")
    from mergekit.common import ModelReference
    from mergekit.config import (
        ConfigReader,
        InputSliceDefinition,
        MergeConfiguration,
        OutputSliceDefinition,
    )
    from mergekit.merge_methods import get
    from mergekit.parameter_resolver import resolve_parameters

    params = parse_merge_config(FILTER_CONFIG).params
    config = MergeConfiguration.model_validate(FILTER_CONFIG)
    sources = [
        InputSliceDefinition(model=m.model, layer_range=(0, 2), parameters=m.parameters)
        for m in config.models
    ]
    reader = ConfigReader(config=config, t=0, slice_out=OutputSliceDefinition(sources=sources))
    tuned = ModelReference.parse("tuned")
    for layer in (0, 1):
        for module in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
        ):
            name = f"model.layers.{layer}.{module}.weight"
            shared, per_input = resolve_parameters(
                get("breadcrumbs").spec,
                tensor_name=name,
                inputs={s.model: name for s in sources},
                sources=reader.parameter_sources,
                base_model=config.base_model,
            )
            mine = params.for_tensor(name)
            assert mine.density == per_input[tuned]["density"], name
            assert mine.gamma == per_input[tuned]["gamma"], name
            assert mine.weight == per_input[tuned]["weight"] * shared["lambda"], name


def test_method_mapping():
    def load(method, model, **top):
        data = {
            "merge_method": method,
            "base_model": "b",
            "models": [{"model": "t", "parameters": model}],
            **top,
        }
        return parse_merge_config(data).params.default

    assert load("ties", {"weight": 0.3, "density": 0.2}).weight == 1.0, "normalize cancels w"
    assert load("ties", {"weight": 0.3}, parameters={"normalize": False}).weight == 0.3
    assert load("ties", {"weight": 0.3}).suppress == "none", "density 1.0 keeps everything"
    assert load("task_arithmetic", {"weight": 0.5}, parameters={"lambda": 0.5}).weight == 0.25
    dare = load("dare_linear", {"weight": 1.0, "density": "3e-1"})
    assert (dare.suppress, dare.density, dare.rescale) == ("random", 0.3, "l1")
    assert (
        load("dare_linear", {"weight": 1, "density": 0.3}, parameters={"rescale": False}).rescale
        == "none"
    )
    della = load("della_linear", {"weight": 1.0, "density": 0.5})
    assert (della.suppress, della.epsilon, della.rescale) == ("della", 0.15, "l1")
    assert load("breadcrumbs", {"weight": 1.0, "density": 0.5}).gamma == 0.01
    nf = parse_merge_config(
        {
            "merge_method": "neuron_fusion",
            "base_model": "b",
            "models": [{"model": "t", "parameters": {"top_neurons": 0.1, "neuron_rules": "x=col"}}],
        }
    )
    assert nf.params.default == params_for("neuron_fusion", top_neurons=0.1)
    assert nf.rules.axis_for("a.x.b") == "col"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"merge_method": "slerp"}, "'slerp' is not supported"),
        ({"slices": []}, "'slices'"),
        ({"tokenizer_source": "base"}, "'tokenizer_source'"),
        ({"nonsense": 1}, "unknown key 'nonsense'"),
        ({"models": [{"model": "t", "parameters": {"weight": 1, "densty": 0.2}}]}, "'densty'"),
        ({"models": [{"model": "t", "parameters": {"density": 0.2}}]}, "'weight' is required"),
        ({"models": [{"model": "t", "parameters": {"weight": [0.1, 0.5]}}]}, "gradients"),
        ({"models": [{"model": "t", "parameters": {"weight": 1, "lambda": 2}}]}, "top-level"),
        ({"models": [{"model": "t"}, {"model": "u"}]}, "exactly one model"),
        ({"models": [{"model": "t", "parameters": {"weight": "heavy"}}]}, "must be a float"),
        ({"dtype": "float64"}, "dtype 'float64'"),
        ({"parameters": {"rescale": True}}, "rescale: true with ties"),
        (
            {
                "merge_method": "della_linear",
                "models": [{"model": "t", "parameters": {"weight": 1, "density": 0.1}}],
                "parameters": {"epsilon": 0.2},
            },
            "della needs",
        ),
    ],
)
def test_unsupported_or_bad_input_is_a_parameter_error(change, message):
    data = {
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "t", "parameters": {"weight": 1.0, "density": 0.2}}],
        **change,
    }
    with pytest.raises(ParameterError, match=message):
        parse_merge_config(data)


def test_load_merge_config_names_the_file(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: slerp\n")
    with pytest.raises(ParameterError, match=r"bad\.yml"):
        load_merge_config(bad)
    with pytest.raises(ParameterError, match="cannot read"):
        load_merge_config(tmp_path / "missing.yml")


def test_dtype_checks():
    data = {
        "merge_method": "task_arithmetic",
        "base_model": "b",
        "models": [{"model": "t", "parameters": {"weight": 1.0}}],
    }
    ok = parse_merge_config({**data, "dtype": "float32", "out_dtype": "bfloat16"})
    ok.check_dtypes([torch.bfloat16, torch.int64])
    with pytest.raises(ParameterError, match="written as float32"):
        parse_merge_config({**data, "dtype": "float32"}).check_dtypes([torch.bfloat16])
    with pytest.raises(ParameterError, match="round the float32"):
        parse_merge_config({**data, "dtype": "bfloat16"}).check_dtypes([torch.float32])


# ---------------------------------------------------------------------------------------------
# Per-tensor resolution: a function of the name, no enumeration of filter combinations


def ties(model: dict, **top) -> dict:
    return {"merge_method": "ties", "base_model": "b", "models": [{"model": "t", **model}], **top}


def test_parameters_resolve_per_name_first_filter_first_scope():
    params = parse_merge_config(
        ties(
            {
                "parameters": {
                    "weight": 1.0,
                    "density": [{"filter": "self_attn", "value": 0.3}],
                }
            },
            parameters={"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.1}]},
        )
    ).params
    assert params.default.density == 0.1
    assert params.for_tensor("model.layers.0.self_attn.q_proj.weight").density == 0.3
    assert params.for_tensor("model.layers.0.mlp.up_proj.weight").density == 0.5
    # Both filters match: the model's own scope comes first.
    assert params.for_tensor("x.self_attn.mlp.weight").density == 0.3
    assert params.changes_for("model.norm.weight") == {}
    assert params.describe() == [
        {"filter": "self_attn", "parameter": "density", "value": 0.3},
        {"filter": "mlp", "parameter": "density", "value": 0.5},
    ]


def test_many_filters_need_no_enumeration():
    # 2^40 combinations: the former reader enumerated them (and capped filters at 10).
    chain = [{"filter": f"layers.{i}.", "value": round(0.01 * (i + 1), 2)} for i in range(40)]
    params = parse_merge_config(
        ties({"parameters": {"weight": 1.0, "density": [*chain, {"value": 0.5}]}})
    ).params
    assert params.for_tensor("model.layers.7.mlp.up_proj.weight").density == 0.08
    assert params.for_tensor("model.layers.39.mlp.up_proj.weight").density == 0.4
    assert params.for_tensor("model.norm.weight").density == 0.5


def test_a_bad_filtered_value_fails_when_a_tensor_it_reaches_is_checked():
    params = parse_merge_config(
        ties(
            {"parameters": {"weight": 1.0, "density": 0.2}},
            parameters={"lambda": [{"filter": "mlp", "value": "x"}, {"value": 1.0}]},
        )
    ).params
    params.check(["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(ParameterError, match="lambda cannot be 'x'"):
        params.check(["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up.weight"])
    della = parse_merge_config(
        {
            "merge_method": "della_linear",
            "base_model": "b",
            "models": [{"model": "t", "parameters": {"weight": 1.0, "density": 0.5}}],
            "parameters": {"epsilon": [{"filter": "mlp", "value": 0.6}, {"value": 0.1}]},
        }
    ).params
    with pytest.raises(ParameterError, match=r"della needs.* for tensors matching \['mlp'\]"):
        della.for_tensor("layers.0.mlp.up_proj.weight")


def test_a_new_default_keeps_the_filtered_values():
    # merge --config --seed 7: the CLI sets the default's seed; a filtered seed stays.
    cfg = parse_merge_config(
        {
            "merge_method": "neuron_fusion",
            "base_model": "b",
            "models": [
                {
                    "model": "t",
                    "parameters": {"seed": [{"filter": "mlp", "value": 5}, {"value": 1}]},
                }
            ],
        }
    )
    params = cfg.params.with_default(cfg.params.default.replace(seed=7))
    assert params.for_tensor("layers.0.mlp.up_proj.weight").seed == 5
    assert params.for_tensor("layers.0.self_attn.q_proj.weight").seed == 7


def test_values_convert_like_mergekits_lax_types():
    params = parse_merge_config(
        ties(
            {"parameters": {"weight": "1", "density": "2e-1"}},
            parameters={"normalize": "false", "int8_mask": 0},
        )
    ).params.default
    assert (params.density, params.weight) == (0.2, 1.0)
    with pytest.raises(ParameterError, match="parameter normalize cannot be 'perhaps'"):
        parse_merge_config(ties({"parameters": {"weight": 1}}, parameters={"normalize": "perhaps"}))


def test_readme_names_every_method_config_takes_and_why_the_launcher_differs():
    from pathlib import Path

    from fusion_kernels.mergekit.config import SUPPORTED_METHODS

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = " ".join(readme.split("`--config` takes a one-model mergekit config", 1)[1].split())
    listed = section.split(", with mergekit's defaults", 1)[0]
    assert sorted(re.findall(r"`(\w+)`", listed.split(" lists) for ", 1)[1])) == sorted(
        SUPPORTED_METHODS
    )
    assert "task arithmetic in the model's dtype" in section and "in float32" in section
