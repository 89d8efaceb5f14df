r"""Discretized integrated gradients (Sanyal & Ren, EMNLP 2021): paths through real word embeddings.

Each token ``w`` (with baseline ``b``, UNK) gets a *monotonic* path of ``n`` points ``z^(0) = e(b), ..., z^(n-1) =
e(w)`` through the embedding space, built from anchor words: starting at ``w``, the next anchor is, among the
``n_neighbors`` nearest vocabulary embeddings of the current anchor (Euclidean; neither the baseline nor a word
already on the path), the one whose *monotonized* version is closest to it (``"greedy"``) or that has the most
monotonic dimensions (``"maxcount"``). Monotonizing an anchor ``a`` w.r.t. the previous point ``p`` sets every
dimension where ``a`` is not between ``e(b)`` and ``p`` to ``p - (p - e(b)) / n``. Special tokens keep a constant
path. The attribution is the Riemann sum along the path, without multiplying by the input (as in Inseq):

.. math::  A_j = \sum_{k=0}^{n-2} \frac{\partial f}{\partial z_j}(z^{(k)}) \odot \big(z_j^{(k+1)} - z_j^{(k)}\big)

then reduced over the hidden size on the device like every gradient method.

Paths depend only on ``(token, baseline)``, so they are built once per pair and reused for every step, example
and call (:class:`PathBuilder` keeps them); the gradients run on the shared-forward kernel
(:mod:`distattr.methods.gradient`) with the ``n`` path points as rows. Cost per example: ``n T/w`` forwards and
``n T`` batched backwards, plus path building once per distinct token. Inseq: ``n T`` forward+backward rows on
prefixes, and the path of every prefix token rebuilt at every step on the CPU (inseq#161), with the k-NN graph
from scikit-learn.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

KNN_BLOCK_ROWS = 1024  # vocabulary rows per block of the k-NN search: a [1024, V] float32 distance matrix
CACHED_BUILDERS = 4  # path builders kept between calls (the k-NN search over a 49k vocabulary takes ~30 s on a CPU)
_builders: dict[tuple, tuple[weakref.ref, PathBuilder]] = {}


@dataclass(frozen=True)
class DiscretizedIGArgs:
    """``n_steps`` path points per token (Inseq's default 50); ``strategy``: ``"greedy"`` or ``"maxcount"`` anchor
    choice; ``n_neighbors``: size of the k-NN neighbourhood searched for anchors (Inseq's default 50)."""

    n_steps: int = 50
    strategy: str = "greedy"
    n_neighbors: int = 50

    def __post_init__(self):
        if self.n_steps < 2:
            raise ValueError("n_steps must be at least 2 for discretized_integrated_gradients")
        if self.strategy not in ("greedy", "maxcount"):
            raise ValueError(f"Unknown strategy {self.strategy!r}; use 'greedy' or 'maxcount'")
        if self.n_neighbors < 1:
            raise ValueError("n_neighbors must be at least 1")


def cached_builder(weight: torch.Tensor, scale: float, special: set[int], args: DiscretizedIGArgs) -> PathBuilder:
    """The :class:`PathBuilder` of the embedding table ``weight * scale`` and these arguments, built once and kept
    for later calls (the ``CACHED_BUILDERS`` most recent). An entry is only reused for the very same tensor
    (a weak reference guards against a new table at a freed address) and version (no in-place change)."""
    key = (id(weight), weight._version, scale, frozenset(special), args)
    entry = _builders.get(key)
    if entry is None or entry[0]() is not weight:
        while len(_builders) >= CACHED_BUILDERS:
            _builders.pop(next(iter(_builders)))
        entry = _builders[key] = (weakref.ref(weight), PathBuilder.build(weight.detach() * scale, special, args))
    return entry[1]


def _monotonic_dims(anchor: torch.Tensor, baseline: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Dimensions where ``anchor`` lies between ``point`` and ``baseline`` (inclusive), ``[d]`` bool."""
    down = (baseline > point) & (baseline >= anchor) & (anchor >= point)
    up = (baseline < point) & (baseline <= anchor) & (anchor <= point)
    same = (baseline == point) & (baseline == anchor)
    return down | up | same


def _monotonize(anchor: torch.Tensor, baseline: torch.Tensor, point: torch.Tensor, n: int) -> torch.Tensor:
    keep = _monotonic_dims(anchor, baseline, point)
    return torch.where(keep, anchor, point - (point - baseline) / n)


@dataclass
class PathBuilder:
    """Monotonic paths over one embedding table ``[V, d]`` (already scaled as the model's inputs are).

    ``neighbors[v]`` are the ``n_neighbors`` nearest other vocabulary items of ``v``, nearest first; paths are
    cached per ``(token, baseline)``.
    """

    embeddings: torch.Tensor
    special: frozenset[int]
    n_steps: int
    strategy: str
    neighbors: torch.Tensor
    paths: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, embeddings: torch.Tensor, special: set[int], args: DiscretizedIGArgs) -> PathBuilder:
        table = embeddings.detach().float()
        k = min(args.n_neighbors, len(table) - 1)
        blocks = []
        for first in range(0, len(table), KNN_BLOCK_ROWS):  # [block, V] distances at a time, never [V, V]
            distances = torch.cdist(table[first : first + KNN_BLOCK_ROWS], table)
            rows = torch.arange(len(distances), device=table.device)
            distances[rows, rows + first] = float("inf")  # not its own neighbour
            blocks.append(distances.topk(k, largest=False).indices.cpu())  # sorted, nearest first
        return cls(table.cpu(), frozenset(special), args.n_steps, args.strategy, torch.cat(blocks))

    def path(self, token: int, baseline: int) -> torch.Tensor:
        """``[n_steps, d]``: the baseline's embedding first, the token's last."""
        key = (token, baseline)
        if key not in self.paths:
            self.paths[key] = self._build_path(token, baseline)
        return self.paths[key]

    def _build_path(self, token: int, baseline: int) -> torch.Tensor:
        n, emb = self.n_steps, self.embeddings
        if token in self.special:
            words = [token] * (n - 1)
        else:
            words = [token]
            for _ in range(n - 2):
                words.append(self._next_anchor(words[-1], baseline, words))
        points = [emb[words[0]]]
        for word in words[1:]:
            points.append(_monotonize(emb[word], emb[baseline], points[-1], n))
        points.append(emb[baseline])
        return torch.stack(points[::-1])

    def _next_anchor(self, word: int, baseline: int, path: list[int]) -> int:
        if word == baseline:
            return baseline
        emb, n = self.embeddings, self.n_steps
        candidates = [int(a) for a in self.neighbors[word] if int(a) not in path and int(a) != baseline]
        if not candidates:
            return baseline
        if self.strategy == "greedy":
            scores = [float(torch.dist(emb[a], _monotonize(emb[a], emb[baseline], emb[word], n))) for a in candidates]
        else:
            scores = [10000 - int(_monotonic_dims(emb[a], emb[baseline], emb[word]).sum()) for a in candidates]
        return candidates[min(range(len(candidates)), key=scores.__getitem__)]  # first of ties, as sorted() does

    def points(self, ids: torch.Tensor, baseline_ids: torch.Tensor) -> torch.Tensor:
        """``ids, baseline_ids [U, L]`` -> path points ``[U, n_steps, L, d]``."""
        rows = [torch.stack([self.path(int(t), int(b)) for t, b in zip(row, base, strict=True)], dim=1)
                for row, base in zip(ids.tolist(), baseline_ids.tolist(), strict=True)]
        return torch.stack(rows)
