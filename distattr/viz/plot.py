"""Heatmap figures with matplotlib, for papers and reports (``out.plot("fig.png")``).

One figure per example, laid out like the console and HTML views: a heatmap per block (source, then
target) with the attributed tokens as rows and the generated tokens as columns (labels on top), then the
step scores as rows of their own underneath (each row shaded by its value, relative to the row's largest
|value|). Scores are aggregated for display as the other views do (extra dims such as layers or heads are
averaged; ``normalize`` / ``rescale`` as ``SequenceAttribution.aggregate``) and coloured on a diverging,
symmetric scale ``[-m, m]`` centred on white (red positive, blue negative), ``m = max(0, nanmax)`` as in
Inseq (the largest |score| when every score is <= 0), shared by all the examples of one call. NaN cells
(future tokens) are left blank (lightly hatched). The figure grows with the sequence up to ``MAX_SIDE``
inches; past that the cells shrink and only every k-th token is labelled so that labels stay legible.
Values are written in the cells when they are large enough (``annotate=None``) or on request.
Tokens are labelled as people read them (:func:`~distattr.viz.common.display_token`: ``Ġ``/``▁`` as spaces, ``↵``
for a line break, byte-level pieces decoded); the raw pieces are the ``SequenceAttribution`` tokens.

matplotlib is an optional dependency: ``pip install 'distattr[viz]'``. Figures are built without pyplot
(no GUI backend, no global state) and saved with the format given by the file name (PNG, PDF, SVG, ...).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .common import aggregated, blocks, color_limit, sequences_of

if TYPE_CHECKING:  # distattr.results imports the views (out.show()): types only here
    from matplotlib.figure import Figure

    from ..results import SequenceAttribution

MAX_CELL = 0.42  # inches per cell when the sequence is short
MAX_SIDE = 30.0  # inches of cells at most along either axis
MIN_WIDE_CELL = 0.16  # inches: columns stay this wide (labels legible) when only the rows are many
MIN_STEP_ROW = 0.16  # inches: step-score rows stay tall enough for their label
MIN_LABEL_PT = 4.5  # smallest tick label font; below it, every k-th token is labelled
MAX_LABEL_PT = 10.0
ANNOTATE_MIN_CELL = 0.34  # inches: cells at least this big get their value written (annotate=None)
MAX_LABEL_CHARS = 24
HATCH = "#e3e6ea"


def require_matplotlib():
    """The ``matplotlib.figure.Figure`` class, or a clear ImportError."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "distattr's PNG/PDF plots need matplotlib, which is not installed. "
            "Install it with: pip install 'distattr[viz]'  (or: pip install matplotlib)"
        ) from err
    return Figure


