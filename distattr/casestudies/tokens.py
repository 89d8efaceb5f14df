"""Character spans of a text -> positions of its tokens (to find a subject, an occupation, a pronoun)."""

from __future__ import annotations

import re
from collections.abc import Sequence


def char_span_tokens(tokenizer, text: str, start: int, end: int, ids: Sequence[int],
                     add_special_tokens: bool = True) -> tuple[int, int]:
    """The half-open range ``[a, b)`` of positions in ``ids`` whose tokens cover characters ``[start, end)``.

    ``ids`` is the tokenization of ``text`` that was attributed (e.g. ``seq.source_ids``). Fast tokenizers
    give character offsets; for others the tokens of ``text[:start]`` and ``text[:end]`` are counted
    (exact for tokenizers that split at the span's edges, as BPE and SentencePiece do at spaces).
    Raises ValueError when no token covers the span or the tokenization does not match ``ids``.
    """
    if not 0 <= start < end <= len(text):
        raise ValueError(f"Character span [{start}, {end}) is not inside a text of {len(text)} characters")
    ids = list(ids)
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        offsets = None
    if offsets is not None:
        shift = _shift(list(enc["input_ids"]), ids, text)
        hits = [i - shift for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start and i >= shift]
    else:
        plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        lead = _shift(ids, plain, text, contains=True)
        def count(part: str) -> int:
            return len(tokenizer(part, add_special_tokens=False)["input_ids"]) if part.strip() else 0

        before, upto = count(text[:start].rstrip()), count(text[:end])
        hits = list(range(lead + before, lead + upto))
    if not hits:
        raise ValueError(f"No token covers characters [{start}, {end}) ({text[start:end]!r}) of {text!r}")
    return min(hits), max(hits) + 1


def _shift(longer: list[int], shorter: list[int], text: str, contains: bool = False) -> int:
    """Offset ``k`` with ``longer[k:k + len(shorter)] == shorter`` (leading tokens the engine dropped, such as
    a doubled BOS, or special tokens around the plain tokens)."""
    for k in range(len(longer) - len(shorter) + 1):
        if longer[k : k + len(shorter)] == shorter and (contains or k + len(shorter) == len(longer)):
            return k
    raise ValueError(f"The tokenization of {text!r} does not match the attributed token ids")


def word_span(text: str, word: str, after: int = 0) -> tuple[int, int]:
    """Character span of the first whole-word occurrence of ``word`` in ``text`` at or after ``after``."""
    match = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)").search(text, after)
    if match is None:
        raise ValueError(f"{word!r} does not occur as a word in {text!r}")
    return match.span()
