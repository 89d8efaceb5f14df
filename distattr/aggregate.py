"""Aggregation of results: subwords to words, spans, slices, reductions over extra dims, normalisation,
pair differences.

A pipeline is an explicit, ordered sequence of *stages*. A stage is any callable
``SequenceAttribution -> SequenceAttribution``; the built-in ones are small frozen dataclasses:

* :class:`Words` merges subword tokens into words (from the tokenizer, or from the ``Ġ``/``▁`` markers of
  the token strings when there is no tokenizer);
* :class:`Spans` merges explicit token spans;
* :class:`Slice` keeps a part of the tokens, of the explained steps, or of an extra dim;
* :class:`Reduce` reduces an extra dim (``"layer"``, ``"head"``...) with an aggregation function;
* :class:`Normalize` / :class:`Rescale` are Inseq's display normalisations.

:func:`apply` runs stages in the order given (the order matters: merging then normalising is not normalising
then merging); :func:`pair_difference` subtracts two results. Nothing is mutated: every stage returns a new
result. Results read back with :func:`distattr.load` hold the token ids, so they aggregate the same way.

Conventions (shapes: attributions are ``[n_tokens, n_steps, *dims]``, step scores ``[n_steps]``):

* **Merging tokens merges both axes.** A group of target tokens that are also explained (columns) becomes
  one column; the columns are combined first, then the rows (Inseq's order). Rows and columns use the
  stage's ``fn`` (default ``absmax``, Inseq's default for subwords and spans; ``column_fn`` overrides it for
  columns). Single tokens pass through untouched; the function only runs on groups of two or more.
* **NaN (future tokens) is ignored** by every aggregation function; a group that is all NaN stays NaN. So
  the row of a merged generated word in its own column holds what its earlier pieces contributed to its
  later ones, as in Inseq.
* **Step scores** merge with the rule of their step function (:data:`distattr.steps.STEP_FUNCTIONS`,
  ``merge=``): probability, contrast_prob, perplexity, mc_dropout_prob_avg -> product; crossentropy, pcxmi,
  in_context_pvi, entropy, kl_divergence, logit, contrast_logits(_diff), contrast_prob_diff, top_p_size ->
  sum. A stage's ``step_merge={name: fn}`` overrides a rule (e.g. ``{"probability": "sum"}`` for scores
  computed with ``logprob=True``); a step score without a rule is an error. IG convergence ``deltas`` merge
  with ``absmax`` (the largest error of the merged steps).
* **A merged token** is the concatenation of its pieces' strings, with id ``-1`` (as in Inseq).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # distattr.results imports this module (out.aggregate): types only, no import at run time
    from .results import AttributionOutput, SequenceAttribution

Reducer = Callable[[np.ndarray, int], np.ndarray]
"""``fn(x, axis) -> x reduced over axis``, NaN-ignoring."""

Span = tuple[int, int]
"""Half-open token range ``(start, end)``, as in Python slicing."""

Stage = Callable[["SequenceAttribution"], "SequenceAttribution"]


# --- aggregation functions ------------------------------------------------------------------------------------


def _quiet(fn: Callable[..., np.ndarray], x: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: the result is NaN, which is right
        return fn(x, axis=axis)


def _keep_all_nan(out: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    return np.where(np.isnan(x).all(axis=axis), np.nan, out).astype(x.dtype)


def _sum(x: np.ndarray, axis: int) -> np.ndarray:
    return _keep_all_nan(np.nansum(x, axis=axis), x, axis)


def _prod(x: np.ndarray, axis: int) -> np.ndarray:
    return _keep_all_nan(np.nanprod(x, axis=axis), x, axis)


def _mean(x: np.ndarray, axis: int) -> np.ndarray:
    return _quiet(np.nanmean, x, axis).astype(x.dtype)


def _max(x: np.ndarray, axis: int) -> np.ndarray:
    return _quiet(np.nanmax, x, axis)


def _min(x: np.ndarray, axis: int) -> np.ndarray:
    return _quiet(np.nanmin, x, axis)


def _absmax(x: np.ndarray, axis: int) -> np.ndarray:
    """The element of largest magnitude, sign kept (``[0.3, -0.7, 0.1] -> -0.7``); first one on ties."""
    magnitude = np.where(np.isnan(x), -1.0, np.abs(x))
    index = np.expand_dims(magnitude.argmax(axis=axis), axis)
    return np.take_along_axis(x, index, axis=axis).squeeze(axis)


def _vnorm(x: np.ndarray, axis: int) -> np.ndarray:
    """L2 norm (Inseq's ``vnorm`` with its default ``vnorm_ord=2``)."""
    return _keep_all_nan(np.sqrt(np.nansum(np.square(x), axis=axis)), x, axis)


AGGREGATION_FUNCTIONS: dict[str, Reducer] = {
    "sum": _sum, "mean": _mean, "max": _max, "min": _min, "prod": _prod, "absmax": _absmax, "vnorm": _vnorm,
}
"""Aggregation functions by name. Add your own: ``AGGREGATION_FUNCTIONS["median"] = lambda x, axis: ...``."""

DELTAS_MERGE = "absmax"


def list_aggregation_functions() -> list[str]:
    return sorted(AGGREGATION_FUNCTIONS)


def get_aggregation_function(fn: str | Reducer) -> Reducer:
    """The reducer named ``fn`` (a callable is returned as is)."""
    if callable(fn):
        return fn
    try:
        return AGGREGATION_FUNCTIONS[fn]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown aggregation function {fn!r}. Available: {', '.join(list_aggregation_functions())}"
        ) from None


