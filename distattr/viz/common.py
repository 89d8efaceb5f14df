"""What the console, HTML and plot views share: the heatmap blocks of an example, the colour range, and tokens
as people read them (:func:`display_token`).

Tokens are shown as text, not as the tokenizer's pieces: byte-level BPE pieces (GPT-2, Llama 3, Qwen, ...:
``Ġ`` a space, ``Ċ`` a newline, ``Ã©`` the bytes of "é") are decoded with GPT-2's byte table, SentencePiece's
``▁`` is a space and its byte-fallback pieces of ASCII bytes (``<0x0A>``) are that character. What a table
cell cannot hold is a marker: ``↵`` a line break, ``⇥`` a tab, ``␍`` a carriage return, ``␣`` a token made
only of spaces, ``<0x01>`` another control character, and ``<0xE2>`` each byte of a piece that is only part
of a UTF-8 character. This is display only: ``SequenceAttribution`` tokens (and the saved JSON) keep the
raw pieces, and the HTML view shows the raw piece on hover (``title``).
"""

from __future__ import annotations

import codecs
import math
import re
import unicodedata
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from ..aggregate import is_output, is_sequence

if TYPE_CHECKING:  # distattr.results imports the views (out.show()): types only here
    from ..results import SequenceAttribution



@dataclass(frozen=True)
class Block:
    """One heatmap: ``scores[r, c]`` explains generated token ``columns[c]`` (at target position
    ``positions[c]``) by attributed token ``rows[r]``. ``scores`` is None for a step-scores-only block.
    ``rows`` and ``columns`` are the raw tokens, ``row_labels`` and ``column_labels`` the same tokens as shown
    (:func:`display_tokens`; computed from the raw tokens when not given)."""

    label: str
    rows: tuple[str, ...]
    scores: np.ndarray | None
    columns: tuple[str, ...]
    positions: tuple[int, ...]
    step_scores: dict[str, np.ndarray] = field(default_factory=dict)
    row_labels: tuple[str, ...] = ()
    column_labels: tuple[str, ...] = ()

    def __post_init__(self):
        if len(self.row_labels) != len(self.rows) or len(self.column_labels) != len(self.columns):
            byte_level = guess_byte_level((*self.rows, *self.columns))
            object.__setattr__(self, "row_labels", tuple(display_tokens(self.rows, byte_level)))
            object.__setattr__(self, "column_labels", tuple(display_tokens(self.columns, byte_level)))


def blocks(seq: SequenceAttribution, step_scores: bool = True) -> list[Block]:
    """The heatmaps of one aggregated example: source then target, as in Inseq; the step scores go under
    the last one (a block of step scores alone when there are no attributions)."""
    columns = tuple(seq.generated_tokens)
    positions = tuple(range(seq.attr_pos_start, seq.attr_pos_start + len(columns)))
    byte_level = guess_byte_level((*seq.source_tokens, *seq.target_tokens))  # one tokenizer: decide once
    column_labels = tuple(display_tokens(columns, byte_level))
    found = []
    for label, tokens, scores in (("Source", seq.source_tokens, seq.source_attributions),
                                  ("Target", seq.target_tokens, seq.target_attributions)):
        if scores is not None:
            found.append(Block(label, tuple(tokens), _matrix(scores), columns, positions,
                               row_labels=tuple(display_tokens(tokens, byte_level)), column_labels=column_labels))
    scores_dict = {k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in seq.step_scores.items()} if step_scores \
        else {}
    if not found:
        return [Block("Step scores", (), None, columns, positions, scores_dict, column_labels=column_labels)] \
            if scores_dict else []
    found[-1] = replace(found[-1], step_scores=scores_dict)
    return found


