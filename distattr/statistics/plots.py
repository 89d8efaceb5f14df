"""Figures of the dataset-wide statistics (matplotlib, ``pip install 'distattr[viz]'``), built without pyplot.

Each ``*_figure`` function returns a ``matplotlib.figure.Figure``; :func:`save_png` writes one, :func:`png_bytes`
gives the PNG bytes (for the HTML report).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

NUMERIC_KEYS = ("position", "distance", "step")
SUMMARY_METRICS = ("share_source", "entropy_normalized", "entropy", "mass")
TOP_TOKENS = 30


def _figure(width: float, height: float):
    from ..viz.plot import require_matplotlib

    figure = require_matplotlib()
    return figure(figsize=(width, height), layout="constrained")


def save_png(fig, path: str | Path, dpi: float = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(fig, dpi))
    return path


def png_bytes(fig, dpi: float = 120) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def summaries_figure(table, metrics: Sequence[str] = SUMMARY_METRICS, bins: int = 40):
    """Histograms of per-example metrics (one panel each, the columns present)."""
    metrics = [m for m in metrics if m in table.columns and table[m].notna().any()]
    fig = _figure(3.2 * max(len(metrics), 1), 2.8)
    axes = fig.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=False):
        values = table[metric].dropna().to_numpy(dtype=float)
        ax.hist(values, bins=bins, color="#4c72b0")
        ax.axvline(float(np.mean(values)), color="#c44e52", lw=1, label=f"mean {np.mean(values):.3g}")
        ax.set_xlabel(metric)
        ax.legend(fontsize=7, frameon=False)
    axes[0].set_ylabel("examples")
    fig.suptitle(f"Per-example summaries ({len(table)} examples)", fontsize=10)
    return fig


def reduction_figure(table, by: Sequence[str], value: str, title: str = ""):
    """One key: mean with the q10-q90 band (numeric keys), bars (categories) or the most frequent tokens; two
    keys: a heatmap of the mean. None for three keys or more."""
    by = list(by)
    title = title or f"{value} by {' x '.join(by) or 'all'}"
    if len(by) == 2:
        return _heatmap(table, by, title)
    if len(by) > 2:
        return None
    key = by[0] if by else None
    if key == "token":
        return _token_bars(table, title)
    if key in NUMERIC_KEYS:
        return _line(table, key, title, value)
    return _bars(table, key, title, value)


def _band(table) -> tuple[str, str] | None:
    quantile = sorted(c for c in table.columns if c.startswith("q") and c[1:].replace(".", "").isdigit())
    return (quantile[0], quantile[-1]) if len(quantile) >= 2 else None


def _line(table, key: str, title: str, value: str):
    table = table.sort_values(key)
    fig = _figure(6.0, 3.2)
    ax = fig.subplots()
    x = table[key].to_numpy(dtype=float)
    ax.plot(x, table["mean"], marker="o", ms=3, color="#4c72b0", label="mean")
    band = _band(table)
    if band:
        ax.fill_between(x, table[band[0]], table[band[1]], color="#4c72b0", alpha=0.2, label=f"{band[0]}-{band[1]}")
    if "q50" in table.columns:
        ax.plot(x, table["q50"], ls="--", color="#55a868", lw=1, label="median")
    ax.set_xlabel({"position": "relative position in the context (bin start)",
                   "distance": "distance to the explained token"}.get(key, key))
    ax.set_ylabel(value)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    return fig


def _bars(table, key: str | None, title: str, value: str):
    labels = [str(x) for x in table[key]] if key else ["all"]
    fig = _figure(max(4.0, 0.35 * len(labels) + 2), 3.2)
    ax = fig.subplots()
    mean = table["mean"].to_numpy(dtype=float)
    band = _band(table)
    error = None
    if band:
        error = np.vstack([np.clip(mean - table[band[0]].to_numpy(dtype=float), 0, None),
                           np.clip(table[band[1]].to_numpy(dtype=float) - mean, 0, None)])
    ax.bar(range(len(labels)), mean, yerr=error, color="#4c72b0", capsize=2)
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 8 else 0, fontsize=7)
    ax.set_ylabel(value)
    ax.set_title(title + (f" (bars: {band[0]}-{band[1]})" if band else ""), fontsize=10)
    return fig


def _token_bars(table, title: str):
    top = table.sort_values("count", ascending=False).head(TOP_TOKENS).iloc[::-1]
    fig = _figure(6.0, max(3.0, 0.22 * len(top) + 1))
    ax = fig.subplots()
    names = [f"{t!s} ({n})" for t, n in zip(top.get("token_text", top["token"]), top["count"], strict=True)]
    ax.barh(range(len(top)), top["mean"], color="#4c72b0")
    ax.set_yticks(range(len(top)), names, fontsize=7)
    ax.set_xlabel("mean")
    ax.set_title(f"{title}: the {len(top)} most frequent tokens (count)", fontsize=10)
    return fig


def _heatmap(table, by: list[str], title: str):
    grid = table.pivot_table(index=by[0], columns=by[1], values="mean", sort=True)
    fig = _figure(max(4.5, 0.3 * grid.shape[1] + 2.5), max(3.0, 0.25 * grid.shape[0] + 1.5))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid.to_numpy(dtype=float)), aspect="auto", cmap="viridis",
                      interpolation="nearest")
    ax.set_yticks(range(grid.shape[0]), [str(x) for x in grid.index], fontsize=7)
    ax.set_xticks(range(grid.shape[1]), [str(x) for x in grid.columns], fontsize=7, rotation=90)
    ax.set_ylabel(by[0])
    ax.set_xlabel(by[1])
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="mean")
    return fig


def correlation_figure(joined, metric: str, label: str, result=None):
    """Scatter of a metric against a label, with tau and rho in the title."""
    import pandas as pd

    x = pd.to_numeric(joined[metric], errors="coerce")
    y = pd.to_numeric(joined[label], errors="coerce")
    ok = x.notna() & y.notna()
    fig = _figure(4.2, 3.4)
    ax = fig.subplots()
    ax.scatter(x[ok], y[ok], s=6 if ok.sum() > 500 else 14, alpha=0.4 if ok.sum() > 500 else 0.8, color="#4c72b0",
               edgecolors="none")
    ax.set_xlabel(metric)
    ax.set_ylabel(label)
    if result is not None:
        ax.set_title(f"Kendall τ = {result.kendall_tau:.3f} (p = {result.kendall_p:.2g}), "
                     f"Spearman ρ = {result.spearman_rho:.3f}", fontsize=9)
    return fig


def faithfulness_figure(results: dict):
    """Comprehensiveness and sufficiency against the removed fraction, one line per ranking
    (``{name: Faithfulness}``)."""
    fig = _figure(7.0, 3.0)
    left, right = fig.subplots(1, 2)
    for name, result in results.items():
        table = result.summary()
        rows = table[table["fraction"].notna()]
        left.plot(rows["fraction"], rows["comprehensiveness"], marker="o", label=name)
        right.plot(rows["fraction"], rows["sufficiency"], marker="o", label=name)
    left.set_title("comprehensiveness (higher: more faithful)", fontsize=9)
    right.set_title("sufficiency (lower: more faithful)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("fraction of context tokens removed / kept")
        ax.axhline(0, color="#999999", lw=0.5)
        ax.legend(fontsize=7, frameon=False)
    left.set_ylabel("p(y|x) - p(y|x')")
    return fig
