"""The sweep's offline page, ``OUT/index.html``: the trade-off scatter, the per-parameter curves,
and the results table with the reference points and the best point marked."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

PAGE_NAME = "index.html"


def write_sweep_page(
    out_dir: Path,
    identity: dict[str, str],
    columns: list[str],
    rows: list[dict[str, Any]],
    figures: list[tuple[Path, str]],
    *,
    references: list[dict[str, Any]] = (),
    best: str | None = None,
    best_metric: str | None = None,
) -> Path:
    """Write the page; figure paths are made relative to ``out_dir`` so the folder can move."""
    images = "\n".join(
        f'<figure><img src="{html.escape(_relative(path, out_dir))}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for path, caption in figures
    )
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = [_row(r, columns, "ref") for r in references]
    body += [_row(r, columns, "best" if r["point"] == best else "") for r in rows]
    inputs = "<br>".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in identity.items())
    chosen = (
        f"<p>best by {html.escape(best_metric or '?')}: <b>{html.escape(best)}</b></p>"
        if best
        else ""
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fusion_kernels: sweep</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}}figure{{display:inline-block;margin:8px}}
img{{max-width:720px}}tr.best{{background:#fde0dc}}tr.ref{{background:#eee;font-style:italic}}
</style></head><body>
<h1>fusion_kernels: sweep</h1>
<p>{inputs}</p>
{chosen}
<h2>Plots</h2>
{images}
<h2>Results</h2>
<p>One row per grid point (the best highlighted); scored inputs in grey.</p>
<table><tr>{head}</tr>
{chr(10).join(body)}
</table></body></html>
"""
    path = out_dir / PAGE_NAME
    path.write_text(page)
    return path


def _row(row: dict[str, Any], columns: list[str], css: str) -> str:
    cells = "".join(f"<td>{html.escape(_text(row.get(c, '')))}</td>" for c in columns)
    return f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>"


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()