def _check_fn(fn: str | Reducer | None) -> None:
    if fn is not None:
        get_aggregation_function(fn)


def step_merge_rule(name: str, overrides: Mapping[str, str | Reducer] | None = None) -> Reducer:
    """How step score ``name`` combines when steps merge: ``overrides``, else its step function's ``merge``."""
    from .steps import STEP_FUNCTIONS

    if overrides and name in overrides:
        return get_aggregation_function(overrides[name])
    if name in STEP_FUNCTIONS:
        return get_aggregation_function(STEP_FUNCTIONS[name].merge)
    raise ValueError(
        f"No merge rule for step score {name!r}: pass step_merge={{{name!r}: 'sum'}} (or another aggregation "
        f"function) to the stage, or register its step function with merge=..."
    )


# --- word boundaries ------------------------------------------------------------------------------------------

_BYTE_LEVEL_SPACE = {"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "č": "\r", "ċ": "\x0b", "Č": "\x0c"}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPECIAL = re.compile(r"^(<\|[^|]*\|>|<[^<>\s]+>|\[[A-Z_]+\])$")


def _surface_from_markers(token: str, sentencepiece: bool) -> str:
    """What a token string reads as, as far as whitespace goes (other bytes become ``x``)."""
    if sentencepiece:
        text = _BYTE_FALLBACK.sub(lambda m: chr(int(m.group(1), 16)) if chr(int(m.group(1), 16)).isspace() else "x",
                                  token)
        return text.replace("▁", " ")
    return "".join(_BYTE_LEVEL_SPACE.get(ch, ch) for ch in token)


def _surfaces_from_tokenizer(tokenizer, ids: Sequence[int], window: int = 8) -> tuple[list[str], list[bool]]:
    """Each token's decoded text and whether it is a special token. A token's text is what decoding adds when
    it is appended to the (up to ``window``) tokens before it, so decoders that strip a leading space or fuse
    bytes are handled."""
    if any(i < 0 for i in ids):
        raise ValueError("Tokens with id -1 were already merged; derive words before other merges, or pass no "
                         "tokenizer to use the token strings")
    special = set(getattr(tokenizer, "all_special_ids", ()))
    texts, is_special = [], []
    for i, tid in enumerate(ids):
        is_special.append(tid in special)
        j = max(0, i - window)
        prev = tokenizer.decode(list(ids[j:i]), clean_up_tokenization_spaces=False) if i > j else ""
        cur = tokenizer.decode(list(ids[j : i + 1]), clean_up_tokenization_spaces=False)
        k = 0
        while k < min(len(prev), len(cur)) and prev[k] == cur[k]:
            k += 1
        # where ``prev`` ended in a partial character (U+FFFD), ``cur[k:]`` is the completed one: no new word
        texts.append(cur[k:])
    return texts, is_special


def _spans_from_surfaces(texts: Sequence[str], is_special: Sequence[bool]) -> list[Span]:
    """Words are whitespace-delimited. Token ``i`` starts a word when it is special, follows a special token,
    or whitespace comes before its first visible character; whitespace-only tokens join the next word (they
    play the part of a lone ``Ġ``/``▁``)."""
    starts: list[int] = []
    after_space = True  # whitespace (or the sequence start) since the last visible character
    pending: int | None = None  # first whitespace-only token waiting for its word
    for i, (text, special) in enumerate(zip(texts, is_special, strict=True)):
        if special:
            starts.extend(x for x in (pending, i) if x is not None)
            pending, after_space = None, True
            continue
        visible = text.strip()
        if not visible:
            if text and pending is None:
                pending = i
            after_space = after_space or bool(text)
            continue
        if pending is not None:
            starts.append(pending)
        elif after_space or text[:1].isspace():
            starts.append(i)
        pending, after_space = None, text[-1:].isspace()
    if pending is not None:
        starts.append(pending)
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    bounds = [*starts, len(texts)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def word_spans(tokens: Sequence[str], ids: Sequence[int] | None = None, tokenizer=None) -> list[Span]:
    """The words of a token sequence as a partition into half-open spans ``[(start, end), ...]``.

    With a ``tokenizer`` (the one that produced ``ids``), each token's text is decoded from its id; without
    one, the token strings' word-start markers are read: SentencePiece ``▁`` (and ``<0x0A>``-style byte
    tokens) when any token holds a ``▁``, else byte-level BPE ``Ġ``/``Ċ``/``ĉ``. Special tokens (the
    tokenizer's, or strings like ``<s>``, ``<|endoftext|>``, ``[CLS]``) are words of their own.
    """
    tokens = list(tokens)
    if not tokens:
        return []
    if tokenizer is not None:
        if ids is None:
            raise ValueError("word_spans with a tokenizer needs the token ids")
        ids = [int(i) for i in ids]
        if len(ids) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(ids)} ids")
        if -1 not in ids:
            expected = list(tokenizer.convert_ids_to_tokens(ids))
            if expected != tokens:
                bad = next(i for i, (a, b) in enumerate(zip(expected, tokens, strict=True)) if a != b)
                raise ValueError(
                    f"The tokenizer does not match the result: token {bad} is {tokens[bad]!r} but the tokenizer "
                    f"reads id {ids[bad]} as {expected[bad]!r}"
                )
        texts, is_special = _surfaces_from_tokenizer(tokenizer, ids)
        return _spans_from_surfaces(texts, is_special)
    is_special = [bool(_SPECIAL.match(t)) and not _BYTE_FALLBACK.fullmatch(t) for t in tokens]
    sentencepiece = any("▁" in t for t in tokens)
    texts = [_surface_from_markers(t, sentencepiece) for t in tokens]
    return _spans_from_surfaces(texts, is_special)


def _check_markers(seq: SequenceAttribution) -> None:
    """Refuse the marker fallback where it cannot see words: several plain tokens and no marker at all."""
    every = (*seq.source_tokens, *seq.target_tokens)
    if any(m in t for t in every for m in ("▁", *_BYTE_LEVEL_SPACE)):
        return
    for tokens in (seq.source_tokens, seq.target_tokens):
        plain = [not _SPECIAL.match(t) for t in tokens]
        if any(a and b for a, b in zip(plain, plain[1:], strict=False)):
            raise ValueError(
                "The token strings carry no word-start markers (BPE 'Ġ' or SentencePiece '▁'), so words cannot be "
                "told apart from them: pass the tokenizer, Words(tokenizer), or give explicit Spans"
            )


# --- merging --------------------------------------------------------------------------------------------------


def _is_decoder_only(seq: SequenceAttribution) -> bool:
    """The prompt is the target's prefix and has no attributions of its own (as in Inseq)."""
    n = len(seq.source_tokens)
    return seq.source_attributions is None and tuple(seq.target_tokens[:n]) == tuple(seq.source_tokens)


def _as_spans(spans, side: str) -> list[Span]:
    if spans is None:
        return []
    spans = list(spans)
    if len(spans) == 2 and all(isinstance(x, int | np.integer) for x in spans):
        spans = [tuple(spans)]  # one span given as (start, end)
    out = []
    for span in spans:
        if not (isinstance(span, Sequence) and len(span) == 2 and all(isinstance(x, int | np.integer) for x in span)):
            raise ValueError(f"{side} spans must be (start, end) pairs of ints, got {span!r}")
        out.append((int(span[0]), int(span[1])))
    return out


def _partition(spans: Sequence[Span], n: int, side: str) -> list[Span]:
    """Check ``spans`` against ``n`` tokens and complete them with single-token groups into a partition."""
    groups, end = [], 0
    for start, stop in sorted(spans):
        if stop <= start:
            raise ValueError(f"{side} span {(start, stop)} is empty (spans are half-open: (start, end))")
        if start < 0 or stop > n:
            raise ValueError(f"{side} span {(start, stop)} is out of range for {n} {side} tokens")
        if start < end:
            raise ValueError(f"{side} spans overlap: {groups[-1]} and {(start, stop)}")
        groups.extend((i, i + 1) for i in range(end, start))
        groups.append((start, stop))
        end = stop
    groups.extend((i, i + 1) for i in range(end, n))
    return groups


def _group(x: np.ndarray | None, groups: Sequence[Span], axis: int, fn: Reducer) -> np.ndarray | None:
    """Combine ``x`` along ``axis`` over each group (single-token groups are copied as they are)."""
    if x is None or all(b - a == 1 for a, b in groups):
        return x
    parts = []
    for a, b in groups:
        piece = np.take(x, range(a, b), axis=axis)
        parts.append(piece if b - a == 1 else np.expand_dims(fn(piece, axis), axis))
    return np.concatenate(parts, axis=axis).astype(x.dtype)


def _merge_tokens(tokens: Sequence[str], ids: Sequence[int], groups: Sequence[Span]):
    new_tokens = tuple("".join(tokens[a:b]) for a, b in groups)
    new_ids = tuple(int(ids[a]) if b - a == 1 else -1 for a, b in groups)
    return new_tokens, new_ids


def merge_spans(
    seq: SequenceAttribution,
    source_spans: Sequence[Span] = (),
    target_spans: Sequence[Span] = (),
    fn: str | Reducer = "absmax",
    column_fn: str | Reducer | None = None,
    step_merge: Mapping[str, str | Reducer] | None = None,
) -> SequenceAttribution:
    """Merge each span of tokens into one token, on every axis where the tokens appear.

    ``source_spans`` index ``seq.source_tokens`` (rows of ``source_attributions``); ``target_spans`` index
    ``seq.target_tokens``: rows of ``target_attributions`` and, where the tokens are explained, the columns of
    both matrices, the step scores and the deltas. For decoder-only results the prompt is the target's prefix,
    so ``source_spans`` must be empty and the prompt tokens are regrouped like the target's.

    Returns a result with ``[n_source_groups, n_step_groups, *dims]`` and ``[n_target_groups, n_step_groups,
    *dims]`` matrices and ``[n_step_groups]`` step scores.
    """
    row_fn = get_aggregation_function(fn)
    col_fn = row_fn if column_fn is None else get_aggregation_function(column_fn)
    decoder_only = _is_decoder_only(seq)
    n_src, n_tgt = len(seq.source_tokens), len(seq.target_tokens)
    if decoder_only and source_spans:
        raise ValueError(
            "This is a decoder-only result: the prompt is part of the target (source_attributions is None). "
            "Give spans over target_tokens instead of source spans"
        )
    for name, matrix, n in (("source", seq.source_attributions, n_src), ("target", seq.target_attributions, n_tgt)):
        if matrix is not None and matrix.shape[0] != n:
            raise ValueError(f"{name}_attributions has {matrix.shape[0]} rows for {n} {name} tokens")
    tgt_groups = _partition(target_spans, n_tgt, "target")
    if decoder_only:
        src_groups = [(a, min(b, n_src)) for a, b in tgt_groups if a < n_src]
    else:
        src_groups = _partition(source_spans, n_src, "source")

    start, end = seq.attr_pos_start, seq.attr_pos_end
    col_groups = [(max(a, start) - start, min(b, end) - start) for a, b in tgt_groups if a < end and b > start]
    new_start = sum(1 for _, b in tgt_groups if b <= start)
    merges_steps = any(b - a > 1 for a, b in col_groups)
    step_scores = {
        name: _group(values, col_groups, 0, step_merge_rule(name, step_merge)) if merges_steps else values
        for name, values in seq.step_scores.items()
    }

    def both_axes(x: np.ndarray | None, row_groups: Sequence[Span]) -> np.ndarray | None:
        return _group(_group(x, col_groups, 1, col_fn), row_groups, 0, row_fn)

    source_tokens, source_ids = _merge_tokens(seq.source_tokens, seq.source_ids, src_groups)
    target_tokens, target_ids = _merge_tokens(seq.target_tokens, seq.target_ids, tgt_groups)
    return dataclasses.replace(
        seq,
        source_tokens=source_tokens, source_ids=source_ids, target_tokens=target_tokens, target_ids=target_ids,
        source_attributions=both_axes(seq.source_attributions, src_groups),
        target_attributions=both_axes(seq.target_attributions, tgt_groups),
        step_scores=step_scores,
        deltas=_group(seq.deltas, col_groups, 0, get_aggregation_function(DELTAS_MERGE)),
        attr_pos_start=new_start, attr_pos_end=new_start + len(col_groups),
    )


# --- stages ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Words:
    """Merge subword tokens into whitespace-delimited words (see :func:`word_spans`).

    Attributes:
        tokenizer: the tokenizer of the result (its ids are decoded); None reads the ``Ġ``/``▁`` markers of
            the token strings.
        fn: how rows (and, unless ``column_fn``, columns) of a word combine; default ``absmax`` (Inseq).
        column_fn: how the columns of a generated word combine, if not with ``fn``.
        step_merge: per step score overrides of the merge rule.
        source: merge source tokens (encoder-decoder results).
        target: merge target tokens (and explained steps).
    """

    tokenizer: Any = field(default=None, repr=False, compare=False)
    fn: str | Reducer = "absmax"
    column_fn: str | Reducer | None = None
    step_merge: Mapping[str, str | Reducer] = field(default_factory=dict)
    source: bool = True
    target: bool = True

    def __post_init__(self):
        _check_fn(self.fn)
        _check_fn(self.column_fn)

    def spans(self, seq: SequenceAttribution) -> tuple[list[Span], list[Span]]:
        """The multi-token source and target words of ``seq``, as ``(source_spans, target_spans)``."""
        if self.tokenizer is None:
            _check_markers(seq)
        decoder_only = _is_decoder_only(seq)
        src = word_spans(seq.source_tokens, seq.source_ids, self.tokenizer) if self.source and not decoder_only \
            else []
        tgt = word_spans(seq.target_tokens, seq.target_ids, self.tokenizer) if self.target or decoder_only else []
        return [s for s in src if s[1] - s[0] > 1], [s for s in tgt if s[1] - s[0] > 1]

    def __call__(self, seq: SequenceAttribution) -> SequenceAttribution:
        source_spans, target_spans = self.spans(seq)
        return merge_spans(seq, source_spans, target_spans, self.fn, self.column_fn, self.step_merge)


@dataclass(frozen=True)
class Spans:
    """Merge explicit half-open token spans: ``Spans(source=[(0, 3)], target=[(5, 7)])``.

    Spans index ``source_tokens`` / ``target_tokens``; they must be non-empty, in range and non-overlapping.
    A single span may be given as ``(start, end)``. For decoder-only results give target spans only (the
    prompt is the target's prefix). ``fn``, ``column_fn`` and ``step_merge`` as in :class:`Words`.
    """

    source: Sequence[Span] | Span = ()
    target: Sequence[Span] | Span = ()
    fn: str | Reducer = "absmax"
    column_fn: str | Reducer | None = None
    step_merge: Mapping[str, str | Reducer] = field(default_factory=dict)

    def __post_init__(self):
        _check_fn(self.fn)
        _check_fn(self.column_fn)
        _as_spans(self.source, "source")
        _as_spans(self.target, "target")

    def __call__(self, seq: SequenceAttribution) -> SequenceAttribution:
        return merge_spans(seq, _as_spans(self.source, "source"), _as_spans(self.target, "target"), self.fn,
                           self.column_fn, self.step_merge)


def _index_range(index: slice | Span, n: int, what: str) -> range:
    """A contiguous, non-empty range of ``n`` positions from a slice or an ``(start, end)`` pair."""
    if isinstance(index, slice):
        if index.step not in (None, 1):
            raise ValueError(f"{what}: slices must be contiguous (step 1), got {index}")
        start = 0 if index.start is None else index.start
        stop = n if index.stop is None else index.stop
    else:
        start, stop = _as_spans([index], what)[0]
    start, stop = (start + n if start < 0 else start), (stop + n if stop < 0 else stop)
    if not 0 <= start < stop <= n:
        raise ValueError(f"{what} {index!r} is empty or out of range for {n} positions")
    return range(start, stop)


@dataclass(frozen=True)
class Slice:
    """Keep part of a result: ``Slice(source=slice(2, 5))`` keeps source tokens 2-4.

    Attributes:
        source: source tokens to keep (rows of ``source_attributions``).
        target: target tokens to keep as context rows; the explained tokens (columns) are always kept, as in
            Inseq, so for decoder-only results this selects the part of the prompt of interest (the prompt
            tokens are sliced alike).
        steps: explained steps (columns, counted from the first explained token) to keep, with their step
            scores and deltas.
        dims: ``{dim name: index}``: an int keeps one entry and drops the dim, a slice or a list of ints keeps
            those entries, e.g. ``{"layer": -1}`` or ``{"head": [0, 3]}``.

    Indices are slices or ``(start, end)`` pairs; negative values count from the end; ranges out of bounds are
    an error.
    """

    source: slice | Span | None = None
    target: slice | Span | None = None
    steps: slice | Span | None = None
    dims: Mapping[str, int | slice | Sequence[int]] = field(default_factory=dict)

    def __call__(self, seq: SequenceAttribution) -> SequenceAttribution:
        for name, index in self.dims.items():
            seq = _take_dim(seq, name, index)
        if self.steps is not None:
            seq = _slice_steps(seq, _index_range(self.steps, seq.attr_pos_end - seq.attr_pos_start, "steps"))
        if self.source is not None:
            if _is_decoder_only(seq):
                raise ValueError("This is a decoder-only result: the prompt is part of the target; slice target=...")
            keep = list(_index_range(self.source, len(seq.source_tokens), "source"))
            seq = dataclasses.replace(
                seq, source_tokens=tuple(seq.source_tokens[i] for i in keep),
                source_ids=tuple(seq.source_ids[i] for i in keep),
                source_attributions=None if seq.source_attributions is None else seq.source_attributions[keep])
        if self.target is not None:
            seq = _slice_target(seq, _index_range(self.target, len(seq.target_tokens), "target"))
        return seq


def _slice_target(seq: SequenceAttribution, rows: range) -> SequenceAttribution:
    explained = range(seq.attr_pos_start, seq.attr_pos_end)
    keep = sorted(set(rows) | set(explained))
    n_src = len(seq.source_tokens)
    src_keep = [i for i in keep if i < n_src] if _is_decoder_only(seq) else list(range(n_src))
    return dataclasses.replace(
        seq,
        target_tokens=tuple(seq.target_tokens[i] for i in keep), target_ids=tuple(seq.target_ids[i] for i in keep),
        source_tokens=tuple(seq.source_tokens[i] for i in src_keep),
        source_ids=tuple(seq.source_ids[i] for i in src_keep),
        target_attributions=None if seq.target_attributions is None else seq.target_attributions[keep],
        attr_pos_start=sum(1 for i in keep if i < seq.attr_pos_start),
        attr_pos_end=sum(1 for i in keep if i < seq.attr_pos_end),
    )


def _slice_steps(seq: SequenceAttribution, cols: range) -> SequenceAttribution:
    c = slice(cols.start, cols.stop)

    def cut(x):
        return None if x is None else x[:, c]

    return dataclasses.replace(
        seq, source_attributions=cut(seq.source_attributions), target_attributions=cut(seq.target_attributions),
        step_scores={k: v[c] for k, v in seq.step_scores.items()},
        deltas=None if seq.deltas is None else seq.deltas[c],
        attr_pos_start=seq.attr_pos_start + cols.start, attr_pos_end=seq.attr_pos_start + cols.stop,
    )


def _dim_axis(seq: SequenceAttribution, dim: str) -> int:
    if dim not in seq.dims:
        present = f"its dims are {seq.dims}" if seq.dims else "it has no extra dims (already token-level)"
        raise ValueError(f"Dim {dim!r} is not in this result: {present}")
    return seq.dims.index(dim)


def _labels(seq: SequenceAttribution) -> list[tuple[str, ...]]:
    return list(seq.dim_labels) if len(seq.dim_labels) == len(seq.dims) else [()] * len(seq.dims)


def _take_dim(seq: SequenceAttribution, dim: str, index: int | slice | Sequence[int]) -> SequenceAttribution:
    k = _dim_axis(seq, dim)
    matrix = seq.source_attributions if seq.source_attributions is not None else seq.target_attributions
    size = matrix.shape[2 + k] if matrix is not None else 0
    labels = _labels(seq)
    try:
        picked = np.arange(size)[index]
    except (IndexError, TypeError):
        raise ValueError(f"Index {index!r} is out of range for dim {dim!r} of size {size}") from None
    if np.ndim(picked) == 1 and len(picked) == 0:
        raise ValueError(f"Index {index!r} selects nothing from dim {dim!r} of size {size}")

    def take(x):
        return None if x is None else np.take(x, picked, axis=2 + k)

    if np.ndim(picked) == 0:
        dims, labels = seq.dims[:k] + seq.dims[k + 1 :], labels[:k] + labels[k + 1 :]
    else:
        dims = seq.dims
        labels[k] = tuple(labels[k][i] for i in picked) if labels[k] else ()
    return dataclasses.replace(seq, source_attributions=take(seq.source_attributions),
                               target_attributions=take(seq.target_attributions), dims=dims,
                               dim_labels=tuple(labels) if any(labels) else ())


@dataclass(frozen=True)
class Reduce:
    """Reduce an extra dim with an aggregation function: ``Reduce("vnorm", dim="layer")``.

    ``[n_tokens, n_steps, *dims] -> [n_tokens, n_steps, *dims without dim]``, for source and target.
    """

    fn: str | Reducer
    dim: str

    def __post_init__(self):
        _check_fn(self.fn)

    def __call__(self, seq: SequenceAttribution) -> SequenceAttribution:
        k = _dim_axis(seq, self.dim)
        fn = get_aggregation_function(self.fn)

        def reduce(x):
            return None if x is None else np.asarray(fn(x, 2 + k), dtype=x.dtype)

        labels = _labels(seq)
        labels = labels[:k] + labels[k + 1 :]
        return dataclasses.replace(seq, source_attributions=reduce(seq.source_attributions),
                                   target_attributions=reduce(seq.target_attributions),
                                   dims=seq.dims[:k] + seq.dims[k + 1 :],
                                   dim_labels=tuple(labels) if any(labels) else ())


@dataclass(frozen=True)
class Normalize:
    """Inseq's ``normalize``: each column (and each entry of the extra dims) divided by its L1 norm over source
    and target tokens together."""

    def __call__(self, seq: SequenceAttribution) -> SequenceAttribution:
        src, tgt = normalize_columns(seq.source_attributions, seq.target_attributions)
        return dataclasses.replace(seq, source_attributions=src, target_attributions=tgt)


@dataclass(frozen=True)
class Rescale:
    """Inseq's ``rescale``: divide by the largest |value| over source and target."""

    def __call__(self, seq: SequenceAttribution) -> SequenceAttribution:
        src, tgt = rescale_global(seq.source_attributions, seq.target_attributions)
        return dataclasses.replace(seq, source_attributions=src, target_attributions=tgt)


# --- score normalisation (the views and SequenceAttribution.display use these) -------------------------------


def normalize_columns(src: np.ndarray | None, tgt: np.ndarray | None):
    """Divide each column by the sum of |values| over source and target tokens together (NaN kept).

    Same as Inseq's ``normalize``: ``F.normalize(p=1, dim=0)`` on the token-concatenated matrix."""
    parts = [p for p in (src, tgt) if p is not None]
    if not parts:
        return src, tgt
    both = np.concatenate(parts, axis=0).astype(np.float32)
    nan = np.isnan(both)
    filled = np.where(nan, 0.0, both)
    norm = np.maximum(np.abs(filled).sum(axis=0, keepdims=True), 1e-12)
    out = np.where(nan, np.nan, filled / norm).astype(np.float32)
    n_src = 0 if src is None else len(src)
    return (out[:n_src] if src is not None else None), (out[n_src:] if tgt is not None else None)


def rescale_global(src: np.ndarray | None, tgt: np.ndarray | None):
    """Divide by the largest |value| over both matrices."""
    parts = [np.abs(p[~np.isnan(p)]) for p in (src, tgt) if p is not None and (~np.isnan(p)).any()]
    peak = max((float(p.max()) for p in parts), default=0.0) or 1.0
    return (None if src is None else src / peak), (None if tgt is None else tgt / peak)


def is_output(value: object) -> bool:
    """An :class:`~distattr.results.AttributionOutput` (told by its fields: this module cannot import
    ``distattr.results``, which imports it)."""
    return type(value).__name__ == "AttributionOutput" and hasattr(value, "sequences")


def is_sequence(value: object) -> bool:
    """A :class:`~distattr.results.SequenceAttribution` (told as :func:`is_output` tells outputs)."""
    return type(value).__name__ == "SequenceAttribution" and hasattr(value, "target_tokens")


# --- pipelines and pairs --------------------------------------------------------------------------------------


def apply(result: SequenceAttribution | AttributionOutput, *stages: Stage) -> SequenceAttribution | AttributionOutput:
    """Run ``stages`` in order on one example or on every example of an output.

    For an :class:`AttributionOutput` the stages are recorded in ``info["aggregation"]``.
    """
    for stage in stages:
        if not callable(stage):
            raise TypeError(f"A pipeline stage must be callable (SequenceAttribution -> SequenceAttribution), "
                            f"got {stage!r}")
    if is_output(result):
        sequences = tuple(apply(seq, *stages) for seq in result.sequences)
        done = [*result.info.get("aggregation", []), *(repr(s) for s in stages)]
        return dataclasses.replace(result, sequences=sequences, info={**result.info, "aggregation": done})
    if not is_sequence(result):
        raise TypeError(f"Expected a SequenceAttribution or an AttributionOutput, not {type(result).__name__}")
    for stage in stages:
        result = stage(result)
    return result


def pair_difference(
    a: SequenceAttribution | AttributionOutput, b: SequenceAttribution | AttributionOutput, same_tokens: bool = True
) -> SequenceAttribution | AttributionOutput:
    """``a - b``: attributions and step scores of ``a`` minus those of ``b`` (deltas are dropped).

    Both must have the same shapes, explained positions, dims and step scores; with ``same_tokens`` (default)
    the same tokens too. With ``same_tokens=False`` a minimal pair may differ in tokens of the same count:
    differing positions are labelled ``"a_tok → b_tok"`` with id -1, as Inseq does.

    Inseq's convention is the reverse: ``a.aggregate("pair", paired_attr=b)`` and ``a - b`` both return
    ``b − a`` (``PairAggregator.default_fn = lambda x, y: y - x`` is called as ``fn(a, b)``, and
    ``FeatureAttributionSequenceOutput.__sub__`` calls that aggregator). Inseq's ``a - b`` is
    ``pair_difference(b, a)`` here.
    """
    if is_output(a) and is_output(b):
        if len(a) != len(b):
            raise ValueError(f"The outputs hold {len(a)} and {len(b)} examples")
        sequences = tuple(pair_difference(x, y, same_tokens) for x, y in zip(a, b, strict=True))
        return dataclasses.replace(a, sequences=sequences, info={**a.info, "aggregation": [
            *a.info.get("aggregation", []), "pair_difference(a, b) = a - b"]})
    if not (is_sequence(a) and is_sequence(b)):
        raise TypeError("pair_difference takes two SequenceAttribution or two AttributionOutput objects")
    for side in ("source", "target"):
        ta, tb = getattr(a, f"{side}_tokens"), getattr(b, f"{side}_tokens")
        if len(ta) != len(tb) or (same_tokens and tuple(ta) != tuple(tb)):
            diff = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y), min(len(ta), len(tb)))
            raise ValueError(
                f"The pair has different {side} tokens ({len(ta)} vs {len(tb)} tokens, first difference at {diff}); "
                + ("pass same_tokens=False to subtract a minimal pair of equal length" if len(ta) == len(tb) else
                   "merge or slice them to the same tokens first")
            )
    for name in ("attr_pos_start", "attr_pos_end", "dims"):
        if getattr(a, name) != getattr(b, name):
            raise ValueError(f"The pair has different {name}: {getattr(a, name)!r} vs {getattr(b, name)!r}")
    for name in ("source_attributions", "target_attributions"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and x.shape != y.shape):
            raise ValueError(f"The pair has different {name}: shapes {getattr(x, 'shape', None)} and "
                             f"{getattr(y, 'shape', None)}")
    if a.step_scores.keys() != b.step_scores.keys():
        raise ValueError(f"The pair has different step scores: {sorted(a.step_scores)} vs {sorted(b.step_scores)}")

    def tokens(ta, tb, ia, ib):
        return (tuple(x if x == y else f"{x} → {y}" for x, y in zip(ta, tb, strict=True)),
                tuple(i if x == y else -1 for x, y, i in zip(ta, tb, ia, strict=True)))

    def sub(x, y):
        return None if x is None else (x - y).astype(x.dtype)

    source_tokens, source_ids = tokens(a.source_tokens, b.source_tokens, a.source_ids, b.source_ids)
    target_tokens, target_ids = tokens(a.target_tokens, b.target_tokens, a.target_ids, b.target_ids)
    return dataclasses.replace(
        a, source_tokens=source_tokens, source_ids=source_ids, target_tokens=target_tokens, target_ids=target_ids,
        source_attributions=sub(a.source_attributions, b.source_attributions),
        target_attributions=sub(a.target_attributions, b.target_attributions),
        step_scores={k: sub(v, b.step_scores[k]) for k, v in a.step_scores.items()}, deltas=None,
    )


