"""How closely two layer x position-group maps agree: Spearman's rho per fact and of the averaged maps, with
bootstrap intervals over facts, overall and per relation.

The maps are ``[n_facts, n_groups, n_layers]`` arrays (:func:`distattr.casestudies.cat.fact_maps`), NaN where a fact
has no token in a group (no middle subject token). Two statistics per pair of methods:

* **per fact**: Spearman's rho between the two methods' maps of one fact over its ``groups x layers`` cells (the cells
  finite in both), then the mean over the facts whose rho is defined (a map constant over its cells has none: such
  facts are counted, not averaged);
* **averaged map**: Spearman's rho between the two maps averaged over facts (each group over the facts that have it,
  :func:`distattr.casestudies.cat.average_map`), the comparison ROME's and Inseq's figures invite.

Spearman's rho is Pearson's correlation of the ranks, ties given their average rank (what ``scipy.stats.spearmanr``
computes). Intervals: percentile bootstrap over facts: ``resamples`` draws of ``n_facts`` facts with replacement
from ``numpy.random.default_rng(seed)``; each draw's per-fact mean and averaged-map rho; the interval is the
``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the draws where the statistic is defined. The same draws
serve every statistic of a call, so a given seed gives the same intervals every time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks ``1 .. n`` of a 1-D array, ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    first = np.r_[True, sorted_x[1:] != sorted_x[:-1]]  # start of each run of equal values
    run = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    average = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    out = np.empty(len(x), dtype=np.float64)
    out[order] = average[run]
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho of two same-shape arrays over the cells finite in both; NaN with fewer than 3 such cells or
    when either side is constant there."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"maps of different sizes: {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    rx, ry = ranks(x[ok]), ranks(y[ok])
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    if denominator == 0:
        return float("nan")
    return float(np.clip((rx * ry).sum() / denominator, -1.0, 1.0))


def per_fact_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[n_facts]``: Spearman's rho of each fact's two maps (``a``, ``b``: ``[n_facts, n_groups, n_layers]``)."""
    if a.shape != b.shape:
        raise ValueError(f"maps of different shapes: {a.shape} and {b.shape}")
    return np.array([spearman(x, y) for x, y in zip(a, b, strict=True)], dtype=np.float64)


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Each fact's map divided by its largest ``|value|`` over its finite cells (all ``groups x layers``), so every
    fact weighs the same in an average; a map that is 0 everywhere stays 0."""
    maps = np.asarray(maps, dtype=np.float64)
    if not maps.size:
        return maps
    magnitude = np.abs(maps.reshape(len(maps), -1))
    peak = np.where(np.isfinite(magnitude), magnitude, 0.0).max(axis=1)
    peak[peak == 0] = 1.0
    return maps / peak.reshape(-1, *[1] * (maps.ndim - 1))


def mean_map(maps: np.ndarray) -> np.ndarray:
    """``[n_groups, n_layers]``: the mean over facts of each group, skipping facts without it (NaN if none has it)."""
    maps = np.asarray(maps, dtype=np.float64)
    counts = np.isfinite(maps).sum(axis=0)
    return np.where(counts > 0, np.nansum(maps, axis=0) / np.maximum(counts, 1), np.nan)


@dataclass(frozen=True)
class Interval:
    """A statistic and its bootstrap interval (``low``, ``high``; NaN when no draw defines it)."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Agreement:
    """Agreement of two methods over a set of facts.

    Attributes:
        n_facts: facts compared.
        n_defined: facts whose per-fact rho is defined (both maps non-constant over at least 3 shared cells).
        per_fact_mean: mean per-fact rho (over the ``n_defined`` facts) and its interval.
        averaged_map: rho of the two averaged maps and its interval.
        n_cells: cells of the averaged maps compared (finite in both).
    """

    n_facts: int
    n_defined: int
    per_fact_mean: Interval
    averaged_map: Interval
    n_cells: int

    def as_dict(self) -> dict:
        return _jsonable(asdict(self))


def bootstrap_draws(n_facts: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[resamples, n_facts]`` fact indices drawn with replacement (``numpy.random.default_rng(seed)``)."""
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    return np.random.default_rng(seed).integers(0, n_facts, size=(resamples, n_facts))


def _interval(value: float, draws: np.ndarray, level: float) -> Interval:
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return Interval(float(value), float("nan"), float("nan"))
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(value), float(low), float(high))


def agreement(a: np.ndarray, b: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL,
              draws: np.ndarray | None = None) -> Agreement:
    """Per-fact and averaged-map Spearman agreement of two ``[n_facts, n_groups, n_layers]`` maps (module docstring).

    ``draws`` (:func:`bootstrap_draws`) overrides ``resamples`` and ``seed``: pass the same draws to compare several
    pairs on the same resamples. Normalise the maps first (:func:`normalize_maps`) for normalised averages; the
    per-fact rho does not change (a positive scale keeps the ranks).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3 or not len(a):
        raise ValueError(f"expected two [n_facts, n_groups, n_layers] maps of the same shape, not {a.shape} and "
                         f"{b.shape}")
    if not 0 < level < 1:
        raise ValueError("level must be between 0 and 1")
    if draws is None:
        draws = bootstrap_draws(len(a), resamples, seed)
    elif draws.ndim != 2 or draws.shape[1] != len(a):
        raise ValueError(f"draws must be [resamples, {len(a)}] fact indices, not {draws.shape}")
    rho = per_fact_spearman(a, b)
    defined = np.isfinite(rho)
    mean_a, mean_b = mean_map(a), mean_map(b)
    fact_means = np.array([rho[d][defined[d]].mean() if defined[d].any() else np.nan for d in draws])
    map_rhos = np.array([spearman(mean_map(a[d]), mean_map(b[d])) for d in draws])
    point = float(rho[defined].mean()) if defined.any() else float("nan")
    return Agreement(n_facts=len(a), n_defined=int(defined.sum()), per_fact_mean=_interval(point, fact_means, level),
                     averaged_map=_interval(spearman(mean_a, mean_b), map_rhos, level),
                     n_cells=int((np.isfinite(mean_a) & np.isfinite(mean_b)).sum()))


def by_relation(a: np.ndarray, b: np.ndarray, relations: Sequence[str], *, resamples: int = RESAMPLES,
                seed: int = 0, level: float = LEVEL) -> dict[str, Agreement]:
    """:func:`agreement` of each relation's facts (sorted by relation id), each with its own draws from ``seed``."""
    relations = np.asarray([str(r) for r in relations])
    if len(relations) != len(a):
        raise ValueError(f"{len(relations)} relations for {len(a)} facts")
    return {r: agreement(a[relations == r], b[relations == r], resamples=resamples, seed=seed, level=level)
            for r in sorted(set(relations.tolist()))}


def _jsonable(value):
    """NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


__all__ = ["Agreement", "Interval", "agreement", "bootstrap_draws", "by_relation", "mean_map", "normalize_maps",
           "per_fact_spearman", "ranks", "spearman"]
