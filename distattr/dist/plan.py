"""Work units: examples bucketed by length into units of ``unit_size``, long examples split by step ranges.

A unit owns the store slots ``[id * unit_size, (id + 1) * unit_size)``; a part of a split unit owns the step
columns ``[part * split_steps, (part + 1) * split_steps)`` of its one example. The plan is a pure function of the
data order and :class:`PlanConfig`, so a resumed or retried job rebuilds the same units and writes the same
regions. Examples are sorted by length inside windows of ``window`` units, which keeps padding low without
reading the whole dataset.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..engine import encode_text
from .data import DataError, Record, record_digest

# Encoder-decoder targets are the generated text re-tokenized as a target (which appends EOS), so their length
# is only bounded approximately by max_new_tokens: keep room for a few more tokens.
ENC_DEC_TARGET_SLACK = 8


@dataclass(frozen=True)
class PlanConfig:
    """How examples become units (recorded in the store: a resumed job must plan the same way)."""

    unit_size: int = 16
    window: int = 64  # units per length-sorting window
    split_steps: int | None = 64  # examples with more steps are split into parts of this many steps

    def __post_init__(self):
        if self.unit_size < 1 or self.window < 1:
            raise ValueError("unit_size and window must be at least 1")
        if self.split_steps is not None and self.split_steps < 1:
            raise ValueError("split_steps must be at least 1 (or None to never split)")


@dataclass(frozen=True)
class Size:
    """Token counts of one example: source (prompt or encoder input), full target sequence, attributed steps."""

    source: int
    target: int
    steps: int


@dataclass(frozen=True)
class Unit:
    """Examples attributed together; ``n_parts > 1``: one long example attributed in step ranges."""

    id: int
    records: tuple[Record, ...]
    n_parts: int = 1


@dataclass(frozen=True)
class Survey:
    """What one pass over the data learns: its size and fingerprint, the unit count and the array bounds."""

    count: int
    fingerprint: str
    n_units: int
    n_split: int
    max_source: int
    max_target: int
    max_steps: int


def sizer(tokenizer, enc_dec: bool, add_special: bool, max_new_tokens: int | None) -> Callable[[Record], Size]:
    """``size(record)``: the example's token counts, the generated part bounded by ``max_new_tokens``."""

    def size(record: Record) -> Size:
        source = len(encode_text(tokenizer, record.text, add_special))
        if record.target is not None:
            if enc_dec:
                target = 1 + len(encode_text(tokenizer, record.target, add_special, as_target=True))
                return Size(source, target, target - 1)
            target = len(encode_text(tokenizer, record.target, add_special))
            return Size(source, target, max(target - source, 1))
        if max_new_tokens is None:
            raise DataError(f"example {record.id!r} has no target text: give max_new_tokens (generation_args) so "
                            "the store's arrays can be sized, or a target field")
        if enc_dec:
            steps = max_new_tokens + ENC_DEC_TARGET_SLACK
            return Size(source, steps + 1, steps)
        return Size(source, source + max_new_tokens, max_new_tokens)

    return size


def plan_units(records: Iterable[Record], size: Callable[[Record], Size], cfg: PlanConfig) -> Iterator[Unit]:
    """Units in a deterministic order: per window, split examples first, then the rest by source length."""
    next_id = 0
    window: list[tuple[Record, Size]] = []
    capacity = cfg.window * cfg.unit_size

    def cut() -> Iterator[Unit]:
        nonlocal next_id
        short = []
        for record, sz in window:
            if cfg.split_steps is not None and sz.steps > cfg.split_steps:
                yield Unit(id=next_id, records=(record,), n_parts=math.ceil(sz.steps / cfg.split_steps))
                next_id += 1
            else:
                short.append((sz.source, record.index, record))
        short.sort(key=lambda item: item[:2])
        for start in range(0, len(short), cfg.unit_size):
            yield Unit(id=next_id, records=tuple(r for _, _, r in short[start : start + cfg.unit_size]))
            next_id += 1

    for record in records:
        window.append((record, size(record)))
        if len(window) == capacity:
            yield from cut()
            window = []
    yield from cut()


def survey(records: Iterable[Record], size: Callable[[Record], Size], cfg: PlanConfig) -> Survey:
    """One pass: validate, reject duplicate ids, fingerprint (sha256 of the records in order), count units and
    find the array bounds. Memory: 8 bytes per example id."""
    digest = hashlib.sha256()
    seen: dict[bytes, int] = {}
    bounds = {"source": 0, "target": 0, "steps": 0}

    def checked() -> Iterator[Record]:
        for record in records:
            key = hashlib.blake2b(record.id.encode(), digest_size=8).digest()
            if key in seen:
                raise DataError(f"duplicate example id {record.id!r} (rows {seen[key]} and {record.index}); ids "
                                "must be unique so that results can be found and resumed")
            seen[key] = record.index
            digest.update(record_digest(record))
            yield record

    def measured(record: Record) -> Size:
        sz = size(record)
        bounds["source"] = max(bounds["source"], sz.source)
        bounds["target"] = max(bounds["target"], sz.target)
        bounds["steps"] = max(bounds["steps"], sz.steps)
        return sz

    n_units = n_split = 0
    for unit in plan_units(checked(), measured, cfg):
        n_units += 1
        n_split += unit.n_parts > 1
    if not seen:
        raise DataError("the dataset has no examples")
    return Survey(count=len(seen), fingerprint=digest.hexdigest(), n_units=n_units, n_split=n_split,
                  max_source=bounds["source"], max_target=bounds["target"], max_steps=bounds["steps"])
