"""The paper's experiment in miniature (docs/paper_miniature.md).

A tiny character-level Llama learns English from the standard library's docstrings; a "visually
tuned" copy learns to name the class of an "image" made of new patch tokens and forgets much of its
English. Every merge method then fuses the two through the public API, and each merged model is
scored for language ability (LA), visual ability (VA) and their mean (OA), as in the paper's
Table 2; the density and neuron sweeps redo its Figures 6, 7 and 8.

Run: python examples/paper_miniature.py [WORKDIR] [--full] [--threads N]

Without ``--full`` (or with ``--quick``) it runs the reduced version the tests run: a smaller model,
shorter training and fewer sweep points, under a minute. ``--full`` is the documented run, about
10 minutes on one core. Training is seeded and uses one thread unless ``--threads`` says
otherwise, so a run is repeatable for a given torch version and machine.

WORKDIR (default ./paper_miniature) receives base/ and tuned/ (save_pretrained; a later run with
the same settings reuses them), merged/METHOD/ (the table's merges), results.csv (every merge
evaluated), table.md, and fig6_la_vs_density.png, fig7_va_vs_density.png,
fig8_neu_s_ties_vs_m.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers

import fusion_kernels as fk
from fusion_kernels.experiments import miniature

#: The paper's rows (Table 2), as (its name, our preset).
METHODS = [
    ("Task Ari", "task_arithmetic"),
    ("TIES", "ties"),
    ("Breadcrumbs", "breadcrumbs"),
    ("DARE", "dare"),
    ("DELLA", "della"),
    ("Neu-P-TaskA", "neu-p-taska"),
    ("Neu-P-TIES", "neu-p-ties"),
    ("Neu-S-TIES", "neu-s-ties"),
    ("Neu-P-Bread", "neu-p-bread"),
    ("Neu-S-Bread", "neu-s-bread"),
]
SWEEPS = {
    "full": {"K": (0.1, 0.2, 0.3, 0.5, 0.7, 0.9), "M": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)},
    "quick": {"K": (0.1, 0.2, 0.5), "M": (0.0, 0.3, 0.5)},
}
COLUMNS = ["label", "preset", "density", "weight", "epsilon", "top_neurons", "LA", "VA", "OA"]


def at_density(preset: str, k: float) -> fk.MergeParams:
    """The preset with density K. Task arithmetic suppresses nothing, so for the two taska presets
    K is the scale α of the delta; DELLA's ε = 0.15 shrinks where K ± ε would leave (0, 1)."""
    if fk.PRESETS[preset]["suppress"] == "none":
        return fk.params_for(preset, weight=k)
    if preset == "della":
        epsilon = 0.15 if 0.15 < k < 0.85 else min(k, 1 - k) / 2
        return fk.params_for(preset, density=k, epsilon=epsilon)
    return fk.params_for(preset, density=k)