# --- Inseq's aggregator names -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class InseqPair:
    """Inseq's ``"pair"`` aggregator: ``paired − attr`` (Inseq's ``PairAggregator.default_fn = lambda x, y: y - x``
    called as ``fn(attr, paired)``), tokens that differ labelled ``"attr_tok → paired_tok"`` with id -1; the
    tokens may differ in a pair of equal length. Equal to ``pair_difference(paired, attr, same_tokens=False)``
    except for the labels' order; deltas are dropped."""

    paired: SequenceAttribution = field(repr=False)

    def __call__(self, seq: SequenceAttribution) -> SequenceAttribution:
        diff = pair_difference(seq, self.paired, same_tokens=False)  # attr - paired, labels "attr → paired"

        def neg(x):
            return None if x is None else -x  # exact: -(a - b) is b - a in IEEE arithmetic

        return dataclasses.replace(diff, source_attributions=neg(diff.source_attributions),
                                   target_attributions=neg(diff.target_attributions),
                                   step_scores={k: neg(v) for k, v in diff.step_scores.items()})


def _one_span(value, keyword: str) -> Span | None:
    if value is None:
        return None
    spans = _as_spans(value, keyword)
    if len(spans) != 1:
        raise ValueError(f"{keyword}: distattr's Slice keeps one contiguous (start, end) range, got {len(spans)}; "
                         "slice once per range")
    return spans[0]


