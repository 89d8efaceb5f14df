"""Console heatmaps (rich), laid out like Inseq's ``show()``.

One table per block (source, then target) of each example: rows are the attributed tokens, columns the
generated tokens (headed by their target position), step scores are extra rows at the bottom (bold when
``|v| >= 0.5``). Values have 2 decimals, NaN cells are blank and each value is coloured on a symmetric
coolwarm scale ``[-m, m]``, ``m = max(0, nanmax)`` over every example shown (red positive, blue negative).
Columns that do not fit the console width are split over several tables; the last table's caption gives
the colour scale.

Tokens are shown as people read them (:func:`~distattr.viz.common.display_token`: ``Ġ``/``▁`` as spaces, ``↵``
for a line break, byte-level pieces decoded). A terminal has no hover: the raw pieces are the
``SequenceAttribution`` tokens (``out[0].target_tokens``) and the saved JSON.
"""

from __future__ import annotations

import math

from rich import box
from rich.cells import cell_len
from rich.color import Color
from rich.console import Console
from rich.style import Style
from rich.table import Column, Table
from rich.text import Text

from .common import Block, aggregated, blocks, color_limit, scaled

# matplotlib's "coolwarm" (Inseq's console colormap) sampled at 9 evenly spaced points
COOLWARM = ((59, 76, 192), (98, 130, 234), (141, 176, 254), (185, 208, 249), (221, 220, 220), (245, 196, 172),
            (244, 152, 122), (221, 95, 75), (180, 4, 38))
STEP_SCORE_BOLD = 0.5
MAX_LABEL_WIDTH = 24
MAX_COLUMN_WIDTH = 10


def coolwarm(value: float, limit: float) -> tuple[int, int, int]:
    """RGB of ``value`` on the symmetric scale ``[-limit, limit]``."""
    x = (scaled(value, limit) + 1.0) / 2.0 * (len(COOLWARM) - 1)
    lo = min(int(math.floor(x)), len(COOLWARM) - 2)
    frac = x - lo
    a, b = COOLWARM[lo], COOLWARM[lo + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * frac) for k in range(3))


def fmt(value: float) -> str:
    """Two decimals, NaN blank."""
    if value is None or math.isnan(value):
        return ""
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def show_console(out, normalize: bool = True, rescale: bool = False, step_scores: bool = True,
                 console: Console | None = None) -> None:
    """Print one heatmap per block (source, target) of each example of ``out``.

    Args:
        out: an :class:`~distattr.results.AttributionOutput` (or one ``SequenceAttribution``).
        normalize / rescale: Inseq's display aggregation (see ``SequenceAttribution.aggregate``).
        step_scores: add the step-score rows.
        console: a ``rich.console.Console`` (default: a new one on stdout).
    """
    console = console if console is not None else Console()
    sequences = aggregated(out, normalize, rescale)
    limit = color_limit(sequences)
    for index, seq in enumerate(sequences):
        for block in blocks(seq, step_scores):
            for table in heatmap_tables(block, limit, console.width, title=f"Example {index} · {block.label}"):
                console.print(table)
                console.print()


def heatmap_tables(block: Block, limit: float, width: int, title: str = "") -> list[Table]:
    """The tables showing ``block``, its columns split so that each table fits ``width`` characters."""
    n_rows = 0 if block.scores is None else block.scores.shape[0]
    index_width = len(str(max(n_rows - 1, 0)))
    label_width = min(max([cell_len(x) for x in block.row_labels] + [len(k) for k in block.step_scores] + [1]),
                      MAX_LABEL_WIDTH)
    cells = [[fmt(float(v)) for v in block.scores[:, c]] if block.scores is not None else []
             for c in range(len(block.columns))]
    step_cells = {name: [fmt(float(v)) for v in values] for name, values in block.step_scores.items()}
    col_widths = []
    for c, label in enumerate(block.column_labels):
        texts = cells[c] + [vals[c] for vals in step_cells.values() if c < len(vals)]
        col_widths.append(max([len(str(block.positions[c])), min(cell_len(label), MAX_COLUMN_WIDTH), 4]
                              + [len(t) for t in texts]))
    # rich: each column takes its width + 2 (padding) and there is one rule per column plus the right edge
    fixed = (index_width + 2) + (label_width + 2) + 3
    if col_widths and fixed + col_widths[0] + 3 > width:
        label_width = max(4, label_width - (fixed + col_widths[0] + 3 - width))
        fixed = (index_width + 2) + (label_width + 2) + 3
    chunks, current, used = [], [], fixed
    for c, w in enumerate(col_widths):
        if current and used + w + 3 > width:
            chunks.append(current)
            current, used = [], fixed
        current.append(c)
        used += w + 3
    if current or not chunks:
        chunks.append(current)
    tables = []
    for k, chunk in enumerate(chunks):
        part = title
        if len(chunks) > 1 and chunk:
            part += f" · steps {block.positions[chunk[0]]}–{block.positions[chunk[-1]]} ({k + 1}/{len(chunks)})"
        tables.append(_table(block, chunk, col_widths, index_width, label_width, cells, step_cells, limit, part,
                             last=k == len(chunks) - 1))
    return tables


def _caption(limit: float) -> Text:
    """What the axes are, and the colour scale (blue ``-limit`` to red ``+limit``)."""
    caption = Text("→ generated tokens, ↓ attributed tokens · colours ", style="dim")
    caption.append(f"{-limit:.3g}", style=Style(color=Color.from_rgb(*COOLWARM[0])))
    caption.append(" … ", style="dim")
    caption.append(f"{limit:.3g}", style=Style(color=Color.from_rgb(*COOLWARM[-1])))
    return caption


def _table(block: Block, chunk: list[int], col_widths, index_width, label_width, cells, step_cells, limit,
           title: str, last: bool) -> Table:
    columns = [Column(header=Text(""), justify="right", width=index_width, no_wrap=True),
               Column(header=Text(""), justify="right", width=label_width, overflow="fold")]
    for c in chunk:
        header = Text(f"{block.positions[c]}\n", style="dim")
        header.append(block.column_labels[c], style="bold")
        columns.append(Column(header=header, justify="center", width=col_widths[c], overflow="fold"))
    table = Table(*columns, title=Text(title) if title else None, box=box.HEAVY_HEAD, padding=(0, 1),
                  caption=_caption(limit) if last else None)
    if block.scores is not None:
        n_rows = block.scores.shape[0]
        for r in range(n_rows):
            row = [Text(str(r), style="dim"), Text(block.row_labels[r], style="bold")]
            for c in chunk:
                value = float(block.scores[r, c])
                style = Style() if math.isnan(value) else Style(color=Color.from_rgb(*coolwarm(value, limit)))
                row.append(Text(cells[c][r], style=style))
            table.add_row(*row, end_section=r == n_rows - 1)
    for name, values in block.step_scores.items():
        row = [Text(""), Text(name, style="bold")]
        for c in chunk:
            value = float(values[c]) if c < len(values) else float("nan")
            bold = not math.isnan(value) and abs(value) >= STEP_SCORE_BOLD
            row.append(Text(step_cells[name][c] if c < len(values) else "", style="bold" if bold else ""))
        table.add_row(*row, end_section=True)
    return table


__all__ = ["coolwarm", "fmt", "heatmap_tables", "show_console"]
