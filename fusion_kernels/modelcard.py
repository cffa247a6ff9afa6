"""The merged model's card (``README.md``), written from the merge report.

YAML front matter as the Hub reads it (``base_model`` listing both inputs, ``tags`` with
``merge`` and the method, ``library_name``, and the tuned card's ``license`` when it has one),
then what was done in words and tables: the method and its parameters, the ``--set`` rules, the
name map, per module type the kept share and restored neurons, and the command that reproduces the
merge. A tuned model's own card is not dropped: its text follows under a heading.
"""

from __future__ import annotations

import html
import re
import shlex
from collections import defaultdict
from typing import Any

from .errors import FusionError
from .io.safeload import parse_yaml
from .neurons import DEFAULT_RULES
from .params import PRESETS, params_for

CARD_NAME = "README.md"
TUNED_CARD_HEADING = "## The tuned model's card"
_FLAGS = ("suppress", "density", "gamma", "epsilon", "rescale", "weight", "restore")
_FLAGS += ("top_neurons", "seed", "select")
_LAYER_MODULE = re.compile(r"layers\.\d+\.(.+?)(?:\.weight)?$", re.DOTALL)


def method_names(params: dict[str, Any]) -> list[str]:
    """The presets whose parameters these are (seed and selection aside; two presets may be
    one method, e.g. ``neuron_fusion`` and ``neu-p-ties``)."""
    keys = ("suppress", "density", "gamma", "epsilon", "rescale", "weight", "restore")
    keys += ("top_neurons",)
    return [
        name
        for name in PRESETS
        if all(params_for(name).as_dict()[k] == params.get(k) for k in keys)
    ]


def _closest_preset(params: dict[str, Any]) -> str | None:
    """The preset these parameters are, else the first with their suppress and restore (the
    command's explicit flags say the rest), else None."""
    exact = method_names(params)
    if exact:
        return exact[0]
    for name in PRESETS:
        preset = params_for(name)
        if (preset.suppress, preset.restore) == (params["suppress"], params["restore"]):
            return name
    return None


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """A card's YAML front matter (``{}`` when absent or unreadable) and the text after it."""
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", text, re.DOTALL)
    if match is None:
        return {}, text
    try:
        # Bounded and alias-free: the card is an input (an alias bomb would exhaust memory).
        data = parse_yaml(match.group(1), CARD_NAME)
    except FusionError:
        data = None
    return (data if isinstance(data, dict) else {}), text[match.end() :]


def reproduce_command(report: dict[str, Any], out: str) -> str:
    """The merge command line that recomputes this output: the preset by name (when the
    parameters are one), every parameter explicit, and the output's shard size."""
    params = report["params"]
    words = ["python", "-m", "fusion_kernels.merge"]
    words += ["--base", report.get("base_model", report["base"])]
    words += ["--tuned", report.get("tuned_model", report["tuned"]), "--out", out]
    if report.get("max_shard_size") is not None:
        words += ["--max-shard-size", str(report["max_shard_size"])]
    method = _closest_preset(params)
    if method is not None:
        words += ["--method", method]
    for key in _FLAGS:
        words += [f"--{key.replace('_', '-')}", str(params[key])]
    if params.get("allow_nonfinite"):
        words.append("--allow-nonfinite")
    for override in report.get("param_overrides", []):
        if "pattern" in override:
            changes = ",".join(f"{k}={v}" for k, v in override.items() if k != "pattern")
            words += ["--set", f"{override['pattern']}:{changes}"]
    layer_map = report.get("layer_map") or {}
    if layer_map.get("source") == "--layer-map":
        words += ["--layer-map", layer_map["spec"]]
    if (report.get("pairing") or {}).get("strict") is False:
        words.append("--allow-unpaired")
    defaults = {(rule.pattern, rule.axis) for rule in DEFAULT_RULES}
    for rule in report.get("neuron_rules", []):
        if (rule["pattern"], rule["axis"]) not in defaults:
            words += ["--neuron-rule", f"{rule['pattern']}={rule['axis']}"]
    if not report["name_map"]["detected"]:
        for rule in report["name_map"]["rules"]:
            words += ["--map", f"{rule['tuned']}={rule['base']}"]
    return shlex.join(words)


