"""Rank correlation of per-example metrics with external labels: Kendall's tau-b and Spearman's rho (scipy).

Labels come from a CSV (or any table) joined on the example id, or from a column already in the summaries (a
kept metadata field). Examples where the metric or the label is missing (NaN, empty, not a number) are left out
and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Correlation:
    """One metric against one label over ``n`` examples (``dropped``: rows of the join with a missing value)."""

    metric: str
    label: str
    n: int
    dropped: int
    kendall_tau: float
    kendall_p: float
    spearman_rho: float
    spearman_p: float


def read_labels(path: str | Path, id_column: str = "example_id"):
    """A CSV/TSV (by extension) or Parquet file of labels with an ``id_column``; ids are read as strings."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq"):
        labels = pd.read_parquet(path)
        if id_column in labels.columns:
            labels[id_column] = labels[id_column].astype(str)
    else:
        labels = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype={id_column: str})
    if id_column not in labels.columns:
        raise ValueError(f"{path} has no id column {id_column!r} (columns: {', '.join(map(str, labels.columns))}); "
                         "give --id-column")
    if labels[id_column].duplicated().any():
        dup = labels[id_column][labels[id_column].duplicated()].iloc[0]
        raise ValueError(f"{path}: id {dup!r} appears more than once in column {id_column!r}")
    return labels


def join_labels(summaries, labels, id_column: str = "example_id"):
    """Inner join of the summaries (``example_id``) with the labels (``id_column``); label columns whose names
    clash with summary columns get a ``label_`` prefix."""
    labels = labels.rename(columns={c: f"label_{c}" for c in labels.columns
                                    if c != id_column and c in summaries.columns})
    joined = summaries.merge(labels, left_on="example_id", right_on=id_column, how="inner",
                             suffixes=("", "_label"))
    if joined.empty:
        sample = ", ".join(map(repr, list(labels[id_column][:3])))
        store_sample = ", ".join(map(repr, list(summaries["example_id"][:3])))
        raise ValueError(f"no label id matches an example id (labels: {sample}...; store: {store_sample}...)")
    return joined


def correlate(table, metrics: str | Sequence[str], label: str) -> list[Correlation]:
    """Kendall's tau-b and Spearman's rho (with two-sided p-values) of each metric with the ``label`` column."""
    from scipy import stats

    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    for name in (*metrics, label):
        if name not in table.columns:
            raise ValueError(f"no column {name!r} to correlate (columns: {', '.join(map(str, table.columns))})")
    y_all = _numbers(table[label], label)
    out = []
    for metric in metrics:
        x_all = _numbers(table[metric], metric)
        ok = np.isfinite(x_all) & np.isfinite(y_all)
        x, y = x_all[ok], y_all[ok]
        if len(x) < 3:
            raise ValueError(f"{metric} vs {label}: only {len(x)} example(s) with both values; need at least 3")
        tau = stats.kendalltau(x, y)
        rho = stats.spearmanr(x, y)
        out.append(Correlation(metric=metric, label=label, n=int(ok.sum()), dropped=int((~ok).sum()),
                               kendall_tau=float(tau.statistic), kendall_p=float(tau.pvalue),
                               spearman_rho=float(rho.statistic), spearman_p=float(rho.pvalue)))
    return out


def _numbers(column, name: str) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    if column.notna().any() and np.isnan(values).all():
        raise ValueError(f"column {name!r} holds no numbers (e.g. {column.dropna().iloc[0]!r})")
    return values


def correlation_table(results: Sequence[Correlation]):
    import pandas as pd

    return pd.DataFrame([asdict(r) for r in results])
