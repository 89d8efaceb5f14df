"""A one-page, self-contained HTML report of dataset-wide statistics: tables and PNG figures embedded as data URIs,
inline CSS, no script and no URL (it opens offline and can be mailed as one file)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

MAX_TABLE_ROWS = 40

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ddd;
       padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 12px; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f4f5f7; } td.text { text-align: left; }
img { max-width: 100%; margin: 0.5em 0; display: block; }
p.note { color: #555; font-size: 0.92em; }
"""


@dataclass(frozen=True)
class Section:
    """One part of the report: a heading, a note, tables (DataFrames) and PNG figures (bytes)."""

    title: str
    note: str = ""
    tables: Sequence = ()
    figures: Sequence[bytes] = field(default_factory=tuple)


def render_report(title: str, sections: Sequence[Section], facts: dict | None = None) -> str:
    """The HTML page: ``facts`` (store, model, method, ...) under the title, then each section."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    facts = {**(facts or {}), "generated": datetime.now(UTC).isoformat(timespec="seconds")}
    parts.append('<p class="meta">' + " · ".join(f"<b>{html.escape(str(k))}</b>: {html.escape(str(v))}"
                                                   for k, v in facts.items()) + "</p>")
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.note:
            parts.append(f'<p class="note">{html.escape(section.note)}</p>')
        for table in section.tables:
            parts.append(_table_html(table))
        for png in section.figures:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<img alt="{html.escape(section.title)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts)


def _table_html(table) -> str:
    shown = table.head(MAX_TABLE_ROWS)
    more = len(table) - len(shown)
    body = shown.to_html(index=False, escape=True, na_rep="", border=0,
                         float_format=lambda x: f"{x:.4g}")
    if more > 0:
        body += f'<p class="note">... {more} more rows (full table in the CSV/Parquet output)</p>'
    return body


def write_report(path: str | Path, title: str, sections: Sequence[Section], facts: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(title, sections, facts), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the report of one `distattr stats` run


@dataclass(frozen=True)
class Results:
    """What one run computed (any part may be missing): the per-example summaries, reductions
    ``(by, value, table)``, correlations with the joined table they come from, faithfulness runs by ranking."""

    summaries: object = None
    reductions: tuple = ()
    correlations: tuple = ()
    joined: object = None
    faithfulness: dict = field(default_factory=dict)


def figures(results: Results) -> dict[str, object]:
    """Every figure of ``results`` by file name (``summaries.png``, ``by-position-normalized.png``, ...)."""
    from . import plots

    out = {}
    if results.summaries is not None and len(results.summaries):
        out["summaries.png"] = plots.summaries_figure(results.summaries)
    for by, value, table in results.reductions:
        fig = plots.reduction_figure(table, by, value)
        if fig is not None:
            out[f"by-{'-'.join(by) or 'all'}-{value}.png"] = fig
    for c in results.correlations:
        out[f"correlation-{c.metric}-{c.label}.png"] = plots.correlation_figure(results.joined, c.metric, c.label, c)
    if results.faithfulness:
        out["faithfulness.png"] = plots.faithfulness_figure(results.faithfulness)
    return out


def sections(results: Results, pngs: dict[str, bytes]) -> list[Section]:
    """The report's sections, with the figures of :func:`figures` as PNG bytes."""
    from .correlation import correlation_table

    out = []
    table = results.summaries
    if table is not None:
        metrics = [c for c in table.columns if c in ("share_source", "entropy", "entropy_normalized", "mass",
                                                     "n_source", "n_target", "n_steps") or c.endswith("_mean")]
        described = table[metrics].describe(percentiles=[0.1, 0.5, 0.9]).T.reset_index(names="metric")
        tables = [described]
        if "top1_token" in table.columns:
            top = table["top1_token"].value_counts().head(15).rename_axis("top1_token").reset_index(name="examples")
            tables.append(top)
        out.append(Section("Per-example summaries", f"{len(table)} examples. share_source: share of the attribution "
                           "on the source (prompt) rather than the generated prefix; entropy of each column's "
                           "normalized scores (nats), averaged over the steps.", tables,
                           [pngs[k] for k in ("summaries.png",) if k in pngs]))
    for by, value, reduced in results.reductions:
        name = f"by-{'-'.join(by) or 'all'}-{value}.png"
        shown = reduced.sort_values("count", ascending=False) if "token" in by else reduced
        note = f"{len(reduced)} groups; {int(reduced['count'].sum())} values."
        out.append(Section(f"{value} by {' x '.join(by) or 'all'}", note, [shown],
                           [pngs[name]] if name in pngs else []))
    if results.correlations:
        figs = [pngs[f"correlation-{c.metric}-{c.label}.png"] for c in results.correlations
                if f"correlation-{c.metric}-{c.label}.png" in pngs]
        out.append(Section("Correlation with labels", "Kendall's tau-b and Spearman's rho with two-sided p-values "
                           "(scipy), over the examples with both values.",
                           [correlation_table(results.correlations)], figs))
    if results.faithfulness:
        tables = []
        for name, result in results.faithfulness.items():
            summary = result.summary()
            summary.insert(0, "ranking", name)
            tables.append(summary)
        first = next(iter(results.faithfulness.values()))
        out.append(Section("Faithfulness", f"ERASER comprehensiveness / sufficiency per explained step (mode: "
                           f"{first.mode}), averaged over steps then examples; AOPC = mean over the fractions.",
                           tables, [pngs["faithfulness.png"]] if "faithfulness.png" in pngs else []))
    return out


def store_facts(store) -> dict:
    identity = store.identity
    facts = {"store": store.url, "examples": len(store), "status": store.attrs.get("status"),
             "model": identity.get("model"), "method": identity.get("method")}
    if store.schema.dims:
        facts["dims"] = " x ".join(f"{d} {n}" for d, n in zip(store.schema.dims, store.schema.dim_sizes, strict=True))
    return facts


def report_html(store, results: Results, title: str | None = None) -> str:
    """The whole report of ``results`` on ``store`` as one HTML string."""
    from .plots import png_bytes

    pngs = {name: png_bytes(fig) for name, fig in figures(results).items()}
    return render_report(title or f"distattr statistics: {Path(str(store.url)).name}", sections(results, pngs),
                         store_facts(store))