def plot_figure(seq: SequenceAttribution, normalize: bool = True, rescale: bool = False, step_scores: bool = True,
                limit: float | None = None, title: str | None = None, annotate: bool | None = None,
                cmap: str = "RdBu_r") -> Figure:
    """The heatmap figure of one example (a ``matplotlib.figure.Figure``, not attached to pyplot).

    Args:
        seq: the example (raw, as returned by ``model.attribute``: it is aggregated here).
        normalize / rescale: Inseq's display aggregation (see ``SequenceAttribution.aggregate``).
        step_scores: add the step-score rows.
        limit: the colour range ``[-limit, limit]`` (default: Inseq's, from this example).
        title: a title above the figure.
        annotate: write the values in the cells (default: when the cells are large enough).
        cmap: a diverging matplotlib colormap, centred on 0.
    """
    Figure = require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    (agg,) = aggregated(seq, normalize, rescale)
    limit = color_limit([agg]) if limit is None else limit
    parts = blocks(agg, step_scores)
    if not parts:
        raise ValueError("nothing to plot: the example has no attributions and no step scores")
    heatmaps = [b for b in parts if b.scores is not None]
    steps = parts[-1].step_scores
    n_cols = len(parts[0].columns)
    n_rows = sum(len(b.rows) for b in heatmaps) + len(steps)
    # cells are square while the sequence is short; a long side shrinks its own cells (down to MAX_SIDE inches
    # in all), and the other side keeps cells wide enough for its labels
    cell_y = min(MAX_CELL, MAX_SIDE / max(n_rows, 1))
    cell_x = min(MAX_CELL, MAX_SIDE / max(n_cols, 1), max(cell_y, MIN_WIDE_CELL))
    step_cell = max(cell_y, MIN_STEP_ROW)
    pt_y, every_y = _label_size(cell_y)
    pt_x, every_x = _label_size(cell_x)
    annotate = min(cell_x, cell_y) >= ANNOTATE_MIN_CELL if annotate is None else annotate
    row_labels = [_label(t) for b in heatmaps for t in b.row_labels] + list(steps)
    col_labels = [_label(t) for t in parts[0].column_labels]
    left = 0.35 + _text_width(row_labels, max(pt_y, _label_size(step_cell)[0])) + (0.3 if len(heatmaps) > 1 else 0)
    top = 0.25 + _text_width(col_labels, pt_x) + (0.35 if title else 0)
    width = left + cell_x * n_cols + 1.1  # + colour bar
    ratios = [cell_y * len(b.rows) for b in heatmaps] + ([step_cell * len(steps)] if steps else [])
    height = top + sum(ratios) + 0.25 * len(ratios) + 0.3

    fig = Figure(figsize=(width, height), layout="constrained")
    grid = fig.add_gridspec(len(ratios), 1, height_ratios=ratios, hspace=0.02)
    colormap = colormaps[cmap].with_extremes(bad=(1, 1, 1, 0))
    norm = Normalize(-limit, limit)
    axes, image = [], None
    for k, block in enumerate(heatmaps):
        ax = fig.add_subplot(grid[k])
        ax.set_facecolor("white")
        ax.patch.set_hatch("////")
        ax.patch.set_edgecolor(HATCH)
        image = ax.imshow(np.ma.masked_invalid(block.scores), cmap=colormap, norm=norm, aspect="auto",
                          interpolation="nearest")
        _ticks(ax, "y", [_label(t) for t in block.row_labels], every_y, pt_y)
        if k == 0:
            _ticks(ax, "x", col_labels, every_x, pt_x, top=True)
        else:
            ax.set_xticks([])
        if len(heatmaps) > 1:
            ax.set_ylabel(block.label, fontsize=max(pt_y, 7) + 1)
        if annotate:
            _annotate(ax, block.scores, lambda v: abs(v) / limit > 0.6, min(cell_x, cell_y))
        axes.append(ax)
    if steps:
        ax = fig.add_subplot(grid[len(heatmaps)])
        values = np.full((len(steps), n_cols), np.nan)
        for r, v in enumerate(steps.values()):
            values[r, : min(len(v), n_cols)] = np.asarray(v, dtype=np.float64)[:n_cols]
        magnitude = np.where(np.isfinite(values), np.abs(values), 0.0)
        shade = np.where(np.isfinite(values), magnitude / np.maximum(magnitude.max(axis=1, keepdims=True), 1e-12),
                         np.nan)
        ax.imshow(np.ma.masked_invalid(shade), cmap=colormaps["Greys"].with_extremes(bad=(1, 1, 1, 0)),
                  vmin=0, vmax=2.5, aspect="auto", interpolation="nearest")
        _ticks(ax, "y", list(steps), 1, _label_size(step_cell)[0])
        if heatmaps:
            ax.set_xticks([])
        else:
            _ticks(ax, "x", col_labels, every_x, pt_x, top=True)
        if annotate:
            _annotate(ax, values, lambda v: False, min(cell_x, step_cell))
        axes.append(ax)
    if image is not None:
        bar = fig.colorbar(image, ax=axes, fraction=min(0.5, 0.25 / width), pad=0.01,
                           shrink=min(1.0, 4.0 / max(sum(ratios), 1e-9)), aspect=20)
        what = "normalized" if normalize else "rescaled" if rescale else "raw"
        bar.set_label(f"attribution ({what})", fontsize=max(pt_y, 7))
        bar.ax.tick_params(labelsize=max(pt_y - 1, 6))
    if title:
        fig.suptitle(title, fontsize=max(pt_y + 2, 9), parse_math=False)
    return fig


def _label_size(cell: float) -> tuple[float, int]:
    """Font size (points) of the labels of cells ``cell`` inches apart, and label every how many cells."""
    size = min(MAX_LABEL_PT, max(MIN_LABEL_PT, cell * 72 * 0.62))
    return size, max(1, math.ceil(size * 1.3 / (cell * 72)))


def _text_width(labels: list[str], size: float) -> float:
    """Roughly how many inches the longest label takes."""
    return size * 0.62 / 72 * max((len(x) for x in labels), default=1)


def _label(label: str) -> str:
    """A token as shown (``Block.row_labels``), cut to :data:`MAX_LABEL_CHARS`."""
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


