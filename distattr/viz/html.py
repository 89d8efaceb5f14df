"""Self-contained HTML heatmaps: one page (:func:`render_html`) or a notebook fragment (:func:`render_fragment`).

Same layout as the console view and Inseq's HTML: per example a source and a target table, rows =
attributed tokens, columns = generated tokens (headed by their target position), step scores as extra rows
(bold when ``|v| >= 0.5``, shaded by their value within the row). Colours follow Inseq's red (positive) /
transparent (0) / blue (negative) map on the symmetric range ``[-m, m]``, ``m = max(0, nanmax)`` over all
examples. NaN cells (future tokens) are hatched and empty.

The cells are static HTML, so the page reads without JavaScript (and in notebook viewers that strip scripts):
cells show 3 decimals and their ``title`` (hover) holds the exact float32 value shown, the pair of tokens,
and the exact raw score. Every cell also carries its raw (``data-r``) and normalised (``data-n``) score; a
small inline script adds a switch between the three displays (normalised per column as Inseq shows it,
rescaled by the example's largest |score|, raw), a readout of the hovered cell, and highlights its row and
column headers. The initial display can also be picked with the URL fragment ``#raw``, ``#rescaled`` or
``#normalized``. "Raw" means token-level scores as stored, averaged over extra dims (layers, heads) if any.

Tokens are shown as people read them (:func:`~distattr.viz.common.display_token`: ``Ġ``/``▁`` as spaces, ``↵``
for a line break, byte-level pieces decoded); each token header's ``title`` (hover) holds its raw piece.

Long sequences stay readable: each table scrolls inside its box with the column headers, the token column
and the step-score rows kept in view; tables with more than ``COMPACT_COLUMNS`` columns
use compact cells (colour only, vertical column headers; the "numbers" switch shows the values again).
Nothing is loaded from anywhere: no URLs, fonts or CDNs.
"""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING

import numpy as np

from .common import Block, aggregated, blocks, color_limit, scaled, sequences_of, token_label

if TYPE_CHECKING:  # distattr.results imports the views (out.show()): types only here
    from ..results import SequenceAttribution

RED = (178, 24, 43)
BLUE = (33, 102, 172)
STEP_SCORE_BOLD = 0.5
COMPACT_COLUMNS = 40
MODES = ("normalized", "rescaled", "raw")
MODE_LABELS = {"normalized": "normalized per column", "rescaled": "rescaled by the global max", "raw": "raw"}

PAGE_CSS = """
body { margin: 0; padding: 24px 28px; background: #fff; }
"""

