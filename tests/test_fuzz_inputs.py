"""Property: whatever the index file, header or YAML config, the merge command exits 0 with a
valid output, or exits 2 with one line and nothing written; the inputs are byte-identical either
way. Examples are kept few (30 per property) so the suite stays quick; each runs the whole CLI
in-process."""

import itertools
import json
import shutil

import torch
from checkpoints import tree_digest, write_single
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_kernels.io.reader import SafetensorsCheckpoint as Checkpoint
from fusion_kernels.merge import main

FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_runs = itertools.count()

#: JSON values: scalars (incl. huge and negative numbers), lists and objects, a few levels deep.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def make_models(tmp_path):
    """A fresh base and two-shard tuned model (each example gets its own: examples share
    ``tmp_path``)."""
    root = tmp_path / f"in{next(_runs)}"
    base = write_single(root / "base", {"a": torch.zeros(4, 4), "b": torch.zeros(6)})
    tuned = root / "tuned"
    write_single(tuned, {"a": torch.ones(4, 4)})
    (tuned / "model.safetensors").rename(tuned / "part-1.safetensors")
    write_single(tuned, {"b": torch.ones(6)})
    (tuned / "model.safetensors").rename(tuned / "part-2.safetensors")
    return base, tuned


def check_run(args: list[str], inputs, capsys) -> int:
    """Run the merge CLI on the models (and config) under ``inputs``; assert the property;
    return the exit status."""
    before = tree_digest(inputs)
    out = inputs.parent / f"out-{inputs.name}"
    status = main([*args, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert status in (0, 2), err
    assert "Traceback" not in err
    if status == 0:
        written = Checkpoint(out)
        assert written.names() and (out / "fusion_report.json").is_file()
        for name in written.names():
            written.read(name)
        written.close()
        shutil.rmtree(out)
    else:
        lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING")]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert not out.exists()
    assert not [p.name for p in inputs.parent.iterdir() if ".partial-" in p.name]
    assert tree_digest(inputs) == before
    return status


@FUZZ
@given(
    weight_map=st.one_of(
        JSON_VALUES,
        st.dictionaries(
            st.sampled_from(["a", "b", "c", ""]),
            st.sampled_from(["part-1.safetensors", "part-2.safetensors", "config.json", "../x"]),
            max_size=3,
        ),
    ),
    extra=st.sampled_from(["", ', "metadata": ' + deep(10), ', "metadata": ' + deep(5000)]),
    raw=st.one_of(st.none(), st.binary(max_size=40)),
)
def test_any_index_file_is_a_merge_or_one_line(tmp_path, capsys, weight_map, extra, raw):
    base, tuned = make_models(tmp_path)
    index = tuned / "model.safetensors.index.json"
    if raw is not None:
        index.write_bytes(raw)
    else:
        index.write_text('{"weight_map": ' + json.dumps(weight_map) + extra + "}")
    check_run(["--base", str(base), "--tuned", str(tuned)], base.parent, capsys)


@FUZZ
@given(
    field=st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "new"]),
    value=st.one_of(
        JSON_VALUES,
        st.sampled_from(["U16", "U32", "F64", "BOOL", "F8_E5M2"]),
        st.lists(st.sampled_from([0, 1, 2, 4, 2**63, 2**64]), max_size=3),
        st.just("DEEP"),
    ),
)
def test_any_header_is_a_merge_or_one_line(tmp_path, capsys, field, value):
    base, tuned = make_models(tmp_path)
    (tuned / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}})
    )
    path = tuned / "part-1.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    if field in ("__metadata__", "new"):
        header[field] = value
    else:
        header["a"][field] = value
    text = json.dumps(header).replace('"DEEP"', deep(3000))
    new = text.encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + length :])
    check_run(["--base", str(base), "--tuned", str(tuned)], base.parent, capsys)


NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 0.5, 1, 1e300, -1e300, 3.5e38, "0.3", "x", True, None]),
)
CONDITIONS = st.lists(
    st.fixed_dictionaries(
        {"value": NUMBERS}, optional={"filter": st.sampled_from(["a", "b", "*"])}
    ),
    max_size=3,
)


@FUZZ
@given(
    method=st.sampled_from(
        ["ties", "task_arithmetic", "dare_linear", "della", "neuron_fusion", "x"]
    ),
    weight=NUMBERS | CONDITIONS,
    density=NUMBERS | CONDITIONS,
    extra=st.dictionaries(st.sampled_from(["lambda", "epsilon", "gamma", "bogus"]), NUMBERS),
    dtype=st.sampled_from([None, "float32", "bfloat16", "int8"]),
    mangle=st.sampled_from([None, "alias", "latin-1", "deep", "tab"]),
)
def test_any_yaml_config_is_a_merge_or_one_line(
    tmp_path, capsys, method, weight, density, extra, dtype, mangle
):
    import yaml

    base, tuned = make_models(tmp_path)
    (tuned / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}})
    )
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(tuned), "parameters": {"weight": weight, "density": density}}],
        "parameters": extra,
    }
    if dtype:
        config["dtype"] = dtype
    text = yaml.safe_dump(config).encode()
    if mangle == "alias":
        text += b"anchors: &x [1, 2]\nuses: [*x, *x]\n"
    elif mangle == "latin-1":
        text += b"# caf\xe9\n"
    elif mangle == "deep":
        text += b"deep: " + deep(2000).encode() + b"\n"
    elif mangle == "tab":
        text = text.replace(b"  ", b"\t", 1)
    path = base.parent / "config.yml"
    path.write_bytes(text)
    check_run(["--config", str(path)], base.parent, capsys)