def _ticks(ax, axis: str, labels: list[str], every: int, size: float, top: bool = False) -> None:
    """Label every ``every``-th cell (tokens are literal text: no mathtext)."""
    positions = list(range(0, len(labels), every))
    shown = [labels[i] for i in positions]
    if axis == "x":
        ax.set_xticks(positions, shown, rotation=90, fontsize=size, parse_math=False)
        ax.tick_params(axis="x", top=top, labeltop=top, bottom=not top, labelbottom=not top, length=2, pad=2)
    else:
        ax.set_yticks(positions, shown, fontsize=size, parse_math=False)
        ax.tick_params(axis="y", length=2, pad=2)
    ax.tick_params(which="minor", length=0)


def _annotate(ax, values: np.ndarray, dark, cell: float) -> None:
    size = max(4.0, min(8.0, cell * 72 * 0.27))
    for (r, c), v in np.ndenumerate(values):
        if math.isfinite(v):
            text = f"{v:.2f}"
            ax.text(c, r, "0.00" if text == "-0.00" else text, ha="center", va="center", fontsize=size,
                    color="white" if dark(v) else "#1f2328")


def plot_paths(path: str | Path, indices: Sequence[int]) -> list[Path]:
    """Where the examples ``indices`` are written: ``path`` itself for one example; for several, ``path`` with
    ``{index}`` filled in, or with ``-<index>`` before the extension (``fig.png`` -> ``fig-0.png``, ...)."""
    path = Path(path)
    if "{index}" in path.name:
        return [path.with_name(path.name.replace("{index}", str(i))) for i in indices]
    if len(indices) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in indices]


def plot_figures(out, normalize: bool = True, rescale: bool = False, step_scores: bool = True,
                 index: int | Sequence[int] | None = None, titles: bool | None = None, annotate: bool | None = None,
                 cmap: str = "RdBu_r") -> list[Figure]:
    """One figure per example of ``out``, sharing one colour range.

    Args:
        out: an :class:`~distattr.results.AttributionOutput` or one ``SequenceAttribution``.
        index: only these examples (one index or several; negative indices count from the end).
        titles: write "Example i" above each figure (default: when there are several examples).
        Other arguments as :func:`plot_figure`.
    """
    require_matplotlib()
    sequences = sequences_of(out)
    return [fig for _, fig in _figures(sequences, _chosen(sequences, index), normalize, rescale, step_scores,
                                       titles, annotate, cmap)]


def _chosen(sequences, index) -> list[int]:
    wanted = range(len(sequences)) if index is None else [index] if isinstance(index, int) else list(index)
    return [range(len(sequences))[i] for i in wanted]  # IndexError for a bad index


def _figures(sequences, chosen, normalize, rescale, step_scores, titles, annotate, cmap):
    picked = [sequences[i] for i in chosen]
    limit = color_limit([seq.aggregate(normalize, rescale) for seq in picked])
    titles = len(picked) > 1 if titles is None else titles
    for i, seq in zip(chosen, picked, strict=True):
        yield i, plot_figure(seq, normalize=normalize, rescale=rescale, step_scores=step_scores, limit=limit,
                             title=f"Example {i}" if titles else None, annotate=annotate, cmap=cmap)


def save_plots(out, path: str | Path, normalize: bool = True, rescale: bool = False, step_scores: bool = True,
               index: int | Sequence[int] | None = None, dpi: float = 150, titles: bool | None = None,
               annotate: bool | None = None, cmap: str = "RdBu_r") -> list[Path]:
    """Write one figure per example of ``out`` (file names: :func:`plot_paths`); returns the paths written.

    ``path``'s extension picks the format (.png, .pdf, .svg, ...), ``dpi`` the resolution of raster formats;
    other arguments as :func:`plot_figures`. Figures are written one at a time (memory stays flat)."""
    require_matplotlib()
    sequences = sequences_of(out)
    chosen = _chosen(sequences, index)
    written = []
    figures = _figures(sequences, chosen, normalize, rescale, step_scores, titles, annotate, cmap)
    for (_, fig), target in zip(figures, plot_paths(path, chosen), strict=True):
        written.append(save_figure(fig, target, dpi=dpi))
    return written


def save_figure(fig: Figure, path: str | Path, dpi: float = 150) -> Path:
    """Write ``fig`` (format from the extension), creating the folder; tokens without a glyph in the font are
    drawn as boxes, quietly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        fig.savefig(path, dpi=dpi)
    return path


__all__ = ["plot_figure", "plot_figures", "plot_paths", "require_matplotlib", "save_figure", "save_plots"]