CSS = """
.distattr { --fg: #1f2328; --muted: #6e7781; --line: #d0d7de; --head: #f6f8fa; color: var(--fg); background: #fff;
  font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
.distattr * { box-sizing: border-box; }
.distattr h1 { font-size: 20px; margin: 0 0 4px; }
.distattr h2 { font-size: 16px; margin: 28px 0 6px; }
.distattr h3 { font-size: 13px; margin: 14px 0 6px; color: var(--muted); text-transform: uppercase;
  letter-spacing: .04em; }
.distattr .meta { color: var(--muted); margin: 0 0 10px; }
.distattr .meta b { color: var(--fg); font-weight: 600; }
.distattr .texts { margin: 0 0 8px; display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; }
.distattr .texts dt { color: var(--muted); }
.distattr .texts dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12.5px; white-space: pre-wrap; word-break: break-word; }
.distattr .controls { display: flex; flex-wrap: wrap; align-items: center; gap: 6px 14px; margin: 0 0 8px;
  font-size: 12px; color: var(--muted); }
.distattr .controls[hidden] { display: none; }
.distattr .seg { display: inline-flex; border: 1px solid var(--line); border-radius: 6px; overflow: hidden; }
.distattr .seg button { font: inherit; color: var(--fg); background: #fff; border: 0; padding: 3px 10px;
  cursor: pointer; }
.distattr .seg button + button { border-left: 1px solid var(--line); }
.distattr .seg button[aria-pressed="true"] { background: #24292f; color: #fff; }
.distattr .readout { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; color: var(--fg);
  white-space: pre; min-height: 1.45em; }
.distattr .legend { display: flex; align-items: center; gap: 8px; color: var(--muted); font-size: 12px;
  margin-bottom: 6px; }
.distattr .legend .bar { width: 220px; height: 12px; border: 1px solid var(--line); border-radius: 2px;
  background: linear-gradient(to right, rgb(33,102,172), rgba(33,102,172,0) 50%, rgba(178,24,43,0) 50%,
  rgb(178,24,43)); }
.distattr .scroll { overflow: auto; max-height: 80vh; max-width: 100%; border: 1px solid var(--line);
  border-radius: 6px; display: inline-block; vertical-align: top; }
.distattr table.heatmap { border-collapse: separate; border-spacing: 0; font-size: 12px;
  font-variant-numeric: tabular-nums; }
.distattr .heatmap th, .distattr .heatmap td { padding: 3px 6px; border-bottom: 1px solid #eef0f2;
  white-space: nowrap; }
.distattr .heatmap thead th { position: sticky; top: 0; z-index: 2; background: var(--head);
  vertical-align: bottom; border-bottom: 1px solid var(--line); text-align: center; font-weight: 600; }
.distattr .heatmap th.row { position: sticky; left: 0; z-index: 1; background: #fff; text-align: right;
  border-right: 1px solid var(--line); font-weight: 600; }
.distattr .heatmap thead th.corner { left: 0; z-index: 3; border-right: 1px solid var(--line); text-align: right;
  color: var(--muted); font-weight: 400; font-size: 11px; }
.distattr .tok { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px;
  white-space: pre; }
.distattr thead .tok { display: block; max-width: 9em; white-space: pre-wrap; word-break: break-all; }
.distattr .pos { display: block; color: var(--muted); font-weight: 400; font-size: 10.5px; }
.distattr th.row .tok { display: inline-block; max-width: 16em; overflow: hidden; text-overflow: ellipsis;
  vertical-align: bottom; }
.distattr th.row .pos { display: inline-block; min-width: 2.2em; margin-right: 6px; text-align: right; }
.distattr .heatmap td { text-align: center; min-width: 4.2em; }
.distattr .heatmap td.dark { color: #fff; }
.distattr .heatmap td.nan { background: repeating-linear-gradient(135deg, #fafbfc 0 4px, #f3f4f6 4px 8px); }
.distattr .heatmap td:hover { outline: 2px solid #24292f; outline-offset: -2px; }
.distattr .heatmap th.hl { background: #fff8c5; }
.distattr .heatmap thead th.hl { background: #fff8c5; }
.distattr .heatmap tfoot tr:first-child > * { border-top: 2px solid var(--line); }
.distattr .heatmap tfoot th.row { font-style: italic; }
.distattr .heatmap tfoot td.strong { font-weight: 700; }
.distattr .heatmap tfoot { position: sticky; bottom: 0; z-index: 2; }
.distattr .heatmap tfoot td { background-color: #fff; }
.distattr .heatmap.compact td { min-width: 0; width: 15px; max-width: 15px; height: 16px; padding: 0;
  font-size: 0; line-height: 0; }
.distattr .heatmap.compact th.row { padding: 0 6px; font-size: 11px; line-height: 15px; }
.distattr .heatmap.compact th.row .tok { font-size: 11px; }
.distattr .heatmap.compact thead th.col { padding: 4px 0; }
.distattr .heatmap.compact thead th.col .lab { writing-mode: vertical-rl; transform: rotate(180deg);
  display: inline-block; max-height: 10em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap;
  line-height: 15px; }
.distattr .heatmap.compact thead th.col .tok, .distattr .heatmap.compact thead th.col .pos { display: inline;
  font-size: 11px; max-width: none; }
.distattr .heatmap.compact thead th.col .pos { margin-bottom: 4px; }
.distattr.numbers .heatmap.compact td { width: auto; max-width: none; min-width: 4.2em; padding: 3px 6px;
  font-size: 12px; line-height: inherit; height: auto; }
.distattr .caption { color: var(--muted); font-size: 12px; margin: 4px 0 0; }
"""

