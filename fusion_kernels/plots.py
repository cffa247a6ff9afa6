"""Pictures of where fine-tuning changed the model, and an offline index.html that ties them to
the table: C(j) against neuron index (the paper's Figures 3 and 4), a layer × module heatmap of
concentration, the share of change restored against M per module type, and, after a merge, the
kept fraction and restored neurons per layer."""

from __future__ import annotations

import html
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import FusionError

MAX_SCORE_PLOTS = 12
DEFAULT_MODULES = ("self_attn.q_proj", "mlp.up_proj")


def pyplot():
    """matplotlib.pyplot on the Agg backend; a :class:`FusionError` saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FusionError("plots need matplotlib: pip install 'fusion_kernels[plots]'") from None
    return plt


def chosen_tensors(entries: list[dict], pattern: str | None) -> list[dict]:
    """Tensors whose C(j) is drawn: matching ``pattern``, or first/last layer q_proj and up_proj."""
    with_scores = [e for e in entries if "scores" in e]
    if pattern:
        return [e for e in with_scores if re.search(pattern, e["name"])][:MAX_SCORE_PLOTS]
    layers = [e["layer"] for e in with_scores if e["layer"] is not None]
    if not layers:
        return with_scores[:2]
    ends = {min(layers), max(layers)}
    return [e for e in with_scores if e["layer"] in ends and e["module"] in DEFAULT_MODULES]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def plot_scores(plt, entry: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(range(len(entry["scores"])), entry["scores"], linewidth=0.6)
    ax.set_xlabel(f"neuron index ({entry['axis']}s)")
    ax.set_ylabel("change score C(j) = Σ|Δ|")
    ax.set_title(entry["name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_concentration(plt, entries: list[dict], path: Path) -> None:
    layers = sorted({e["layer"] for e in entries})
    modules = sorted({e["module"] for e in entries})
    grid = [[float("nan")] * len(modules) for _ in layers]
    for e in entries:
        grid[layers.index(e["layer"])][modules.index(e["module"])] = e["gini"]
    fig, ax = plt.subplots(figsize=(1.2 * len(modules) + 2, 0.3 * len(layers) + 2))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    # Numbers in the cells while they fit; colour alone hides small differences.
    if len(layers) * len(modules) <= 400:
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value == value:
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w")
    ax.set_xticks(range(len(modules)), modules, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("concentration of change (Gini of C(j))")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_restored_share(plt, module: str, entries: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    curves = [e["restored_share"] for e in entries]
    xs = [i / (len(curves[0]) - 1) for i in range(len(curves[0]))]
    for curve in curves:
        ax.plot(xs, curve, color="tab:blue", alpha=0.25, linewidth=0.8)
    mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(xs))]
    ax.plot(xs, mean, color="tab:red", linewidth=2, label="mean over layers")
    ax.plot(xs, xs, color="gray", linestyle=":", label="uniform change")
    ax.set_xlabel("M (fraction of neurons restored)")
    ax.set_ylabel("share of Σ|Δ| restored")
    ax.set_title(module)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_merge_layers(plt, report: dict, path: Path) -> None:
    kept, numel, restored = defaultdict(int), defaultdict(int), defaultdict(int)
    for t in report["tensors"]:
        match = re.search(r"layers\.(\d+)\.", t["name"])
        if t["action"] != "merge" or not match:
            continue
        layer = int(match.group(1))
        kept[layer] += t["kept"]
        numel[layer] += t["numel"]
        restored[layer] += t["restored"]
    layers = sorted(numel)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.bar(layers, [kept[x] / numel[x] for x in layers])
    top.set_ylabel("kept fraction")
    bottom.bar(layers, [restored[x] for x in layers], color="tab:orange")
    bottom.set_ylabel("restored neurons")
    bottom.set_xlabel("layer")
    top.set_title("merge: kept fraction and restored neurons per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_page(
    result: dict[str, Any], out: Path, pattern: str | None = None, merge_report: dict | None = None
) -> list[Path]:
    """Draw every plot into ``out`` and write ``out/index.html``; returns the PNG paths."""
    plt = pyplot()
    entries = [e for e in result["tensors"] if not e.get("nonfinite")]
    figures: list[tuple[Path, str]] = []
    for entry in chosen_tensors(entries, pattern):
        path = out / f"scores_{_safe(entry['name'])}.png"
        plot_scores(plt, entry, path)
        figures.append((path, f"C(j) of {entry['name']}"))
    layered = [e for e in entries if "scores" in e and e["layer"] is not None]
    if layered:
        plot_concentration(plt, layered, out / "concentration.png")
        figures.append((out / "concentration.png", "concentration of change per layer and module"))
    by_module = defaultdict(list)
    for e in entries:
        if "scores" in e:
            by_module[e["module"]].append(e)
    for module, group in sorted(by_module.items()):
        path = out / f"restored_{_safe(module)}.png"
        plot_restored_share(plt, module, group, path)
        figures.append((path, f"share of change restored against M: {module}"))
    if merge_report is not None:
        plot_merge_layers(plt, merge_report, out / "merge_layers.png")
        figures.append((out / "merge_layers.png", "kept fraction and restored neurons per layer"))
    (out / "index.html").write_text(_html(result, entries, figures, merge_report))
    return [path for path, _ in figures]


def _html(result, entries, figures, merge_report) -> str:
    rows = []
    for e in entries:
        shares = e.get("top_share", {})
        cells = [
            e["name"],
            e["layer"] if e["layer"] is not None else "",
            e["module"],
            e["axis"],
            "×".join(map(str, e["shape"])),
            f"{e['total_abs']:.4g}",
            *[f"{shares[k]:.3f}" if k in shares else "" for k in ("1", "5", "10", "30")],
            f"{e['gini']:.3f}" if "gini" in e else "",
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    images = "\n".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for p, caption in figures
    )
    title = "fusion_kernels: merge report" if merge_report else "fusion_kernels: locate"
    head = [
        "tensor",
        "layer",
        "module",
        "axis",
        "shape",
        "Σ|Δ|",
        "top 1 %",
        "top 5 %",
        "top 10 %",
        "top 30 %",
        "Gini",
    ]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}}figure{{display:inline-block;margin:8px}}
img{{max-width:720px}}</style></head><body>
<h1>{title}</h1>
<p>base: {html.escape(result["base"])}<br>tuned: {html.escape(result["tuned"])}</p>
<h2>Plots</h2>
{images}
<h2>Tensors</h2>
<p>Share of Σ|Δ| held by the top p % of neurons, and the Gini coefficient of C(j).</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>
{chr(10).join(rows)}
</table></body></html>
"""
