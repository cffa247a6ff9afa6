"""The merged model's README.md: Hub front matter, what was done, the tuned card kept inside it,
a command that reproduces the merge, and --no-model-card."""

import html
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from checkpoints import tiny_pair
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_kernels.merge import main
from fusion_kernels.modelcard import (
    TUNED_CARD_HEADING,
    method_names,
    model_card,
    split_front_matter,
)
from fusion_kernels.params import params_for

TUNED_CARD = "---\nlicense: apache-2.0\ntags:\n- vision\n---\n# Tuned\n\nTrained on pictures.\n"


def merged(tmp_path, *extra, card=TUNED_CARD):
    base, tuned = tiny_pair(tmp_path / "pair")
    if card is not None:
        (tuned / "README.md").write_text(card)
    out = tmp_path / "out"
    args = ["--base", str(base), "--tuned", str(tuned), "--out", str(out), "--quiet", *extra]
    assert main(args) == 0
    return base, tuned, out


def test_card_front_matter_and_tables(tmp_path):
    base, tuned, out = merged(tmp_path, "--method", "neu-p-ties", "--set", "self_attn:density=0.5")
    meta, body = split_front_matter((out / "README.md").read_text())
    assert meta["base_model"] == [str(base), str(tuned)]
    assert {"merge", "neu-p-ties", "neuron_fusion"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    report = json.loads((out / "fusion_report.json").read_text())
    assert "| density | `0.2` |" in body and "| matching `self_attn` | density=0.5 |" in body
    rows = [line for line in body.splitlines() if line.startswith("| `self_attn.q_proj` |")]
    (row,) = rows
    q = [t for t in report["tensors"] if "q_proj" in t["name"]]
    kept = 100 * sum(t["kept"] for t in q) / sum(t["numel"] for t in q)
    restored = sum(t["restored"] for t in q)
    assert row == f"| `self_attn.q_proj` | {len(q)} | {kept:.2f} % | {restored} |"
    assert restored > 0
    assert TUNED_CARD_HEADING in body and body.rstrip().endswith("Trained on pictures.")
    assert "\n---\n" not in body and "license" not in body  # tuned front matter not repeated


def test_card_command_reproduces_the_merge(tmp_path):
    """The card's command, run as it is written, writes the same files: the preset by name,
    every parameter and the shard size (here not tuned's layout) included."""
    _, _, out = merged(
        tmp_path, "--method", "dare", "--density", "0.4", "--set", "mlp:seed=3",
        "--max-shard-size", "15KB",
    )  # fmt: skip
    body = (out / "README.md").read_text()
    command = body.split("```bash\n", 1)[1].split("\n```", 1)[0]
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "fusion_kernels.merge"]
    assert words[words.index("--method") + 1] == "dare"
    assert words[words.index("--max-shard-size") + 1] == "15000"
    again = tmp_path / "again"
    words[words.index("--out") + 1] = str(again)
    subprocess.run([sys.executable, *words[1:], "--quiet"], check=True, env=os.environ)
    weights = sorted(p.name for p in out.glob("model*.safetensors*"))
    assert len(weights) == 4, weights  # three 15 KB shards and their index
    assert weights == sorted(p.name for p in again.glob("model*.safetensors*"))
    for name in weights:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    _, _, out = merged(tmp_path_factory.mktemp("card"), "--set", "mlp:density=0.3")
    return json.loads((out / "fusion_report.json").read_text())


@settings(max_examples=150, deadline=None)
@given(license=st.text(min_size=1), base=st.text(), tuned=st.text())
def test_front_matter_parses_back_to_every_value(report, license, base, tuned):
    """Whatever the tuned card's license and the inputs' names (line breaks, ``---``, quotes,
    control characters), the front matter ends where it should and reads back as given."""
    tuned_card = "---\n" + yaml.safe_dump({"license": license}, default_style='"') + "---\n"
    assert split_front_matter(tuned_card)[0] == {"license": license}
    card = model_card({**report, "base_model": base, "tuned_model": tuned}, "out", tuned_card)
    card.encode("utf-8")
    meta, body = split_front_matter(card)
    assert meta["base_model"] == [base, tuned]
    assert meta["license"] == license
    assert body.lstrip("\n").startswith("# `out`\n")


@pytest.mark.parametrize(
    "value", ["true", "Yes", "on", "N", "null", "~", "1.0", "0x1F", "1e3", "12:30", "apache-2.0"]
)
def test_front_matter_keeps_words_yaml_would_read_as_other_types(report, value):
    card = model_card({**report, "base_model": value}, "out", f"---\nlicense: '{value}'\n---\n")
    meta, _ = split_front_matter(card)
    assert meta["base_model"][0] == value and meta["license"] == value


@pytest.mark.parametrize(
    "module",
    ["a|b", "back`tick", "two\nlines", "crlf\r\nend", "back\\|slash", "<b>&amp;", " pad "],
)
def test_module_table_keeps_awkward_names_in_their_cell(report, module):
    """Each module row is one line of four cells (GitHub's rule: a pipe not escaped by a
    backslash ends a cell), and the cell shows the name as it is."""
    tensors = [dict(t) for t in report["tensors"]]
    for entry in tensors:
        entry["name"] = entry["name"].replace("mlp.up_proj", module)
        entry.pop("base_name", None)
    card = model_card({**report, "tensors": tensors}, "out")
    section = card.split("## What was kept, per module type\n\n", 1)[1].split("\n\n", 1)[0]
    rows = section.splitlines()[2:]
    cells = [re.findall(r"(?:\\.|[^|\\])+", row) for row in rows]
    assert all(len(row) == 4 for row in cells), rows
    shown = {_inline_code(row[0].strip()) for row in cells}
    assert module in shown and "self_attn.q_proj" in shown


def _inline_code(cell: str) -> str:
    if cell.startswith("<code>"):
        return html.unescape(cell.removeprefix("<code>").removesuffix("</code>"))
    assert cell[0] == cell[-1] == "`" and "`" not in cell[1:-1]
    return cell[1:-1]


def test_no_model_card_keeps_the_tuned_readme_as_it_is(tmp_path):
    _, tuned, out = merged(tmp_path, "--no-model-card")
    assert (out / "README.md").read_text() == (tuned / "README.md").read_text()
    _, _, out2 = merged(tmp_path / "two", "--no-model-card", card=None)
    assert not (out2 / "README.md").exists()


def test_card_without_a_tuned_card_or_license(tmp_path):
    _, _, out = merged(tmp_path, card=None)
    text = (out / "README.md").read_text()
    meta, body = split_front_matter(text)
    assert "license" not in meta and TUNED_CARD_HEADING not in body
    assert yaml.safe_load(text.split("---")[1])["tags"][:2] == ["merge", "fusion_kernels"]


def test_method_names_and_front_matter_parsing():
    assert method_names(params_for("neu-p-ties").as_dict()) == ["neuron_fusion", "neu-p-ties"]
    assert method_names(params_for("ties", density=0.37).as_dict()) == []
    assert split_front_matter("no front matter") == ({}, "no front matter")
    assert split_front_matter("---\n: [bad\n---\ntext")[1] == "text"