# Progressive enhancement: the display switch, the numbers switch, the hover readout and header highlight.
# It initialises every ``.distattr`` root on the page that is not initialised yet, so it works for a page, for
# a notebook cell (where several outputs share one document) and without ids.
SCRIPT = """
(function () {
  var RED = [178, 24, 43], BLUE = [33, 102, 172], MODES = ["normalized", "rescaled", "raw"];
  var LABELS = {normalized: "normalized per column", rescaled: "rescaled by the global max", raw: "raw"};
  function exact(x) {
    for (var p = 1; p < 10; p++) { var t = +x.toPrecision(p); if (Math.fround(t) === x) return String(t); }
    return String(x);
  }
  function fixed(x) { var t = x.toFixed(3); return t === "-0.000" ? "0.000" : t; }
  function colour(x, limit) {
    var s = Math.max(-1, Math.min(1, x / limit)), c = s >= 0 ? RED : BLUE, a = Math.abs(s);
    return ["rgba(" + c[0] + "," + c[1] + "," + c[2] + "," + a.toFixed(3) + ")", a > 0.55];
  }
  function display(root, mode) {
    var limit = parseFloat(root.getAttribute("data-limit-" + mode));
    root.querySelectorAll("section.example").forEach(function (section) {
      var peak = Math.fround(parseFloat(section.getAttribute("data-peak")));
      section.querySelectorAll("td[data-r]").forEach(function (cell) {
        var raw = Math.fround(parseFloat(cell.getAttribute("data-r")));
        var x = mode === "raw" ? raw : mode === "rescaled" ? Math.fround(raw / peak)
          : Math.fround(parseFloat(cell.getAttribute("data-n")));
        var c = colour(x, limit), where = cell.title.split("\\n")[1];
        cell.textContent = fixed(x);
        cell.style.background = c[0];
        cell.classList.toggle("dark", c[1]);
        cell.title = exact(x) + "\\n" + where + (mode === "raw" ? "" : "\\nraw " + exact(raw));
      });
    });
    root.querySelectorAll(".legend .lo").forEach(function (e) { e.textContent = String(+(-limit).toPrecision(3)); });
    root.querySelectorAll(".legend .hi").forEach(function (e) { e.textContent = String(+limit.toPrecision(3)); });
    root.querySelectorAll(".mode-label").forEach(function (e) { e.textContent = LABELS[mode]; });
    root.querySelectorAll(".seg button").forEach(function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-mode") === mode));
    });
    root.setAttribute("data-mode", mode);
  }
  function hover(root) {
    var readout = root.querySelector(".readout"), lit = [];
    root.addEventListener("mouseover", function (event) {
      var cell = event.target.closest ? event.target.closest("td") : null;
      lit.forEach(function (e) { e.classList.remove("hl"); });
      lit = [];
      if (!cell || !root.contains(cell)) return;
      var table = cell.closest("table"), head = table.tHead && table.tHead.rows[0];
      lit = [cell.parentNode.cells[0]];
      if (head && head.cells[cell.cellIndex]) lit.push(head.cells[cell.cellIndex]);
      lit.forEach(function (e) { e.classList.add("hl"); });
      var lines = cell.title ? cell.title.split("\\n") : [];  // value, where (, raw value)
      if (readout) readout.textContent = lines.length ? [lines[1], lines[0]].concat(lines.slice(2)).join("   ") : "";
    });
  }
  function init(root) {
    root.classList.add("js");
    root.setAttribute("data-ready", "");
    var controls = root.querySelector(".controls");
    if (controls) controls.hidden = false;
    root.querySelectorAll(".seg button").forEach(function (b) {
      b.addEventListener("click", function () { display(root, b.getAttribute("data-mode")); });
    });
    var numbers = root.querySelector("input.numbers");
    if (numbers) numbers.addEventListener("change", function () {
      root.classList.toggle("numbers", numbers.checked);
    });
    hover(root);
    var wanted = (location.hash || "").slice(1);
    if (MODES.indexOf(wanted) >= 0 && wanted !== root.getAttribute("data-mode")) display(root, wanted);
  }
  document.querySelectorAll(".distattr:not([data-ready])").forEach(init);
})();
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


def _mode(normalize: bool, rescale: bool) -> str:
    if normalize and rescale:
        raise ValueError("normalize and rescale are mutually exclusive")
    return "normalized" if normalize else "rescaled" if rescale else "raw"


def render_html(out, normalize: bool = True, rescale: bool = False, step_scores: bool = True,
                title: str = "distattr attributions") -> str:
    """One self-contained HTML page with a heatmap per block of each example of ``out``.

    Args:
        out: an :class:`~distattr.results.AttributionOutput` or one ``SequenceAttribution``.
        normalize / rescale: the display shown first (Inseq's display aggregation, see
            ``SequenceAttribution.aggregate``); the page can switch to the others.
        step_scores: add the step-score rows.
        title: the page title and heading.
    """
    fragment = render_fragment(out, normalize=normalize, rescale=rescale, step_scores=step_scores, title=title)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{PAGE_CSS}</style>\n</head>\n<body>\n"
            f"{fragment}</body>\n</html>\n")


def render_fragment(out, normalize: bool = True, rescale: bool = False, step_scores: bool = True,
                    title: str | None = None) -> str:
    """The heatmaps as one ``<div class="distattr">`` with its own scoped style and script, for notebooks
    (``_repr_html_``) and for embedding in other pages. Arguments as :func:`render_html`; no heading when
    ``title`` is None."""
    mode = _mode(normalize, rescale)
    views = {"normalized": aggregated(out, True, False), "raw": aggregated(out, False, False),
             "rescaled": aggregated(out, False, True)}
    limits = {name: color_limit(seqs) for name, seqs in views.items()}
    limit = limits[mode]
    info = getattr(out, "info", {}) or {}
    parts = ['<div class="distattr" data-mode="{}" {}>\n<style>{}</style>\n'.format(
        mode, " ".join(f'data-limit-{name}="{exact(limits[name])}"' for name in MODES), CSS)]
    if title is not None:
        parts.append(f"<h1>{escape(title)}</h1>\n")
    compact = any(len(seq.generated_tokens) > COMPACT_COLUMNS for seq in sequences_of(out))
    parts.append(f"{_meta(info, mode)}{_controls(mode, compact)}"
                 f'<div class="legend"><span class="lo">{-limit:.3g}</span><span class="bar"></span>'
                 f'<span class="hi">{limit:.3g}</span></div>\n')
    inputs, generated = info.get("input_texts"), info.get("generated_texts")
    for index, raw_seq in enumerate(views["raw"]):
        parts.append(f'<section class="example" id="example-{index}" data-peak="{exact(_peak(raw_seq))}">\n'
                     f"<h2>Example {index}</h2>\n")
        texts = []
        for name, values in (("input", inputs), ("output", generated)):
            if isinstance(values, list) and index < len(values) and isinstance(values[index], str):
                texts.append(f"<dt>{name}</dt><dd>{escape(values[index])}</dd>")
        if texts:
            parts.append(f'<dl class="texts">{"".join(texts)}</dl>\n')
        shown = blocks(views[mode][index], step_scores)
        normalized = blocks(views["normalized"][index], step_scores)
        raw = blocks(views["raw"][index], step_scores)
        for block, norm_block, raw_block in zip(shown, normalized, raw, strict=True):
            parts.append(_block_html(block, norm_block, raw_block, limit, mode))
        parts.append("</section>\n")
    parts.append(f"<script>{SCRIPT}</script>\n</div>\n")
    return "".join(parts)


def _peak(raw: SequenceAttribution) -> float:
    """The divisor of the rescaled display: the largest |score| of the example (``raw``: its extra dims
    averaged, as ``aggregate(normalize=False)`` gives it)."""
    found = [np.abs(m[~np.isnan(m)]) for m in (raw.source_attributions, raw.target_attributions)
             if m is not None and (~np.isnan(m)).any()]
    return max((float(m.max()) for m in found), default=0.0) or 1.0


def _meta(info: dict, mode: str) -> str:
    items = []
    for label, key in (("model", "model_name"), ("method", "attribution_method"), ("attributed", "attributed_fn")):
        value = info.get(key)
        if isinstance(value, str) and value:
            items.append(f"{label} <b>{escape(value)}</b>")
    items.append(f'scores <span class="mode-label">{MODE_LABELS[mode]}</span>')
    return f'<p class="meta">{" · ".join(items)}</p>\n'


def _controls(mode: str, compact: bool) -> str:
    """The display switch, and the numbers switch if some table is compact (shown by the script: they do
    nothing without it)."""
    buttons = "".join(f'<button type="button" data-mode="{name}" aria-pressed="{str(name == mode).lower()}">'
                      f"{name}</button>" for name in MODES)
    numbers = '<label><input type="checkbox" class="numbers"> numbers in compact tables</label>' if compact else ""
    return (f'<div class="controls" hidden><span class="seg" role="group" aria-label="scores">{buttons}</span>'
            f'{numbers}<span class="readout"></span></div>\n')


def _token_html(position: int, label: str) -> str:
    """A token header's content: its position and the token as shown (``label``)."""
    return f'<span class="pos">{position}</span><span class="tok">{escape(label)}</span>'


