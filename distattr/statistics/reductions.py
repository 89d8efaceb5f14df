"""Dataset-wide means and quantiles of attribution scores, grouped by position, distance, token, step, layer, head.

A *cell* is one score: context token ``r`` of one example for one explained step (and one layer/head entry of
stores with extra dims). Cell values (``value=``):

* ``normalized`` (default): ``|A|`` divided by the column's L1 norm over the context, per layer/head entry: the
  share of the explained token's attribution that the token gets (Inseq's display normalisation);
* ``abs``: ``|A|``; ``raw``: ``A`` as stored (signed for signed methods).

Cells are grouped by any combination of (``by=``):

* ``position``: relative position of the token in the context, in ``bins`` equal bins of ``[0, 1)``: ``r / t``
  for decoder tokens (``t`` the explained position, so the context is positions ``0 .. t-1``), ``r / n_source``
  for encoder tokens; the ``position`` column is the bin's lower edge;
* ``distance``: ``t - r`` for decoder tokens (1 = the previous token; encoder tokens have none and are left out);
* ``side``: ``source`` (encoder input, or the prompt of decoder-only models) or ``prefix`` (generated tokens);
* ``token``: the context token's id (``token_text`` its string);
* ``step``: the explained step (column) ``c``; ``layer``, ``head`` (or any extra dim): its entry.

Column values summarise a whole column per layer/head entry instead (group by ``step`` and extra dims only):
``share_source``, ``entropy`` (nats, of the normalized column), ``mass`` (``sum |A|``) and ``total`` (``sum A``).

Means, standard deviations, minima and maxima are exact (Chan's parallel update across blocks). Quantiles come
from a histogram of ``hist_bins`` equal bins between each group's minimum and maximum (a second pass), linearly
interpolated within a bin: the error is at most ``resolution = (max - min) / hist_bins``, reported per group.
Quantiles are computed for the ``max_quantile_groups`` groups with most cells (all groups unless grouping by
token).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..store.reader import Store
from .chunks import BLOCK_BYTES, Block, Condition, compute, context, map_blocks, reduce_waves, selection

CELL_KEYS = ("position", "distance", "side", "token")
CELL_VALUES = ("normalized", "abs", "raw")
COLUMN_VALUES = ("share_source", "entropy", "mass", "total")
DENSE_LIMIT = 1 << 20  # largest key space counted with bincount; beyond it keys are sorted first


@dataclass(frozen=True)
class Spec:
    """A reduction: group keys, their radices (the key space of each) and the value."""

    by: tuple[str, ...]
    radix: tuple[int, ...]
    value: str
    bins: int

    @property
    def per_column(self) -> bool:
        return self.value in COLUMN_VALUES


@dataclass(frozen=True)
class GroupStats:
    """Moments of the values of each group key present (keys sorted ascending)."""

    keys: np.ndarray  # [G] int64
    count: np.ndarray  # [G] int64
    mean: np.ndarray  # [G] float64
    m2: np.ndarray  # [G] sum of squared deviations from the mean
    min: np.ndarray
    max: np.ndarray
    labels: dict[int, str]  # token id -> string, when grouping by token

    @staticmethod
    def of(keys: np.ndarray, values: np.ndarray, space: int, labels: dict[int, str] | None = None) -> GroupStats:
        """Group ``values`` by ``keys`` (integers in ``[0, space)``)."""
        if space <= DENSE_LIMIT:
            index, size = keys, space
        else:
            uniq, index = np.unique(keys, return_inverse=True)
            size = len(uniq)
        count = np.bincount(index, minlength=size)
        total = np.bincount(index, values, minlength=size)
        present = np.flatnonzero(count)
        mean = total[present] / count[present]
        dev = values - _scatter(mean, present, size)[index]
        m2 = np.bincount(index, dev * dev, minlength=size)[present]
        low, high = np.full(size, np.inf), np.full(size, -np.inf)
        np.minimum.at(low, index, values)
        np.maximum.at(high, index, values)
        group_keys = present if space <= DENSE_LIMIT else uniq[present]
        return GroupStats(group_keys.astype(np.int64), count[present], mean, m2, low[present], high[present],
                          labels or {})

    @staticmethod
    def merge(*parts: GroupStats) -> GroupStats:
        """Combine per-block statistics (Chan et al.'s pairwise update of mean and M2)."""
        keys = np.concatenate([p.keys for p in parts])
        uniq, index = np.unique(keys, return_inverse=True)
        count = np.concatenate([p.count for p in parts])
        mean = np.concatenate([p.mean for p in parts])
        n = np.bincount(index, count, minlength=len(uniq))
        new_mean = np.bincount(index, count * mean, minlength=len(uniq)) / np.maximum(n, 1)
        shift = mean - new_mean[index]
        m2 = np.bincount(index, np.concatenate([p.m2 for p in parts]) + count * shift * shift, minlength=len(uniq))
        low, high = np.full(len(uniq), np.inf), np.full(len(uniq), -np.inf)
        np.minimum.at(low, index, np.concatenate([p.min for p in parts]))
        np.maximum.at(high, index, np.concatenate([p.max for p in parts]))
        labels = {}
        for p in parts:
            labels.update(p.labels)
        return GroupStats(uniq, n.astype(np.int64), new_mean, m2, low, high, labels)


def _scatter(values: np.ndarray, at: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size)
    out[at] = values
    return out


# ---------------------------------------------------------------- cells and keys of a block


def cell_values(block: Block, spec: Spec) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """The block's valid values and their group keys (1-D, same length), and token labels if grouped by token.

    Keys are computed only at the valid cells (their indices), in integer arithmetic."""
    ctx = context(block)
    if spec.per_column:
        values, valid = _column_values(ctx.values, ctx.side, spec.value, block)  # [n, c, *D]
        at = np.nonzero(valid)
        out = values[at]
        n_i, c_i, d_i = at[0], at[1], at[2:]
        r_i = None
    else:
        at, out = _cells(ctx.values, spec.value, block)  # indices into [n, R, c, *D]
        n_i, r_i, c_i, d_i = at[0], at[1], at[2], at[3:]
    keys = np.zeros(len(out), np.int64)
    ok = np.ones(len(out), bool)
    for name, radix in zip(spec.by, spec.radix, strict=True):
        key = _key(name, block, ctx, spec, n_i, r_i, c_i, d_i)
        ok &= key >= 0
        keys = keys * radix + key
    labels = {}
    if "token" in spec.by and ctx.tokens is not None:
        rows = np.unique(n_i * ctx.ids.shape[1] + r_i)  # (example, row) pairs with a counted cell
        ids = ctx.ids.reshape(-1)[rows]
        ids, first = np.unique(ids, return_index=True)
        strings = np.asarray(ctx.tokens).reshape(-1)[rows[first]]
        labels = {int(i): str(t) for i, t in zip(ids, strings, strict=True)}
    return keys[ok], out[ok], labels


def _cells(v: np.ndarray, value: str, block: Block) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Indices of the valid cells of ``v [n, R, c, *D]`` and their values (float64)."""
    valid = ~np.isnan(v)
    valid &= block.column_valid()[(slice(None), None, slice(None), *((None,) * (v.ndim - 3)))]
    at = np.nonzero(valid)
    x = v[at].astype(np.float64)
    if value == "raw":
        return at, x
    x = np.abs(x)
    if value == "abs":
        return at, x
    total = np.nansum(np.abs(v), axis=1, dtype=np.float64)  # [n, c, *D]
    norm = total[(at[0], *at[2:])]
    keep = norm > 0
    return tuple(i[keep] for i in at), x[keep] / norm[keep]


def _column_values(values: np.ndarray, side: np.ndarray, value: str, block: Block):
    """Per column and layer/head entry ``[n, c, *D]``: the column value, and which columns count."""
    extra = values.ndim - 3
    nan = np.isnan(values)
    raw = np.where(nan, 0.0, values.astype(np.float64))
    a = np.abs(raw)
    mass = a.sum(axis=1)
    valid = (~nan).any(axis=1) & block.column_valid()[(...,) + (None,) * extra]
    if value == "mass":
        return mass, valid
    if value == "total":
        return raw.sum(axis=1), valid
    a /= np.where(mass > 0, mass, 1.0)[:, None]
    valid &= mass > 0
    if value == "share_source":
        return (a * (side == 0)[(...,) + (None,) * (1 + extra)]).sum(axis=1), valid
    logs = np.log(a, where=a > 0, out=np.zeros_like(a))
    return -(a * logs).sum(axis=1), valid


def _key(name: str, block: Block, ctx, spec: Spec, n_i, r_i, c_i, d_i) -> np.ndarray:
    """Key ``name`` of each valid cell (or column) given its indices; -1 where undefined."""
    if name == "step":
        return block.first_step + c_i
    if name in block.dims:
        return d_i[block.dims.index(name)]
    if name == "side":
        return ctx.side[n_i, r_i].astype(np.int64)
    if name == "token":
        return ctx.ids[n_i, r_i].astype(np.int64)
    explained = block.attr_pos_start[n_i] + block.first_step + c_i
    position = ctx.position[n_i, r_i]
    in_source = ctx.in_source[n_i, r_i]
    if name == "distance":
        return np.where(in_source, -1, explained - position)
    if name == "position":
        denom = np.maximum(np.where(in_source, block.n_source[n_i], explained), 1)
        return np.clip(position * spec.bins // denom, 0, spec.bins - 1)
    raise ValueError(f"unknown group key {name!r}")


def _block_stats(block: Block, spec: Spec) -> GroupStats:
    keys, values, labels = cell_values(block, spec)
    return GroupStats.of(keys, values, int(np.prod(spec.radix, dtype=np.int64)) if spec.by else 1, labels)


# ---------------------------------------------------------------- quantiles


@dataclass(frozen=True)
class Histograms:
    counts: np.ndarray  # [groups, bins] int64

    @staticmethod
    def merge(*parts: Histograms) -> Histograms:
        return Histograms(sum(p.counts for p in parts[1:]) + parts[0].counts)


def _block_histograms(block: Block, spec: Spec, keys: np.ndarray, low: np.ndarray, high: np.ndarray,
                      bins: int) -> Histograms:
    cell_keys, values, _ = cell_values(block, spec)
    at = np.searchsorted(keys, cell_keys)
    at = np.minimum(at, len(keys) - 1)
    hit = keys[at] == cell_keys
    g, v = at[hit], values[hit]
    width = high[g] - low[g]
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(width > 0, np.floor((v - low[g]) / np.where(width > 0, width, 1.0) * bins), 0)
    b = np.clip(b, 0, bins - 1).astype(np.int64)
    counts = np.bincount(g * bins + b, minlength=len(keys) * bins).reshape(len(keys), bins)
    return Histograms(counts)


def histogram_quantiles(counts: np.ndarray, low: float, high: float, qs: Sequence[float]) -> np.ndarray:
    """Quantiles (numpy's ``linear`` definition: ``x[j] + frac (x[j+1] - x[j])`` at rank ``q (n - 1)``) from a
    histogram of equal bins over ``[low, high]``. Each order statistic is placed inside its bin (spread evenly
    over it), so it is off by less than a bin width, and so is their interpolation."""
    n = int(counts.sum())
    if n == 0:
        return np.full(len(qs), np.nan)
    if high <= low:
        return np.full(len(qs), low)
    cum = np.cumsum(counts)
    width = (high - low) / len(counts)

    def order_statistic(j: int) -> float:
        b = int(np.searchsorted(cum, j, side="right"))
        before = cum[b - 1] if b > 0 else 0
        return low + (b + (j - before + 0.5) / counts[b]) * width

    out = []
    for q in qs:
        rank = q * (n - 1)
        j = int(math.floor(rank))
        value = order_statistic(j)
        if rank > j:
            value += (rank - j) * (order_statistic(min(j + 1, n - 1)) - value)
        out.append(min(max(value, low), high))
    return np.array(out)


# ---------------------------------------------------------------- the public function


def reduce_store(store: Store, by: str | Sequence[str] = ("position",), *, value: str = "normalized",
                 quantiles: Sequence[float] = (0.1, 0.5, 0.9), where: Sequence[Condition | str] = (),
                 select: Mapping[str, int] | None = None, bins: int = 10, hist_bins: int = 2048,
                 max_quantile_groups: int = 1000, block_bytes: int = BLOCK_BYTES, workers: int | None = None):
    """Means and quantiles of ``value`` grouped by ``by`` (see the module docstring) over every example that
    passes ``where``; ``select`` keeps one entry of extra dims (``{"layer": -1}``).

    Returns a pandas DataFrame: one row per group present, the key columns, then ``count``, ``mean``, ``std``
    (sample), ``min``, ``max``, ``q<percent>`` per quantile and ``resolution`` (the quantiles' error bound)."""
    import pandas as pd

    spec = make_spec(store, by, value, bins, select)
    if any(not 0 <= q <= 1 for q in quantiles):
        raise ValueError(f"quantiles must lie in [0, 1], got {list(quantiles)}")
    if hist_bins < 1 or max_quantile_groups < 0:
        raise ValueError("hist_bins must be >= 1 and max_quantile_groups >= 0")
    selected = selection(store, where)
    need_ids = "token" in spec.by
    blocks, _ = map_blocks(store, functools.partial(_block_stats, spec=spec), selected=selected, select=select,
                           ids=need_ids, tokens=need_ids, block_bytes=block_bytes, name="reduce-block")
    stats = reduce_waves(blocks.ravel(), GroupStats.merge, workers, name="reduce-combine")
    table = _decode(store, spec, stats, select)
    table["count"] = stats.count
    table["mean"] = stats.mean
    with np.errstate(invalid="ignore", divide="ignore"):
        table["std"] = np.where(stats.count > 1, np.sqrt(stats.m2 / np.maximum(stats.count - 1, 1)), np.nan)
    table["min"], table["max"] = stats.min, stats.max
    if quantiles and len(stats.keys):
        chosen = np.sort(np.argsort(-stats.count, kind="stable")[:max_quantile_groups])
        keys, low, high = stats.keys[chosen], stats.min[chosen], stats.max[chosen]
        fn = functools.partial(_block_histograms, spec=spec, keys=keys, low=low, high=high, bins=hist_bins)
        hist_blocks, _ = map_blocks(store, fn, selected=selected, select=select, ids=need_ids,
                                    block_bytes=block_bytes, name="quantile-block")
        hists = reduce_waves(hist_blocks.ravel(), Histograms.merge, workers, name="quantile-combine")
        values = np.full((len(stats.keys), len(quantiles)), np.nan)
        for row, g in enumerate(chosen):
            values[g] = histogram_quantiles(hists.counts[row], low[row], high[row], quantiles)
        for j, q in enumerate(quantiles):
            table[f"q{q * 100:g}"] = values[:, j]
        resolution = np.full(len(stats.keys), np.nan)
        resolution[chosen] = (high - low) / hist_bins
        table["resolution"] = resolution
    return pd.DataFrame(table)


def make_spec(store: Store, by: str | Sequence[str], value: str, bins: int,
              select: Mapping[str, int] | None = None) -> Spec:
    """A reduction's keys and value, validated against the store, with the radix of each key."""
    schema = store.schema
    by = check_reduction(store, by, value, bins, select)
    tokens = (schema.max_source if schema.source_attributions else 0) + schema.max_target
    radix = []
    for name in by:
        if name == "position":
            radix.append(bins)
        elif name == "distance":
            radix.append(tokens + 1)
        elif name == "side":
            radix.append(2)
        elif name == "token":
            radix.append(_vocabulary_bound(store))
        elif name == "step":
            radix.append(schema.max_steps)
        else:
            radix.append(schema.dim_sizes[schema.dims.index(name)])
    if int(np.prod(radix, dtype=np.float64)) >= 2**62:
        raise ValueError(f"too many groups for {list(by)}; group by fewer keys")
    return Spec(by=by, radix=tuple(radix), value=value, bins=bins)


def check_reduction(store: Store, by: str | Sequence[str], value: str, bins: int = 10,
                    select: Mapping[str, int] | None = None) -> tuple[str, ...]:
    """Validate group keys and value against the store (no data read); returns the keys as a tuple."""
    by = (by,) if isinstance(by, str) else tuple(by)
    dims = tuple(d for d in store.schema.dims if d not in (select or {}))
    known = (*CELL_KEYS, "step", *dims)
    for name in by:
        if name not in known:
            hint = f" (selected away by --select {name}=...)" if name in store.schema.dims else ""
            raise ValueError(f"cannot group by {name!r}{hint}; this store groups by {', '.join(known)}")
    if len(set(by)) != len(by):
        raise ValueError(f"group keys repeat: {list(by)}")
    if value not in CELL_VALUES + COLUMN_VALUES:
        raise ValueError(f"unknown value {value!r}; use one of {', '.join(CELL_VALUES + COLUMN_VALUES)}")
    if value in COLUMN_VALUES and any(k in CELL_KEYS for k in by):
        raise ValueError(f"{value} summarises whole columns: group it by step or {', '.join(dims) or 'extra dims'}, "
                         f"not by {', '.join(k for k in by if k in CELL_KEYS)}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return by


def _vocabulary_bound(store: Store) -> int:
    import dask.array as da

    g = store.group
    arrays = [da.from_zarr(g[f]).max() for f in ("source_ids", "target_ids") if f in g]
    return int(max(compute(*arrays))) + 1


def _decode(store: Store, spec: Spec, stats: GroupStats, select) -> dict:
    schema = store.schema
    rest = stats.keys.copy()
    parts = {}
    for name, radix in reversed(list(zip(spec.by, spec.radix, strict=True))):
        parts[name] = rest % radix
        rest //= radix
    table = {}
    for name in spec.by:
        k = parts[name]
        if name == "position":
            table[name] = k / spec.bins
        elif name == "side":
            table[name] = np.where(k == 0, "source", "prefix").astype(object)
        elif name == "token":
            table[name] = k
            table["token_text"] = np.array([stats.labels.get(int(i)) for i in k], dtype=object)
        elif name in schema.dims:
            axis = schema.dims.index(name)
            labels = schema.dim_labels[axis] if axis < len(schema.dim_labels) else ()
            table[name] = np.array([labels[i] for i in k], dtype=object) if labels else k
        else:
            table[name] = k
    return table
