"""Merge parameters (params.py): validation, presets, the one text → field converter, ``--set``
overrides and parameters per tensor."""

from __future__ import annotations

import pytest

from fusion_kernels.errors import ParameterError
from fusion_kernels.params import (
    FIELD_TYPES,
    PRESETS,
    MergeParams,
    TensorParams,
    convert_field,
    params_for,
    parse_override,
)


def test_rescale_default_follows_the_method():
    assert MergeParams(suppress="random").rescale_mode == "l1"
    assert MergeParams(suppress="della").rescale_mode == "l1"
    assert MergeParams(suppress="magnitude").rescale_mode == "none"
    assert MergeParams(suppress="random", rescale="inverse").as_dict()["rescale"] == "inverse"


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"suppress": "topk"}, "suppress must be one of"),
        ({"density": 1.5}, r"density must be in \[0, 1\]"),
        ({"top_neurons": -0.1}, "top_neurons must be in"),
        ({"gamma": 1.0}, "gamma must be in"),
        ({"weight": float("nan")}, "weight must be a finite number"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"suppress": "magnitude", "rescale": "l1"}, "applies only to the random and della"),
        ({"suppress": "della", "density": 0.1, "epsilon": 0.2}, "della needs"),
    ],
)
def test_validation_names_the_field(fields, message):
    with pytest.raises(ParameterError, match=message):
        MergeParams(**fields).validated()


def test_presets_and_overrides():
    assert set(PRESETS) >= {"ties", "neuron_fusion", "neu-s-ties"}
    ties = params_for("ties", density=0.3, seed=None)
    assert (ties.suppress, ties.density, ties.seed) == ("magnitude", 0.3, 0)
    assert params_for(None) == MergeParams()
    with pytest.raises(ParameterError, match="unknown method 'tie'"):
        params_for("tie")
    with pytest.raises(ParameterError, match="densty"):
        params_for("ties", densty=0.3)


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("density", "0.3", 0.3),
        ("density", "3e-1", 0.3),
        ("density", 1, 1.0),
        ("seed", "7", 7),
        ("seed", "1e3", 1000),
        ("seed", 4.0, 4),
        ("seed", "123456789012345678901", 123456789012345678901),
        ("allow_nonfinite", "yes", True),
        ("allow_nonfinite", "False", False),
        ("allow_nonfinite", "0", False),
        ("allow_nonfinite", 1, True),
        ("rescale", "l1", "l1"),
        ("suppress", "della", "della"),
    ],
)
def test_convert_field(name, value, expected):
    converted = convert_field(name, value)
    assert converted == expected and type(converted) is type(expected)


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("density", "abc", "density cannot be 'abc': it must be a float"),
        ("density", True, "a float"),
        ("seed", "1.5", "seed cannot be '1.5': it must be an integer"),
        ("seed", "nan", "an integer"),
        ("allow_nonfinite", "maybe", "a boolean"),
        ("allow_nonfinite", 2, "a boolean"),
        ("suppress", 3, "a string"),
        ("rescale", None, "rescale cannot be None"),
    ],
)
def test_convert_field_rejects(name, value, message):
    with pytest.raises(ParameterError, match=message):
        convert_field(name, value)


def test_convert_field_takes_a_kind_for_parameters_that_are_not_fields():
    assert convert_field("lambda", "0.5", float) == 0.5
    assert convert_field("normalize", "true", bool) is True
    with pytest.raises(ParameterError, match="normalize cannot be 'sure'"):
        convert_field("normalize", "sure", bool)


def test_rescale_converts_to_text_although_its_default_is_none():
    assert MergeParams().rescale is None and FIELD_TYPES["rescale"] is str
    assert set(FIELD_TYPES) == set(MergeParams.__dataclass_fields__)


def test_parse_override():
    override = parse_override("self_attn|mlp:density=0.3,top-neurons=0.1,restore=rescale")
    assert override.pattern == "self_attn|mlp"
    assert override.changes == {"density": 0.3, "top_neurons": 0.1, "restore": "rescale"}
    assert parse_override("a:b:seed=3").pattern == "a:b", "the last colon splits"
    for text, message in [
        ("density=0.3", "must look like"),
        ("x:densty=0.3", "unknown parameter 'densty'; valid: suppress, density, gamma, "),
        ("x:density=abc", "--set 'x:density=abc': density cannot be 'abc'"),
    ]:
        with pytest.raises(ParameterError, match=message):
            parse_override(text)


def test_tensor_params_first_matching_override_wins_and_is_validated_up_front():
    params = TensorParams(
        params_for("ties"),
        [parse_override("layers.0.:density=0.5"), parse_override("mlp:density=0.1")],
    )
    assert params.for_tensor("model.layers.0.mlp.up_proj.weight").density == 0.5
    assert params.for_tensor("model.layers.1.mlp.up_proj.weight").density == 0.1
    assert params.for_tensor("model.norm.weight") is params.default
    assert params.changes_for("model.norm.weight") == {}
    assert params.describe() == [
        {"pattern": "layers.0.", "density": 0.5},
        {"pattern": "mlp", "density": 0.1},
    ]
    with pytest.raises(ParameterError, match="density must be in"):
        TensorParams(params_for("ties"), [parse_override("mlp:density=2")])


def test_tensor_params_from_a_function_of_the_name():
    def changes(name: str) -> dict:
        return {"density": 0.9} if "mlp" in name else {"density": 3.0} if "bad" in name else {}

    changes.description = [{"filter": "mlp", "parameter": "density", "value": 0.9}]
    params = TensorParams(params_for("ties"), changes=changes)
    assert params.for_tensor("x.mlp.y").density == 0.9
    assert params.for_tensor("x.mlp.y") is params.for_tensor("z.mlp.w"), "resolved once"
    assert params.describe() == changes.description
    params.check(["a.mlp", "b"])
    with pytest.raises(ParameterError, match="density must be in"):
        params.check(["a.mlp", "a.bad"])
    reseeded = params.with_default(params.default.replace(seed=9))
    assert (
        reseeded.for_tensor("x.mlp.y").seed == 9 and reseeded.for_tensor("x.mlp.y").density == 0.9
    )


def test_an_override_matching_no_merged_tensor_is_refused():
    params = TensorParams(params_for("ties"), [parse_override("selfattn:density=0.3")])
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(
        ParameterError, match=r"^--set selfattn:density=0\.3: the pattern matches no"
    ):
        params.check(names)
    TensorParams(params_for("ties"), [parse_override("self_attn:density=0.3")]).check(names)


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_the_cli_refuses_a_set_rule_matching_nothing_in_one_line(tmp_path, capsys, dry_run):
    from checkpoints import tiny_pair

    from fusion_kernels.merge import main

    base, tuned = tiny_pair(tmp_path)
    out = tmp_path / "out"
    args = ["--base", str(base), "--tuned", str(tuned), "--out", str(out), "--quiet", *dry_run]
    capsys.readouterr()
    assert main([*args, "--set", "selfattn:density=0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "selfattn" in err[0] and not out.exists()
