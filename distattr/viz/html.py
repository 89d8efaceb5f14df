"""A self-contained HTML page of heatmaps (no external resources, inline CSS, no script).

Same layout as the console view and Inseq's HTML: per example a source and a target table, rows =
attributed tokens, columns = generated tokens (headed by their target position), step scores as extra rows
(bold when ``|v| >= 0.5``). Cells show 3 decimals; hovering shows the exact float32 value. Colours follow
Inseq's red (positive) / transparent (0) / blue (negative) map on the symmetric range ``[-m, m]``,
``m = max(0, nanmax)`` over all examples. Headers and the token column stay in view while scrolling.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

from .common import Block, aggregated, blocks, color_limit, scaled, token_label

RED = (178, 24, 43)
BLUE = (33, 102, 172)
STEP_SCORE_BOLD = 0.5

CSS = """
:root { --fg: #1f2328; --muted: #6e7781; --line: #d0d7de; --head: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 28px; color: var(--fg); background: #fff;
       font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 6px; }
h3 { font-size: 13px; margin: 14px 0 6px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.meta { color: var(--muted); margin: 0 0 10px; }
.meta b { color: var(--fg); font-weight: 600; }
.texts { margin: 0 0 8px; display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; }
.texts dt { color: var(--muted); }
.texts dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px;
            white-space: pre-wrap; word-break: break-word; }
.legend { display: flex; align-items: center; gap: 8px; color: var(--muted); font-size: 12px; margin-bottom: 6px; }
.legend .bar { width: 220px; height: 12px; border: 1px solid var(--line); border-radius: 2px;
  background: linear-gradient(to right, rgb(33,102,172), rgba(33,102,172,0) 50%, rgba(178,24,43,0) 50%,
  rgb(178,24,43)); }
.scroll { overflow: auto; max-height: 80vh; max-width: 100%; border: 1px solid var(--line); border-radius: 6px;
          display: inline-block; }
