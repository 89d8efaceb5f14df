"""What the console and HTML views share: the heatmap blocks of an example, the colour range, token labels."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ..results import AttributionOutput, SequenceAttribution


@dataclass(frozen=True)
class Block:
    """One heatmap: ``scores[r, c]`` explains generated token ``columns[c]`` (at target position
    ``positions[c]``) by attributed token ``rows[r]``. ``scores`` is None for a step-scores-only block."""

    label: str
    rows: tuple[str, ...]
    scores: np.ndarray | None
    columns: tuple[str, ...]
    positions: tuple[int, ...]
    step_scores: dict[str, np.ndarray] = field(default_factory=dict)


def blocks(seq: SequenceAttribution, step_scores: bool = True) -> list[Block]:
    """The heatmaps of one aggregated example: source then target, as in Inseq; the step scores go under
    the last one (a block of step scores alone when there are no attributions)."""
    columns = tuple(seq.generated_tokens)
    positions = tuple(range(seq.attr_pos_start, seq.attr_pos_start + len(columns)))
    found = []
    for label, tokens, scores in (("Source", seq.source_tokens, seq.source_attributions),
                                  ("Target", seq.target_tokens, seq.target_attributions)):
        if scores is not None:
            found.append(Block(label, tuple(tokens), _matrix(scores), columns, positions))
    scores_dict = {k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in seq.step_scores.items()} if step_scores \
        else {}
    if not found:
        return [Block("Step scores", (), None, columns, positions, scores_dict)] if scores_dict else []
    last = found[-1]
    found[-1] = Block(last.label, last.rows, last.scores, last.columns, last.positions, scores_dict)
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
    """A token as shown: control characters escaped, empty tokens as ``''``."""
    if token == "":
        return "''"
    return "".join(_CONTROL.get(ch, f"\\x{ord(ch):02x}" if ord(ch) < 32 or ord(ch) == 127 else ch) for ch in token)


def sequences_of(out) -> tuple[SequenceAttribution, ...]:
    if isinstance(out, SequenceAttribution):
        return (out,)
    if isinstance(out, AttributionOutput):
        return out.sequences
    raise TypeError(f"Expected an AttributionOutput or a SequenceAttribution, not {type(out).__name__}")


def aggregated(out, normalize: bool, rescale: bool) -> tuple[SequenceAttribution, ...]:
    return tuple(seq.aggregate(normalize=normalize, rescale=rescale) for seq in sequences_of(out))