def _matrix(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim > 2:  # not aggregated down to tokens x steps: average the rest, as the default aggregator
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            scores = np.nanmean(scores.reshape(scores.shape[0], scores.shape[1], -1), axis=-1)
    return scores


def color_limit(sequences: Iterable[SequenceAttribution]) -> float:
    """Inseq's symmetric colour range ``[-m, m]`` with ``m = max(0, nanmax of all displayed scores)``.

    Inseq divides by zero when every score is <= 0; there ``m`` is the largest |score| (1 if all are 0)."""
    peak, absolute = 0.0, 0.0
    for seq in sequences:
        for scores in (seq.source_attributions, seq.target_attributions):
            if scores is None:
                continue
            finite = np.asarray(scores, dtype=np.float64)
            finite = finite[np.isfinite(finite)]
            if finite.size:
                peak = max(peak, float(finite.max()))
                absolute = max(absolute, float(np.abs(finite).max()))
    return peak if peak > 0 else (absolute if absolute > 0 else 1.0)


def scaled(value: float, limit: float) -> float:
    """``value`` mapped from ``[-limit, limit]`` to ``[-1, 1]`` (clipped)."""
    if math.isnan(value):
        return 0.0
    return max(-1.0, min(1.0, value / limit))


_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def token_label(token: str) -> str:
    """A raw token on one line (for hover text): the tokenizer's piece as stored, control characters escaped
    (``\\n``, ``\\x01``), the empty token as ``''``. :func:`display_token` is the token as people read it."""
    if token == "":
        return "''"
    return "".join(_CONTROL.get(ch, f"\\x{ord(ch):02x}" if ord(ch) < 32 or ord(ch) == 127 else ch) for ch in token)


def _byte_table() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` reversed: the character standing for each byte in byte-level BPE pieces.
    Printable Latin-1 bytes stand for themselves; the others (controls, space, ``0x7F``-``0xA0``, ``0xAD``)
    are ``chr(256 + k)``, the k-th of them in byte order (space is ``Ġ``, newline ``Ċ``, tab ``ĉ``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + k): b for k, b in enumerate(b for b in range(256) if b not in printable)})
    return table


BYTE_OF_CHAR = _byte_table()
SPACE_MARKER = "▁"  # SentencePiece's word boundary
_BYTE_LEVEL_SPACE, _BYTE_LEVEL_NEWLINE = "Ġ", "Ċ"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback
_SPECIAL = re.compile(r"<[^<>\s]*>")  # "<s>", "<|endoftext|>", "<extra_id_0>": shown as they are
_MARKS = {"\n": "↵", "\t": "⇥", "\r": "␍", "\u2028": "↵", "\u2029": "↵"}


def _bytes_fallback(error: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(f"<0x{b:02X}>" for b in error.object[error.start:error.end]), error.end


codecs.register_error("distattr.bytes", _bytes_fallback)


def display_token(raw: str, byte_level: bool | None = None) -> str:
    """``raw`` (a tokenizer piece) as people read it, on one line: spaces, text and markers (module docstring).

    Args:
        raw: the token as stored (``SequenceAttribution`` tokens).
        byte_level: whether the tokenizer is byte-level BPE (its pieces are decoded with GPT-2's byte table,
            and a piece that is part of a UTF-8 character shows its bytes, ``<0xE2>``); False never decodes
            bytes (SentencePiece, word-level); None (default) decodes a piece only when it reads as text
            (``Ġcity``, ``Ã©``) or is a clear byte split (``âĤ``: ``<0xE2><0x82>``). :func:`guess_byte_level`
            decides for a whole sequence, which is safer than one piece.

    >>> display_token("Ġcity"), display_token("▁the"), display_token("Ċ"), display_token("Ã©")
    (' city', ' the', '↵', 'é')
    """
    if raw == "":
        return "''"
    piece = _BYTE_PIECE.fullmatch(raw)
    if piece is not None:
        value = int(piece.group(1), 16)
        return _visible(chr(value)) if value < 0x80 else f"<0x{value:02X}>"
    if _SPECIAL.fullmatch(raw):
        return raw
    if SPACE_MARKER in raw or byte_level is False:
        return _visible(raw.replace(SPACE_MARKER, " "))
    return _visible(_from_bytes(raw, byte_level))


def display_tokens(tokens: Iterable[str], byte_level: bool | None = None) -> list[str]:
    """Each of ``tokens`` (one sequence) as :func:`display_token` shows it, ``byte_level`` guessed from the
    whole sequence (:func:`guess_byte_level`) when None."""
    tokens = list(tokens)
    if byte_level is None:
        byte_level = guess_byte_level(tokens)
    return [display_token(t, byte_level) for t in tokens]


def guess_byte_level(tokens: Iterable[str]) -> bool | None:
    """Whether ``tokens`` (one sequence) are byte-level BPE pieces: False when a piece has SentencePiece's
    ``▁``, True when one is made of byte-level characters with ``Ġ`` (space) or ``Ċ`` (newline), None when the
    sequence does not say (special tokens such as ``<s>`` are not looked at)."""
    found = None
    for token in tokens:
        if _SPECIAL.fullmatch(token):
            continue
        if SPACE_MARKER in token:
            return False
        if (_BYTE_LEVEL_SPACE in token or _BYTE_LEVEL_NEWLINE in token) and all(ch in BYTE_OF_CHAR for ch in token):
            found = True
    return found


def _from_bytes(raw: str, byte_level: bool | None) -> str:
    """``raw`` decoded as byte-level BPE when it is one (see :func:`display_token`), else ``raw``."""
    if raw.isascii() or not all(ch in BYTE_OF_CHAR for ch in raw):
        return raw  # nothing to decode, or not a byte-level piece (an added token with other characters)
    data = bytes(BYTE_OF_CHAR[ch] for ch in raw)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if byte_level or (byte_level is None and any(ord(ch) >= 256 for ch in raw) and _split_character(data)):
            return data.decode("utf-8", errors="distattr.bytes")
        return raw
    if byte_level or not any(_hidden(ch) for ch in text):
        return text
    return raw  # e.g. SentencePiece's "č" would read as "\r": guessed not byte-level


def _split_character(data: bytes) -> bool:
    """Whether ``data`` is UTF-8 text cut inside characters at its ends only (what a byte-level piece of a
    longer character is), not bytes that no text has in the middle."""
    start = 0
    while start < min(len(data), 3) and 0x80 <= data[start] < 0xC0:
        start += 1
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data[start:], final=False)
    except UnicodeDecodeError:
        return False
    return True


def _hidden(ch: str) -> bool:
    """A character a table cell would not show (a control character other than newline and tab)."""
    return ch not in "\n\t" and unicodedata.category(ch) == "Cc"


def _visible(text: str) -> str:
    """``text`` on one visible line: line breaks, tabs and control characters as markers, spaces-only as ``␣``."""
    if text.strip(" ") == "":
        return "␣" * len(text)
    out = []
    for ch in text:
        if ch in _MARKS:
            out.append(_MARKS[ch])
        elif unicodedata.category(ch) == "Cc":
            out.append(f"<0x{ord(ch):02X}>" if ord(ch) < 0x80 else f"<U+{ord(ch):04X}>")
        else:
            out.append(ch)
    return "".join(out)


def sequences_of(out) -> tuple[SequenceAttribution, ...]:
    if is_sequence(out):
        return (out,)
    if is_output(out):
        return out.sequences
    raise TypeError(f"Expected an AttributionOutput or a SequenceAttribution, not {type(out).__name__}")


def aggregated(out, normalize: bool, rescale: bool) -> tuple[SequenceAttribution, ...]:
    return tuple(seq.aggregate(normalize=normalize, rescale=rescale) for seq in sequences_of(out))