table.heatmap { border-collapse: separate; border-spacing: 0; font-size: 12px; font-variant-numeric: tabular-nums; }
.heatmap th, .heatmap td { padding: 3px 6px; border-bottom: 1px solid #eef0f2; white-space: nowrap; }
.heatmap thead th { position: sticky; top: 0; z-index: 2; background: var(--head); vertical-align: bottom;
                    border-bottom: 1px solid var(--line); text-align: center; font-weight: 600; }
.heatmap th.row { position: sticky; left: 0; z-index: 1; background: #fff; text-align: right;
                  border-right: 1px solid var(--line); font-weight: 600; }
.heatmap thead th.corner { left: 0; z-index: 3; border-right: 1px solid var(--line); text-align: right;
                           color: var(--muted); font-weight: 400; font-size: 11px; }
.tok { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
thead .tok { display: block; max-width: 9em; white-space: normal; word-break: break-all; }
.pos { display: block; color: var(--muted); font-weight: 400; font-size: 10.5px; }
th.row .tok { display: inline-block; max-width: 16em; overflow: hidden; text-overflow: ellipsis;
              vertical-align: bottom; }
th.row .pos { display: inline-block; min-width: 2.2em; margin-right: 6px; text-align: right; }
.heatmap td { text-align: center; min-width: 4.2em; }
.heatmap td.dark { color: #fff; }
.heatmap td.nan { background: repeating-linear-gradient(135deg, #fafbfc 0 4px, #f3f4f6 4px 8px); }
.heatmap td:hover { outline: 2px solid #24292f; outline-offset: -2px; }
.heatmap tbody.steps tr:first-child > * { border-top: 2px solid var(--line); }
.heatmap tbody.steps th.row { font-style: italic; }
.heatmap tbody.steps td.strong { font-weight: 700; }
.caption { color: var(--muted); font-size: 12px; margin: 4px 0 0; }
"""


def cell_color(value: float, limit: float) -> tuple[str, bool]:
    """CSS background of ``value`` and whether its text should be light."""
    x = scaled(value, limit)
    rgb = RED if x >= 0 else BLUE
    alpha = abs(x)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.3f})", alpha > 0.55


def exact(value: float) -> str:
    """The shortest text that reads back as the same float32."""
    return str(np.float32(value))


def fmt(value: float) -> str:
    text = f"{value:.3f}"
    return "0.000" if text == "-0.000" else text


def render_html(out, normalize: bool = True, rescale: bool = False, step_scores: bool = True,
                title: str = "distattr attributions") -> str:
    """One self-contained HTML page with a heatmap per block of each example of ``out``."""
    sequences = aggregated(out, normalize, rescale)
    limit = color_limit(sequences)
    info = getattr(out, "info", {}) or {}
    parts = [f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
             f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
             f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
             f"<h1>{escape(title)}</h1>\n{_meta(info, normalize, rescale)}"
             f'<div class="legend"><span>{escape(fmt(-limit))}</span><span class="bar"></span>'
             f"<span>{escape(fmt(limit))}</span></div>\n"]
    inputs, generated = info.get("input_texts"), info.get("generated_texts")
    for index, seq in enumerate(sequences):
        parts.append(f'<section class="example" id="example-{index}">\n<h2>Example {index}</h2>\n')
        texts = []
        for name, values in (("input", inputs), ("output", generated)):
            if isinstance(values, list) and index < len(values) and isinstance(values[index], str):
                texts.append(f"<dt>{name}</dt><dd>{escape(values[index])}</dd>")
        if texts:
            parts.append(f'<dl class="texts">{"".join(texts)}</dl>\n')
        for block in blocks(seq, step_scores):
            parts.append(_block_html(block, limit))
        parts.append("</section>\n")
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def _meta(info: dict, normalize: bool, rescale: bool) -> str:
    items = []
    for label, key in (("model", "model_name"), ("method", "attribution_method"), ("attributed", "attributed_fn")):
        value = info.get(key)
        if isinstance(value, str) and value:
            items.append(f"{label} <b>{escape(value)}</b>")
    items.append("scores " + ("normalized per column" if normalize else "rescaled by the global max" if rescale
                              else "raw"))
    return f'<p class="meta">{" · ".join(items)}</p>\n'


def _token_html(position: int, token: str) -> str:
    return f'<span class="pos">{position}</span><span class="tok">{escape(token_label(token))}</span>'


def _block_html(block: Block, limit: float) -> str:
    head = ['<tr><th class="corner">' + ("attributed ↓ / generated →" if block.scores is not None else "") + "</th>"]
    for pos, tok in zip(block.positions, block.columns, strict=True):
        head.append(f'<th class="col" title="{escape(token_label(tok))}">{_token_html(pos, tok)}</th>')
    head.append("</tr>")
    rows = []
    if block.scores is not None:
        for r, tok in enumerate(block.rows):
            cells = [f'<tr><th class="row" title="{escape(token_label(tok))}">{_token_html(r, tok)}</th>']
            for c in range(len(block.columns)):
                value = float(block.scores[r, c])
                if math.isnan(value):
                    cells.append('<td class="c nan"></td>')
                    continue
                background, dark = cell_color(value, limit)
                where = f"{token_label(tok)} → {token_label(block.columns[c])}"
                cells.append(f'<td class="c{" dark" if dark else ""}" style="background:{background}" '
                             f'title="{exact(value)}&#10;{escape(where)}">{fmt(value)}</td>')
            cells.append("</tr>")
            rows.append("".join(cells))
    steps = []
    for name, values in block.step_scores.items():
        cells = [f'<tr><th class="row">{escape(name)}</th>']
        for c in range(len(block.columns)):
            value = float(values[c]) if c < len(values) else float("nan")
            if math.isnan(value):
                cells.append('<td class="s nan"></td>')
                continue
            strong = " strong" if abs(value) >= STEP_SCORE_BOLD else ""
            cells.append(f'<td class="s{strong}" title="{exact(value)}&#10;{escape(name)}">{fmt(value)}</td>')
        cells.append("</tr>")
        steps.append("".join(cells))
    body = f"<tbody>{''.join(rows)}</tbody>" if rows else ""
    step_body = f'<tbody class="steps">{"".join(steps)}</tbody>' if steps else ""
    return (f"<h3>{escape(block.label)}</h3>\n<div class=\"scroll\"><table class=\"heatmap\">"
            f"<thead>{''.join(head)}</thead>{body}{step_body}</table></div>\n")