_SUBWORD_MARKERS = ({"▁"}, {"Ġ", "Ċ"}, {"Ġ"}, {"Ċ"})


def _subwords(tokenizer=None, aggregate_fn: str | Reducer = "absmax", special_chars=None,
              is_suffix_symbol: bool = False) -> Stage:
    if special_chars is not None:
        chars = {special_chars} if isinstance(special_chars, str) else set(special_chars)
        if chars not in _SUBWORD_MARKERS:
            raise ValueError(f"special_chars={special_chars!r}: distattr reads the word-start markers itself "
                             "(SentencePiece '▁', byte-level BPE 'Ġ'/'Ċ') or decodes the ids with tokenizer=...; "
                             "other markers are not supported: give explicit spans with 'spans'")
    if is_suffix_symbol:
        raise ValueError("is_suffix_symbol=True: distattr's words start at a marker; suffix markers are not supported, "
                         "give explicit spans with 'spans'")
    return Words(tokenizer, fn=aggregate_fn)


def _spans(source_spans=None, target_spans=None, aggregate_fn: str | Reducer = "absmax") -> Stage:
    return Spans(source=source_spans or (), target=target_spans or (), fn=aggregate_fn)


def _slices(source_spans=None, target_spans=None) -> Stage:
    return Slice(source=_one_span(source_spans, "source_spans"), target=_one_span(target_spans, "target_spans"))