class Runner:
    """Merges base and tuned with given parameters and evaluates the result, once per distinct
    parameter set (the sweeps revisit the table's points)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.rows: dict[str, dict] = {}

    def run(self, label: str, preset: str, params: fk.MergeParams, keep: bool = False) -> dict:
        key = json.dumps(params.as_dict(), sort_keys=True)
        if key not in self.rows:
            out = self.workdir / "merged" / (preset if keep else ".sweep")
            fk.merge_checkpoints(
                self.workdir / "base",
                self.workdir / "tuned",
                out,
                params,
                overwrite=True,
                progress=False,
            )
            metrics = miniature.evaluate(out)
            if not keep:
                shutil.rmtree(out)
            fields = {
                c: getattr(params, c) for c in ("density", "weight", "epsilon", "top_neurons")
            }
            self.rows[key] = {"label": label, "preset": preset, **fields, **metrics}
            print(f"  {label:28s} LA {metrics['LA']:6.2f}  VA {metrics['VA']:6.2f}", flush=True)
        return self.rows[key]


def prepare_models(workdir: Path, spec: miniature.MiniatureSpec) -> None:
    """Train base and tuned into WORKDIR, unless a run with the same settings left them there."""
    wanted = dataclasses.asdict(spec)
    marks = [workdir / name / miniature.SPEC_NAME for name in ("base", "tuned")]
    if all(m.is_file() and json.loads(m.read_text())["spec"] == wanted for m in marks):
        print(f"reusing base/ and tuned/ in {workdir}")
        return
    started = time.perf_counter()
    print(f"training the base model ({spec.base_steps} steps on docstrings)")
    base = miniature.train_base(spec)
    print(f"tuning on the visual task ({spec.align_steps} + {spec.tune_steps} steps, no text)")
    tuned = miniature.tune_visual(base, spec)
    for name, model in (("base", base), ("tuned", tuned)):
        shutil.rmtree(workdir / name, ignore_errors=True)
        miniature.save(model, workdir / name, spec)
    print(f"trained in {time.perf_counter() - started:.0f} s")


def write_table(path: Path, rows: list[tuple[str, dict]]) -> str:
    lines = ["| Method | LA (%) | VA (%) | OA (%) |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['LA']:.2f} | {r['VA']:.2f} | {r['OA']:.2f} |" for name, r in rows]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot_density(path: Path, metric: str, sweep: dict, llm: dict, mllm: dict) -> None:
    """LA or VA against K, one line per method, with the base (LLM) and tuned (MLLM) levels."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = "osD^v<>pXh"
    for (name, preset), marker in zip(METHODS, markers, strict=True):
        ks = sorted(sweep[preset])
        label = f"{name} (α = K)" if fk.PRESETS[preset]["suppress"] == "none" else name
        ax.plot(ks, [sweep[preset][k][metric] for k in ks], marker=marker, label=label, lw=1.2)
    ax.axhline(mllm[metric], color="black", ls="--", lw=1, label="MLLM (tuned)")
    ax.axhline(llm[metric], color="gray", ls=":", lw=1.2, label="LLM (base)")
    ax.set_xlabel("density K")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{'Language' if metric == 'LA' else 'Visual'} ability under different density K")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_neurons(path: Path, points: dict[float, dict], llm: dict, mllm: dict) -> None:
    """LA and VA of Neu-S-TIES (K = 0.2) against the fraction M of neurons restored, with the
    base's LA and the tuned model's VA (the levels a perfect merge would keep) dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ms = sorted(points)
    for metric, marker, color, level in (("LA", "o", "C0", llm), ("VA", "s", "C1", mllm)):
        ax.plot(ms, [points[m][metric] for m in ms], marker=marker, color=color, label=metric)
        ax.axhline(level[metric], color=color, ls="--", lw=0.8)
    ax.set_xlabel("top neurons M")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Neu-S-TIES, K = 0.2: restoring the top M neurons")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", type=Path, default=Path("paper_miniature"))
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the documented run (~10 min)")
    size.add_argument("--quick", action="store_true", help="the reduced run (default)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the documented numbers; more is faster, but sums may round "
        "differently and training then drifts)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    mode = "full" if args.full else "quick"
    spec = miniature.FULL if args.full else miniature.QUICK
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepare_models(workdir, spec)

    print("merging and evaluating (every merge through fusion_kernels.merge_checkpoints)")
    runner = Runner(workdir)
    mllm = {**miniature.evaluate(workdir / "tuned")}
    # The paper's LLM row is the base LLM inside the MLLM: base weights with tuned's "projector"
    # (here the patch-token rows), i.e. a merge that keeps none of the delta.
    llm = runner.run("LLM (base + tuned patch rows)", "base", fk.params_for(None, weight=0.0))
    table = [("MLLM (tuned)", mllm), ("LLM (base)", llm)]
    table += [
        (name, runner.run(name, preset, fk.params_for(preset), True)) for name, preset in METHODS
    ]
    sweep = {
        preset: {
            k: runner.run(f"{name} K={k}", preset, at_density(preset, k)) for k in SWEEPS[mode]["K"]
        }
        for name, preset in METHODS
    }
    neurons = {
        m: runner.run(f"Neu-S-TIES M={m}", "neu-s-ties", fk.params_for("neu-s-ties", top_neurons=m))
        for m in SWEEPS[mode]["M"]
    }

    with (workdir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerow({"label": "MLLM (tuned)", "preset": "tuned", **mllm})
        writer.writerows(runner.rows.values())
    text = write_table(workdir / "table.md", table)
    plot_density(workdir / "fig6_la_vs_density.png", "LA", sweep, llm, mllm)
    plot_density(workdir / "fig7_va_vs_density.png", "VA", sweep, llm, mllm)
    plot_neurons(workdir / "fig8_neu_s_ties_vs_m.png", neurons, llm, mllm)
    print(f"\n{text}")
    print(
        f"{mode} run done in {time.perf_counter() - started:.0f} s: {len(runner.rows)} merges "
        f"evaluated; results.csv, table.md and three figures in {workdir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
