"""Work units: examples bucketed by length into units of ``unit_size``, long examples split by step ranges.

A unit owns the store slots ``[id * unit_size, (id + 1) * unit_size)``; a part of a split unit owns the step
columns ``[part * split_steps, (part + 1) * split_steps)`` of its one example. The plan is a pure function of the
data order and :class:`PlanConfig`, so a resumed or retried job rebuilds the same units and writes the same
regions. Examples are sorted by length inside windows of ``window`` units, which keeps padding low without
reading the whole dataset.

The driver reads the data twice: :func:`survey` (validation, fingerprint, array bounds, one 8-byte digest per
unit) and the dispatch, whose units pass through :func:`checked_units` so that a unit that differs from the
survey's (the data changed in between) is refused before it is sent anywhere.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

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


def _frozen(values: np.ndarray) -> np.ndarray:
    values.setflags(write=False)
    return values


@dataclass(frozen=True)
class Survey:
    """What one pass over the data learns: its size and fingerprint, the unit count and the array bounds, and per
    unit its digest and part count (for :func:`checked_units` and the store's ``unit_parts`` array)."""

    count: int
    fingerprint: str
    n_units: int
    n_split: int
    max_source: int
    max_target: int
    max_steps: int
    # (n_units,) uint64, read-only: each unit's :func:`unit_digest` read as a little-endian integer
    unit_digests: np.ndarray = field(default_factory=lambda: _frozen(np.zeros(0, np.uint64)), compare=False,
                                     repr=False)
    # (n_units,) uint32, read-only: each unit's n_parts (1, or the step ranges of its one split example)
    unit_parts: np.ndarray = field(default_factory=lambda: _frozen(np.zeros(0, np.uint32)), compare=False,
                                   repr=False)


@dataclass(frozen=True)
class Sizer:
    """``sizer(record) -> Size``: an example's token counts, the generated part bounded by ``max_new_tokens``;
    with ``max_context`` it also says which examples the model cannot take (:meth:`too_long`)."""

    tokenizer: object
    enc_dec: bool
    add_special: bool
    max_new_tokens: int | None
    max_context: int | None = None  # tokens per sequence (per side for an encoder-decoder); None: no limit

    def __call__(self, record: Record) -> Size:
        tokenizer, add_special, max_new_tokens = self.tokenizer, self.add_special, self.max_new_tokens
        source = len(encode_text(tokenizer, record.text, add_special))
        if record.target is not None:
            if self.enc_dec:
                target = 1 + len(encode_text(tokenizer, record.target, add_special, as_target=True))
                return Size(source, target, target - 1)
            target = len(encode_text(tokenizer, record.target, add_special))
            return Size(source, target, max(target - source, 1))
        if max_new_tokens is None:
            raise DataError(f"example {record.id!r} has no target text: give max_new_tokens (generation_args) so "
                            "the store's arrays can be sized, or a target field")
        if self.enc_dec:
            steps = max_new_tokens + ENC_DEC_TARGET_SLACK
            return Size(source, steps + 1, steps)
        return Size(source, source + max_new_tokens, max_new_tokens)

    def too_long(self, size: Size) -> bool:
        """Whether an example of ``size`` exceeds the context: decoder-only, prompt + generated or target tokens
        (``size.target``); encoder-decoder, the source or the target sequence."""
        if self.max_context is None:
            return False
        return size.target > self.max_context or (self.enc_dec and size.source > self.max_context)

    def describe(self, record: Record, size: Size) -> str:
        """``"row 12 id 'q-12': 2040 prompt + 32 generated"`` (token counts, for messages)."""
        made = "target" if record.target is not None else "generated"
        if self.enc_dec:
            counts = f"{size.source} source, {size.target} {made}"
        else:
            counts = f"{size.source} prompt + {size.target - size.source} {made}"
        return f"row {record.index} id {record.id!r}: {counts}"


def sizer(tokenizer, enc_dec: bool, add_special: bool, max_new_tokens: int | None,
          max_context: int | None = None) -> Sizer:
    """``size(record)``: the example's token counts, the generated part bounded by ``max_new_tokens``; with
    ``max_context`` (see :func:`distattr.models.loading.context_length`), :func:`survey` refuses examples longer
    than the model's context."""
    return Sizer(tokenizer, enc_dec, add_special, max_new_tokens, max_context)


def unit_digest(unit: Unit) -> bytes:
    """8 bytes that change when the unit's records (:func:`record_digest`, in order) or its ``n_parts`` do."""
    digest = hashlib.blake2b(str(unit.n_parts).encode(), digest_size=8)
    for record in unit.records:
        digest.update(record_digest(record))
    return digest.digest()


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
    """One pass: validate, reject duplicate ids, fingerprint (sha256 of the records in order), count units, digest
    each unit and find the array bounds. With a :class:`Sizer` that has ``max_context``, examples longer than the
    context are counted and refused in one :class:`DataError` after the pass (naming the first five).
    Memory: about 8 bytes per example id and 12 bytes per unit."""
    digest = hashlib.sha256()
    seen: dict[bytes, int] = {}
    bounds = {"source": 0, "target": 0, "steps": 0}
    limited = isinstance(size, Sizer) and size.max_context is not None
    long_count, long_named = 0, []

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
        nonlocal long_count
        sz = size(record)
        bounds["source"] = max(bounds["source"], sz.source)
        bounds["target"] = max(bounds["target"], sz.target)
        bounds["steps"] = max(bounds["steps"], sz.steps)
        if limited and size.too_long(sz):
            long_count += 1
            if len(long_named) < 5:
                long_named.append(size.describe(record, sz))
        return sz

    digests, parts = bytearray(), array("I")
    for unit in plan_units(checked(), measured, cfg):
        digests += unit_digest(unit)
        parts.append(unit.n_parts)
    if not seen:
        raise DataError("the dataset has no examples")
    if long_count:
        raise _too_long(size, long_count, long_named)
    unit_parts = np.array(parts, dtype=np.uint32)
    return Survey(count=len(seen), fingerprint=digest.hexdigest(), n_units=len(parts),
                  n_split=int(np.count_nonzero(unit_parts > 1)), max_source=bounds["source"],
                  max_target=bounds["target"], max_steps=bounds["steps"],
                  unit_digests=_frozen(np.frombuffer(bytes(digests), dtype="<u8").copy()),
                  unit_parts=_frozen(unit_parts))


def _too_long(size: Sizer, count: int, named: list[str]) -> DataError:
    more = "; ..." if count > len(named) else ""
    them = "them" if count > 1 else "it"
    hint = ", or lower --max-new-tokens" if size.max_new_tokens is not None else ""
    return DataError(f"{count} example{'s are' if count > 1 else ' is'} longer than the model's context of "
                     f"{size.max_context} tokens ({'; '.join(named)}{more}): drop or shorten {them}{hint}")


def checked_units(units: Iterable[Unit], survey: Survey) -> Iterator[Unit]:
    """``units`` unchanged, each compared with the survey's unit of the same position before it is yielded: raises
    a one-line :class:`DataError` at the first unit that differs (or when there are more or fewer units), so a
    changed unit is never dispatched and no example is written into another example's slots."""
    expected = survey.unit_digests.astype("<u8").tobytes()
    count = 0
    for unit in units:
        if count >= survey.n_units:
            raise _changed(f"unit {unit.id}, {_rows(unit)}: the survey planned only {survey.n_units} units")
        if unit.id != count or unit_digest(unit) != expected[8 * count : 8 * count + 8]:
            raise _changed(f"unit {count}, {_rows(unit)} differ")
        count += 1
        yield unit
    if count != survey.n_units:
        raise _changed(f"the dispatch ended after {count} of the survey's {survey.n_units} units")


def _rows(unit: Unit) -> str:
    """The unit's rows for a message: ``row 7``, ``rows 192-207`` or ``16 rows between 192 and 260``."""
    indices = sorted(r.index for r in unit.records)
    if len(indices) == 1:
        return f"row {indices[0]}"
    if indices[-1] - indices[0] + 1 == len(indices):
        return f"rows {indices[0]}-{indices[-1]}"
    return f"{len(indices)} rows between {indices[0]} and {indices[-1]}"


def _changed(detail: str) -> DataError:
    return DataError(f"the data changed between the survey and the dispatch ({detail}): examples could land in "
                     "another example's slots; nothing was written for them. Do not edit the data while a job "
                     "reads it (a ray.data source must keep its order)")
