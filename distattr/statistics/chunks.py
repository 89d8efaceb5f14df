"""A store as a grid of dask tasks: blocks of slots x step columns, read chunk-aligned from its Zarr arrays.

Every dataset-wide statistic maps a function over :class:`Block` s and combines the small results in a tree, so
memory is bounded by a few blocks (``block_bytes`` of attributions each, default 8 MiB) whatever the dataset size.
A block holds whole Zarr chunks: a multiple of the store's slot chunk, one step chunk (``steps_chunk`` columns)
and every entry of the extra dims (layer, head). Slots without a result (empty, unit not complete, failed: see
:attr:`~distattr.store.reader.Store.valid_slots`) or filtered out (``where``) stay in the block with ``selected``
False; dataset order is restored at the end from ``example_index``.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..store.reader import Store

BLOCK_BYTES = 8 << 20  # attribution bytes per task (uncompressed float32)
WAVE_PER_WORKER = 4  # blocks in flight per thread
SLOT_FIELDS = ("example_index", "n_source", "n_target", "attr_pos_start", "attr_pos_end")


@dataclass(frozen=True)
class Block:
    """One task's share of a store: ``n`` consecutive slots and ``c`` consecutive step columns.

    ``source`` / ``target``: ``[n, S, c, *dims]`` / ``[n, T, c, *dims]`` float32 attributions (NaN: padding or
    future token), None when the store has none. Per slot: ``example_index`` (-1: empty), ``selected`` (written
    and passing the filters), token counts and the attributed range. ``scores``: ``{name: [n, c]}``.
    """

    first_slot: int
    first_step: int
    encoder_decoder: bool
    dims: tuple[str, ...]
    example_index: np.ndarray
    selected: np.ndarray
    n_source: np.ndarray
    n_target: np.ndarray
    attr_pos_start: np.ndarray
    attr_pos_end: np.ndarray
    source: np.ndarray | None
    target: np.ndarray | None
    source_ids: np.ndarray | None = None
    target_ids: np.ndarray | None = None
    scores: Mapping[str, np.ndarray] | None = None
    deltas: np.ndarray | None = None
    source_tokens: np.ndarray | None = None
    target_tokens: np.ndarray | None = None

    @property
    def n_columns(self) -> int:
        matrix = self.target if self.target is not None else self.source
        return matrix.shape[2]

    def explained(self) -> np.ndarray:
        """``[n, c]`` the target position each column explains."""
        return self.attr_pos_start[:, None] + self.first_step + np.arange(self.n_columns)[None, :]

    def column_valid(self) -> np.ndarray:
        """``[n, c]`` columns that exist for a selected example."""
        steps = (self.attr_pos_end - self.attr_pos_start)[:, None]
        return self.selected[:, None] & (self.first_step + np.arange(self.n_columns)[None, :] < steps)


@dataclass(frozen=True)
class Context:
    """A block's context tokens as one row axis ``R``: encoder tokens then decoder prefix (encoder-decoder), or
    the decoder sequence (decoder-only, where rows ``< n_source`` are the prompt).

    ``values [n, R, c, *dims]`` float32; per row ``[n, R]``: ``side`` (0 source/prompt, 1 generated prefix),
    ``position`` (index in its own sequence: source or target), ``in_source`` (the row is an encoder token),
    ``ids`` and ``tokens`` (None unless the block was read with them)."""

    values: np.ndarray
    side: np.ndarray
    position: np.ndarray
    in_source: np.ndarray
    ids: np.ndarray | None
    tokens: np.ndarray | None


def context(block: Block) -> Context:
    n = len(block.example_index)
    parts, sides, positions, in_source, ids, tokens = [], [], [], [], [], []
    if block.source is not None:
        s = block.source.shape[1]
        parts.append(block.source)
        sides.append(np.zeros((n, s), np.int8))
        positions.append(np.broadcast_to(np.arange(s), (n, s)))
        in_source.append(np.ones((n, s), bool))
        ids.append(block.source_ids)
        tokens.append(block.source_tokens)
    if block.target is not None:
        t = block.target.shape[1]
        parts.append(block.target)
        rows = np.broadcast_to(np.arange(t), (n, t))
        prompt = rows < block.n_source[:, None]
        sides.append(np.where(prompt & (not block.encoder_decoder), 0, 1).astype(np.int8))
        positions.append(rows)
        in_source.append(np.zeros((n, t), bool))
        ids.append(block.target_ids)
        tokens.append(block.target_tokens)
    values = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    return Context(values=values, side=np.concatenate(sides, axis=1), position=np.concatenate(positions, axis=1),
                   in_source=np.concatenate(in_source, axis=1), ids=_joined(ids), tokens=_joined(tokens))


def _joined(parts: list[np.ndarray | None]) -> np.ndarray | None:
    if any(p is None for p in parts):
        return None
    return parts[0] if len(parts) == 1 else np.concatenate([np.asarray(p) for p in parts], axis=1)


# ---------------------------------------------------------------- filters


@dataclass(frozen=True)
class Condition:
    """One ``--where`` test: ``field op value``; fields are slot fields (``n_source``, ``n_target``, ``n_steps``,
    ``example_id``, ``example_index``) or keys of the example metadata (kept fields, ``text``...)."""

    field: str
    op: str
    value: str


OPERATORS = {"=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
             ">=": operator.ge}
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(!=|>=|<=|=|<|>)(.*)$")
NUMERIC_FIELDS = ("n_source", "n_target", "n_steps", "example_index")


def parse_where(items: Sequence[str] | None) -> tuple[Condition, ...]:
    """``["topic=science", "n_target>=40"]`` -> conditions. Conditions on different fields must all hold; several
    ``=`` conditions on one field are alternatives (``topic=science`` and ``topic=art``: either)."""
    out = []
    for item in items or ():
        match = _CONDITION.match(item)
        if not match:
            raise ValueError(f"--where expects FIELD=VALUE (or !=, <, <=, >, >=), got {item!r}")
        out.append(Condition(match.group(1), match.group(2), match.group(3).strip()))
    return tuple(out)


def selection(store: Store, where: Sequence[Condition | str] = (), chunk_slots: int = 65536) -> np.ndarray:
    """``[n_slots]`` bool: the slot holds a result (:attr:`Store.valid_slots`: its unit is complete, the example did
    not fail) that passes every condition. Reads the slot fields (and the metadata strings when a condition needs
    them) ``chunk_slots`` at a time."""
    conditions = tuple(c if isinstance(c, Condition) else parse_where([c])[0] for c in where)
    g = store.group
    keep = store.valid_slots.copy()
    if not conditions:
        return keep
    meta_fields = {c.field for c in conditions} - {*NUMERIC_FIELDS, "example_id"}
    seen: set[str] = set()
    for start in range(0, len(keep), chunk_slots):
        rows = slice(start, min(start + chunk_slots, len(keep)))
        fields = _slot_fields(g, rows)
        if meta_fields:
            metas = [json.loads(str(m) or "{}") for m in g["meta"][rows]]
            for m in metas:
                seen.update(m)
            for name in meta_fields:
                fields[name] = np.array([_meta_text(m.get(name)) for m in metas], dtype=object)
        keep[rows] &= _evaluate(conditions, fields)
    missing = sorted(meta_fields - seen)
    if missing:
        raise ValueError(f"--where: no example has field(s) {', '.join(map(repr, missing))} (slot fields: "
                         f"{', '.join((*NUMERIC_FIELDS, 'example_id'))}; metadata fields: "
                         f"{', '.join(sorted(seen)) or 'none'})")
    return keep


def _slot_fields(g, rows: slice) -> dict[str, np.ndarray]:
    start, end = g["attr_pos_start"][rows], g["attr_pos_end"][rows]
    return {"example_index": g["example_index"][rows], "n_source": g["n_source"][rows],
            "n_target": g["n_target"][rows], "n_steps": end - start,
            "example_id": np.asarray(g["example_id"][rows]).astype(object)}


def _meta_text(value) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _evaluate(conditions: Sequence[Condition], fields: Mapping[str, np.ndarray]) -> np.ndarray:
    n = len(fields["example_index"])
    result = np.ones(n, bool)
    alternatives: dict[str, np.ndarray] = {}
    for c in conditions:
        test = _test(fields[c.field], c)
        if c.op == "=":
            alternatives[c.field] = alternatives.get(c.field, np.zeros(n, bool)) | test
        else:
            result &= test
    for test in alternatives.values():
        result &= test
    return result


def _test(column: np.ndarray, c: Condition) -> np.ndarray:
    compare = OPERATORS[c.op]
    if c.field in NUMERIC_FIELDS:
        try:
            value = float(c.value)
        except ValueError:
            raise ValueError(f"--where: {c.field} is a number, got {c.value!r}") from None
        return compare(column.astype(np.float64), value)
    if c.op in ("=", "!="):  # an example without the field is != anything
        return np.array([compare(x, c.value) for x in column], bool)
    return np.array([x is not None and _ordered(compare, x, c.value) for x in column], bool)


def _ordered(compare, x: str, text: str) -> bool:
    """Numbers compare as numbers, anything else as strings."""
    try:
        return compare(float(x), float(text))
    except ValueError:
        return compare(x, text)


# ---------------------------------------------------------------- the task grid


@dataclass(frozen=True)
class Grid:
    """How a store is cut into blocks: ``slots`` per block (a multiple of the Zarr slot chunk) and the store's
    step chunk."""

    slots: int
    steps: int
    n_slots: int
    max_steps: int

    @property
    def shape(self) -> tuple[int, int]:
        return math.ceil(self.n_slots / self.slots), math.ceil(self.max_steps / self.steps)


def grid(store: Store, select: Mapping[str, int] | None = None, block_bytes: int = BLOCK_BYTES) -> Grid:
    schema = store.schema
    zarr_slots = _matrix_array(store).chunks[0]
    dims = [size for name, size in zip(schema.dims, schema.dim_sizes, strict=True) if name not in (select or {})]
    tokens = (schema.max_source if schema.source_attributions else 0) + (
        schema.max_target if schema.target_attributions else 0)
    per_slot = 4 * tokens * schema.steps_chunk * math.prod(dims)
    per_block = max(1, block_bytes // max(per_slot * zarr_slots, 1))
    slots = min(per_block * zarr_slots, math.ceil(schema.n_slots / zarr_slots) * zarr_slots)
    return Grid(slots=slots, steps=schema.steps_chunk, n_slots=schema.n_slots, max_steps=schema.max_steps)


def _matrix_array(store: Store):
    g = store.group
    for name in ("target_attributions", "source_attributions"):
        if name in g:
            return g[name]
    raise ValueError(f"{store.url} has no attribution matrices")


def check_select(store: Store, select: Mapping[str, int] | None) -> dict[str, int]:
    """Validate ``{dim: entry}`` (an index, negative from the end, or a label of the dim)."""
    schema = store.schema
    out = {}
    for name, entry in (select or {}).items():
        if name not in schema.dims:
            raise ValueError(f"--select: the store has no dim {name!r} (dims: {', '.join(schema.dims) or 'none'})")
        axis = schema.dims.index(name)
        size = schema.dim_sizes[axis]
        labels = schema.dim_labels[axis] if axis < len(schema.dim_labels) else ()
        if isinstance(entry, str) and not entry.lstrip("-").isdigit():
            if entry not in labels:
                raise ValueError(f"--select: {entry!r} is not an entry of {name} (labels: {', '.join(labels[:10])}"
                                 f"{'...' if len(labels) > 10 else ''})")
            index = labels.index(entry)
        else:
            index = int(entry)
            if not -size <= index < size:
                raise ValueError(f"--select: {name}={index} out of range (the store has {size})")
        out[name] = index % size
    return out


def map_blocks(store: Store, fn: Callable[[Block], object], *, selected: np.ndarray,
               select: Mapping[str, int] | None = None, ids: bool = False, tokens: bool = False,
               scores: bool = False, block_bytes: int = BLOCK_BYTES,
               name: str = "stats-block") -> tuple[np.ndarray, Grid]:
    """Delayed ``fn(block)`` for every block: an object array ``[slot blocks, step blocks]`` of
    ``dask.delayed`` values, and the grid. Arrays are read with ``dask.array.from_zarr`` in whole Zarr chunks."""
    import dask
    import dask.array as da

    schema, g = store.schema, store.group
    select = check_select(store, select)
    cut = grid(store, select, block_bytes)
    n_blocks, n_steps = cut.shape

    def matrix(array_name: str):
        if array_name not in g:
            return None
        arr = g[array_name]
        x = da.from_zarr(arr, chunks=(cut.slots, arr.shape[1], cut.steps, *arr.shape[3:]))
        if select:
            index = tuple(select.get(d, slice(None)) for d in schema.dims)
            x = x[(slice(None), slice(None), slice(None), *index)]
        return x.to_delayed().reshape(n_blocks, n_steps)

    def per_slot(array_name: str, columns: bool = False):
        arr = g[array_name]
        chunks = (cut.slots, *((cut.steps,) if columns else arr.shape[1:]))
        x = da.from_zarr(arr, chunks=chunks).to_delayed()
        return x.reshape(n_blocks, n_steps) if columns else x.reshape(n_blocks)

    src, tgt = matrix("source_attributions"), matrix("target_attributions")
    info = {f: per_slot(f) for f in SLOT_FIELDS}
    wanted = [*(("source_ids", "target_ids") if ids else ()), *(("source_tokens", "target_tokens") if tokens else ())]
    id_arrays = {f: per_slot(f) for f in wanted}
    score_arrays = {n: per_slot(f"score_{n}", columns=True) for n in schema.step_scores} if scores else {}
    delta_arrays = per_slot("deltas", columns=True) if scores and schema.deltas else None
    dims = tuple(d for d in schema.dims if d not in select)
    enc_dec = schema.source_attributions
    out = np.empty((n_blocks, n_steps), dtype=object)
    make = dask.delayed(_run_block, pure=True)
    for i in range(n_blocks):
        rows = slice(i * cut.slots, min((i + 1) * cut.slots, cut.n_slots))
        for j in range(n_steps):
            out[i, j] = make(fn, i * cut.slots, j * cut.steps, enc_dec, dims, selected[rows],
                             {f: info[f][i] for f in SLOT_FIELDS},
                             None if src is None else src[i, j], None if tgt is None else tgt[i, j],
                             {f: a[i] for f, a in id_arrays.items()},
                             {n: a[i, j] for n, a in score_arrays.items()},
                             None if delta_arrays is None else delta_arrays[i, j],
                             dask_key_name=f"{name}-{i}-{j}")
    return out, cut


def _run_block(fn, first_slot, first_step, enc_dec, dims, selected, info, source, target, ids, scores, deltas):
    block = Block(first_slot=first_slot, first_step=first_step, encoder_decoder=enc_dec, dims=dims,
                  example_index=info["example_index"], selected=selected,
                  n_source=info["n_source"].astype(np.int64), n_target=info["n_target"].astype(np.int64),
                  attr_pos_start=info["attr_pos_start"].astype(np.int64),
                  attr_pos_end=info["attr_pos_end"].astype(np.int64), source=source, target=target,
                  source_ids=ids.get("source_ids"), target_ids=ids.get("target_ids"), scores=scores or None,
                  deltas=deltas, source_tokens=ids.get("source_tokens"), target_tokens=ids.get("target_tokens"))
    return fn(block)


def tree(parts: Sequence, combine: Callable, split_every: int = 8, name: str = "stats-combine"):
    """Combine delayed values ``split_every`` at a time until one is left (a delayed value)."""
    import dask

    parts = list(parts)
    if not parts:
        raise ValueError("nothing to combine: the store has no blocks")
    level = 0
    while len(parts) > 1:
        parts = [dask.delayed(combine, pure=True)(*parts[i : i + split_every],
                                                  dask_key_name=f"{name}-{level}-{i // split_every}")
                 for i in range(0, len(parts), split_every)]
        level += 1
    return parts[0]


def compute(*values, workers: int | None = None):
    """Compute delayed values on the threaded scheduler (numpy and the Zarr codecs release the GIL)."""
    import dask

    return dask.compute(*values, scheduler="threads", num_workers=workers)


def _wave_size(workers: int | None) -> int:
    return max(1, (workers or os.cpu_count() or 1) * WAVE_PER_WORKER)


def waves(tasks: Sequence, workers: int | None = None):
    """Compute delayed ``tasks`` a wave of :data:`WAVE_PER_WORKER` tasks per thread at a time, yielding each wave's
    results.

    One graph over every block lets dask's scheduler read blocks ahead of the tasks that consume them, so memory
    would grow with the dataset; waves bound it to one wave of blocks."""
    size = _wave_size(workers)
    for start in range(0, len(tasks), size):
        yield compute(*tasks[start : start + size], workers=workers)


def reduce_waves(tasks: Sequence, combine: Callable, workers: int | None = None, name: str = "stats-combine"):
    """``combine`` of every task's result: a tree inside each wave (:func:`waves`), then across waves."""
    tasks = list(tasks)
    size = _wave_size(workers)
    total = None
    for start in range(0, len(tasks), size):
        (part,) = compute(tree(tasks[start : start + size], combine, name=f"{name}-{start}"), workers=workers)
        total = part if total is None else combine(total, part)
    return total