def _pair(paired_attr=None) -> Stage:
    if not is_sequence(paired_attr):
        raise ValueError(f"'pair' needs paired_attr=<the other SequenceAttribution>, got {type(paired_attr).__name__}")
    return InseqPair(paired_attr)


INSEQ_AGGREGATORS: dict[str, tuple[str, Callable[..., Stage] | None]] = {
    "scores": ("SequenceAttributionAggregator", None),  # the display aggregation, SequenceAttribution.display
    "subwords": ("SubwordAggregator", _subwords),
    "spans": ("ContiguousSpanAggregator", _spans),
    "slices": ("SliceAggregator", _slices),
    "pair": ("PairAggregator", _pair),
}
"""Inseq's aggregator names (and class names) that distattr runs, mapped to the distattr operation doing the same:
``scores`` -> :meth:`SequenceAttribution.display` (keywords ``aggregate_fn``, ``normalize``, ``rescale``);
``subwords`` -> :class:`Words` (``aggregate_fn``, ``special_chars`` among the markers distattr reads, and
distattr's ``tokenizer``); ``spans`` -> :class:`Spans` (``source_spans``, ``target_spans``, ``aggregate_fn``);
``slices`` -> :class:`Slice` (one ``source_spans`` / ``target_spans`` range each); ``pair`` -> :class:`InseqPair`
(``paired_attr``). Inseq's ``split`` (regex splits) has no distattr counterpart and is refused."""