def _block_html(block: Block, normalized: Block, raw: Block, limit: float, mode: str) -> str:
    """One table; ``normalized`` and ``raw`` are the same block in the other displays (for the switch)."""
    compact = len(block.columns) > COMPACT_COLUMNS
    head = ['<tr><th class="corner">' + ("attributed ↓ / generated →" if block.scores is not None else "") + "</th>"]
    for pos, tok, label in zip(block.positions, block.columns, block.column_labels, strict=True):
        head.append(f'<th class="col" title="{pos} {escape(token_label(tok))}"><span class="lab">'
                    f"{_token_html(pos, label)}</span></th>")
    head.append("</tr>")
    rows = []
    if block.scores is not None:
        for r, (tok, label) in enumerate(zip(block.rows, block.row_labels, strict=True)):
            cells = [f'<tr><th class="row" title="{r} {escape(token_label(tok))}">{_token_html(r, label)}</th>']
            for c in range(len(block.columns)):
                value = float(block.scores[r, c])
                if math.isnan(value):
                    cells.append('<td class="c nan"></td>')
                    continue
                background, dark = cell_color(value, limit)
                raw_value, norm_value = exact(raw.scores[r, c]), exact(normalized.scores[r, c])
                where = escape(f"{label} → {block.column_labels[c]}")
                extra = "" if mode == "raw" else f"&#10;raw {raw_value}"
                cells.append(f'<td class="c{" dark" if dark else ""}" style="background:{background}" '
                             f'title="{exact(value)}&#10;{where}{extra}" data-r="{raw_value}" '
                             f'data-n="{norm_value}">{fmt(value)}</td>')
            cells.append("</tr>")
            rows.append("".join(cells))
    steps = []
    for name, values in block.step_scores.items():
        finite = np.abs(values[np.isfinite(values)])
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        cells = [f'<tr><th class="row">{escape(name)}</th>']
        for c in range(len(block.columns)):
            value = float(values[c]) if c < len(values) else float("nan")
            if math.isnan(value):
                cells.append('<td class="s nan"></td>')
                continue
            strong = " strong" if abs(value) >= STEP_SCORE_BOLD else ""
            shade = f"rgba(110,119,129,{0.35 * min(abs(value) / top, 1.0):.3f})" if math.isfinite(value) else "#fff"
            cells.append(f'<td class="s{strong}" style="background-image:linear-gradient({shade},{shade})" '
                         f'title="{exact(value)}&#10;{escape(name)} of {escape(block.column_labels[c])}">'
                         f"{fmt(value)}</td>")
        cells.append("</tr>")
        steps.append("".join(cells))
    body = f"<tbody>{''.join(rows)}</tbody>" if rows else ""
    step_body = f"<tfoot>{''.join(steps)}</tfoot>" if steps else ""
    table_class = "heatmap compact" if compact else "heatmap"
    return (f"<h3>{escape(block.label)}</h3>\n<div class=\"scroll\"><table class=\"{table_class}\">"
            f"<thead>{''.join(head)}</thead>{body}{step_body}</table></div>\n")
