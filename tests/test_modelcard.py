"""The merged model's README.md: Hub front matter, what was done, the tuned card kept inside it,
a command that reproduces the merge, and --no-model-card."""

import json
import shlex

import yaml
from checkpoints import tiny_pair

from fusion_kernels.merge import main
from fusion_kernels.modelcard import TUNED_CARD_HEADING, method_names, split_front_matter
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
    _, _, out = merged(tmp_path, "--method", "dare", "--density", "0.4", "--set", "mlp:seed=3")
    body = (out / "README.md").read_text()
    command = body.split("```bash\n", 1)[1].split("\n```", 1)[0]
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "fusion_kernels.merge"]
    again = tmp_path / "again"
    args = words[3:]
    args[args.index("--out") + 1] = str(again)
    assert main([*args, "--quiet"]) == 0
    assert (again / "model-00001-of-00002.safetensors").read_bytes() == (
        out / "model-00001-of-00002.safetensors"
    ).read_bytes()
    assert (again / "model-00002-of-00002.safetensors").read_bytes() == (
        out / "model-00002-of-00002.safetensors"
    ).read_bytes()


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