_BY_CLASS = {cls: name for name, (cls, _) in INSEQ_AGGREGATORS.items()}


def list_aggregators() -> list[str]:
    """The aggregator names :meth:`SequenceAttribution.aggregate` accepts (Inseq's ids)."""
    return list(INSEQ_AGGREGATORS)


def _resolve_name(aggregator: str) -> tuple[str, str | None]:
    """``(Inseq aggregator id, aggregation function or None)`` for a name; unknown names raise."""
    if aggregator in INSEQ_AGGREGATORS:
        return aggregator, None
    if aggregator in _BY_CLASS:
        return _BY_CLASS[aggregator], None
    if aggregator in AGGREGATION_FUNCTIONS:  # Inseq: .aggregate("sum") is "scores" with aggregate_fn="sum"
        return "scores", aggregator
    names = ", ".join(f"{n!r} ({cls})" for n, (cls, _) in INSEQ_AGGREGATORS.items())
    raise ValueError(f"Unknown aggregator {aggregator!r}. Valid: {names}, or an aggregation function name as "
                     f"shorthand for 'scores' ({', '.join(list_aggregation_functions())})")


def _keywords(build: Callable[..., Stage]) -> list[str]:
    import inspect

    return list(inspect.signature(build).parameters)


def named_aggregation(result: SequenceAttribution | AttributionOutput, aggregator: str | None = None, *,
                      normalize: bool | None = None, rescale: bool | None = None,
                      **kwargs) -> SequenceAttribution | AttributionOutput:
    """``result.aggregate(aggregator, **kwargs)`` (see :data:`INSEQ_AGGREGATORS`): the display aggregation for None
    or ``"scores"``, else the distattr stage of the same operation, run with :func:`apply` (so recorded in an
    output's ``info["aggregation"]``). Unknown names and keywords raise, listing the valid ones."""
    if aggregator is not None and not isinstance(aggregator, str):
        raise TypeError(f"aggregator must be a name ({', '.join(list_aggregators())}), not "
                        f"{type(aggregator).__name__}; for a pipeline use apply(*stages) or chain aggregate() calls")
    name, fn = ("scores", None) if aggregator is None else _resolve_name(aggregator)
    if name == "scores":
        unknown = sorted(set(kwargs) - {"aggregate_fn"})
        if unknown:
            raise ValueError(f"Unknown argument(s) {unknown} for aggregator 'scores'; valid: aggregate_fn, normalize, "
                             "rescale")
        fn = kwargs.get("aggregate_fn", fn)
        reducer = None if fn is None else get_aggregation_function(fn)
        norm = (not rescale) if normalize is None else normalize
        if is_output(result):
            return dataclasses.replace(result, sequences=tuple(
                s.display(norm, bool(rescale), reducer) for s in result.sequences))
        return result.display(norm, bool(rescale), reducer)
    given = [k for k, v in (("normalize", normalize), ("rescale", rescale)) if v is not None]
    if given:
        raise ValueError(f"aggregator {name!r} does not normalise: drop {' and '.join(given)}, and call .aggregate() "
                         f"(or apply Normalize()) on its result")
    build = INSEQ_AGGREGATORS[name][1]
    valid = _keywords(build)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"Unknown argument(s) {unknown} for aggregator {name!r}; valid: {', '.join(valid)}")
    if name == "pair" and is_output(result):
        return _pair_outputs(result, kwargs.get("paired_attr"))
    return apply(result, build(**kwargs))


def _pair_outputs(result: AttributionOutput, paired) -> AttributionOutput:
    if is_sequence(paired):
        paired = [paired] * len(result)
    elif is_output(paired):
        if len(paired) != len(result):
            raise ValueError(f"'pair': paired_attr holds {len(paired)} examples, this output {len(result)}")
    else:
        raise ValueError(f"'pair' needs paired_attr=<an AttributionOutput or SequenceAttribution>, got "
                         f"{type(paired).__name__}")
    sequences = tuple(InseqPair(p)(s) for s, p in zip(result.sequences, paired, strict=True))
    return dataclasses.replace(result, sequences=sequences, info={**result.info, "aggregation": [
        *result.info.get("aggregation", []), "InseqPair(paired_attr): paired_attr - attr"]})