def module_table(tensors: list[dict[str, Any]]) -> list[tuple[str, int, float, int]]:
    """Per module type of the merged tensors: (module, tensors, kept share, restored neurons)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in tensors:
        if entry["action"] == "merge":
            name = entry.get("base_name", entry["name"])
            match = _LAYER_MODULE.search(name)
            groups[match.group(1) if match else name.removesuffix(".weight")].append(entry)
    rows = []
    for module, entries in sorted(groups.items()):
        numel = sum(e["numel"] for e in entries)
        kept = sum(e["kept"] for e in entries) / numel if numel else 0.0
        rows.append((module, len(entries), kept, sum(e["restored"] for e in entries)))
    return rows


def model_card(report: dict[str, Any], out: str, tuned_card: str | None = None) -> str:
    """The card's full text."""
    tuned_meta, tuned_text = split_front_matter(tuned_card or "")
    base = report.get("base_model", report["base"])
    tuned = report.get("tuned_model", report["tuned"])
    methods = method_names(report["params"])
    tags = ["merge", "fusion_kernels", *(methods or [report["params"]["suppress"]])]
    if report["params"]["restore"] != "none":
        tags.append("neuron-restore")
    lines = ["---", "base_model:", f"- {_yaml(base)}", f"- {_yaml(tuned)}", "tags:"]
    lines += [f"- {_yaml(tag)}" for tag in dict.fromkeys(tags)]
    lines.append("library_name: transformers")
    for key in ("license", "license_name", "license_link"):
        if tuned_meta.get(key):
            lines.append(f"{key}: {_yaml(str(tuned_meta[key]))}")
    lines += ["---", ""]
    lines += _body(report, out, base, tuned, methods)
    if tuned_text.strip():
        lines += ["", TUNED_CARD_HEADING, "", tuned_text.strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def _body(report, out, base, tuned, methods) -> list[str]:
    totals = report["totals"]
    preset = " = ".join(f"`{m}`" for m in methods)
    lines = [
        f"# {_code(out.rstrip('/').rsplit('/', 1)[-1])}",
        "",
        f"This model is {_code(tuned)} merged back with its base {_code(base)} by "
        "fusion_kernels "
        f"using {f'the preset {preset}' if methods else 'custom parameters'}: "
        f"{totals['merged']} tensors merged, {totals['copied']} copied unchanged from the tuned "
        f"model, {len(totals['skipped_base_only'])} base-only tensors left out.",
        "",
        "## Method and parameters",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {_code(str(value))} |" for key, value in report["params"].items()]
    lines += ["", "## Per-tensor rules (`--set`)", ""]
    overrides = report.get("param_overrides", [])
    if overrides:
        lines += ["| tensors | changes |", "|---|---|"]
        lines += [_override_row(item) for item in overrides]
        if any("pattern" not in item for item in overrides):
            lines += ["", "The filters come from a mergekit config: pass it again with `--config`."]
    else:
        lines.append("None: every tensor used the parameters above.")
    lines += ["", "## Name and layer map (tuned → base)", ""]
    rules = report["name_map"]["rules"]
    how = "detected from names and shapes" if report["name_map"]["detected"] else "given"
    if rules:
        lines += [f"Prefix rewrites ({how}):", "", "| tuned prefix | base prefix |", "|---|---|"]
        top = "(top level)"
        lines += [f"| {_code(r['tuned'] or top)} | {_code(r['base'] or top)} |" for r in rules]
    else:
        lines.append("Identity: tuned and base tensors share names.")
    layer_map = report.get("layer_map") or {}
    if layer_map.get("spec"):
        lines += [
            "",
            f"Layer map ({layer_map['source']}): base layer of each tuned layer, in "
            f"order (`new`: no base counterpart, copied): {_code(layer_map['spec'])}.",
        ]
    else:
        lines += ["", "Layers pair one to one: tuned layer i with base layer i."]
    lines += ["", "## What was kept, per module type", ""]
    lines += ["| module | tensors | kept share | restored neurons |", "|---|---|---|---|"]
    for module, count, kept, restored in module_table(report["tensors"]):
        lines.append(f"| {_code(module)} | {count} | {100 * kept:.2f} % | {restored} |")
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        reproduce_command(report, out),
        "```",
        "",
        "`fusion_report.json` beside this card lists every tensor's action, kept count and "
        "restored neurons.",
    ]
    return lines


def _override_row(item: dict[str, Any]) -> str:
    """One ``--set`` rule (a regex) or one mergekit filter (a substring) as a table row."""
    if "pattern" in item:
        changes = ", ".join(f"{k}={v}" for k, v in item.items() if k != "pattern")
        return f"| matching {_code(item['pattern'])} | {_cell(changes)} |"
    change = f"{item['parameter']}={item['value']}"
    return f"| containing {_code(str(item['filter']))} | {_cell(change)} |"


def _yaml(text: str) -> str:
    """A YAML scalar that parses back to ``text``, on one line: plain when that is safe (no
    word YAML reads as a number, boolean or null), else double-quoted with every line break,
    control and non-printable character escaped, so no value can end the front matter."""
    if re.fullmatch(r"[A-Za-z_][\w./@+-]*", text, re.ASCII) and text.lower() not in _YAML_WORDS:
        return text
    return '"' + "".join(_yaml_char(char) for char in text) + '"'


#: Plain words that YAML 1.1 readers (PyYAML among them) resolve to booleans or null.
_YAML_WORDS = ("y", "n", "yes", "no", "on", "off", "true", "false", "null")
_YAML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _yaml_char(char: str) -> str:
    if char in _YAML_ESCAPES:
        return _YAML_ESCAPES[char]
    return f"\\u{ord(char):04x}" if _unprintable(char) else char


def _unprintable(char: str) -> bool:
    """Characters a YAML stream may not hold raw (or that YAML reads as a line break), and
    lone surrogates (which UTF-8 cannot encode)."""
    code = ord(char)
    return (
        code < 0x20
        or 0x7F <= code <= 0x9F
        or 0xD800 <= code <= 0xDFFF
        or code in (0x2028, 0x2029, 0xFEFF, 0xFFFE, 0xFFFF)
    )


#: What cannot appear as it is in a Markdown table cell's inline code: a pipe ends the cell, a
#: backtick the code span, a backslash escapes what follows (a line break, not printable, ends
#: the row); ``<``, ``>`` and ``&`` would be read as HTML in the ``<code>`` form.
_CELL_BREAKERS = re.compile(r"[|`\\<>&]")


def _code(text: str) -> str:
    """``text`` as inline code that stays inside one table cell (or one line of prose): in
    backticks when it can be, else as ``<code>`` with the troublesome characters as entities."""
    if text and text.isprintable() and text.strip() == text and not _CELL_BREAKERS.search(text):
        return f"`{text}`"
    return f"<code>{_entities(text)}</code>"


def _cell(text: str) -> str:
    """Plain text that stays inside one table cell."""
    return _entities(text) if _CELL_BREAKERS.search(text) or not text.isprintable() else text


def _entities(text: str) -> str:
    return "".join(
        html.escape(c) if c.isprintable() and c not in "|`\\" else f"&#{ord(c)};" for c in text
    )
