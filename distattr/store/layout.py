"""The Zarr layout of a distattr store: padded arrays over slots, chunked so that work units never share a chunk.

A store is one Zarr v3 group. Every example occupies one *slot* (row 0 of every per-example array); unit ``u``
owns slots ``[u * unit_size, (u + 1) * unit_size)`` and every chunk lies inside one unit, so concurrent writers
need no locks and a retried unit rewrites exactly its own chunks. Token axes are padded to the dataset's bounds
(``max_source``, ``max_target``), step axes to ``max_steps`` and chunked by ``steps_chunk`` columns: the parts of
a split example own whole step chunks. Padding is NaN (floats), -1 (ints) or "" (strings); padding compresses
to almost nothing with Zstd and unwritten chunks are not stored at all.

Arrays (N = n_units * unit_size slots, S = max_source, T = max_target, K = max_steps, D = extra dims):

==========================  ==================  =====================================================
``example_index``           [N] int64           dataset position of the slot's example (-1: empty)
``status``                  [N] int8            0: not written, 1: ok, 2: failed (see ``error``)
``error``                   [N] str             why the example failed (one line; "" unless status 2)
``example_id``              [N] str             the example's id
``meta``                    [N] str             JSON: input text, generated text, kept fields
``n_source`` ``n_target``   [N] int32           token counts
``attr_pos_start/_end``     [N] int32           the attributed target positions (columns)
``source_ids`` / tokens     [N, S] int32 / str  encoder input (or prompt) tokens
``target_ids`` / tokens     [N, T] int32 / str  target tokens (decoder-only: prompt + generation)
``source_attributions``     [N, S, K, *D] f32   encoder-decoder models only
``target_attributions``     [N, T, K, *D] f32
``score_<name>``            [N, K] f32          one per step score
``deltas``                  [N, K] f32          completeness error, for methods that report it
``done``                    [U, P] int8         1 once part p of unit u is written (chunks of one cell)
``unit_parts``              [U] int16           how many parts unit u has (set by ``create``; 4096 a chunk)
``part_error``              [U, P] str          why part p > 0 of a split unit failed (chunks of one cell)
==========================  ==================  =====================================================

What a reader may trust: ``done`` is the only truth. Unit ``u`` is *complete* when ``done[u, p]`` is set for every
``p < unit_parts[u]`` (writers set it last, after every chunk of the part). A slot holds a result only when its unit
is complete, ``example_index >= 0``, ``status`` is 1 and no ``part_error`` of its unit is set; a slot of a
complete unit with ``status`` 2 or a ``part_error`` is a failed example (``error`` / ``part_error`` say why); every
other slot is absent, whatever its arrays hold (a crash between the data and the marker leaves such slots). Within
part 0, ``n_target`` is written after ``target_ids``, so ``n_target >= 0`` proves the target ids complete (a split
unit's stored generation, reused on resume). A ``lease.json`` object at the root (not part of Zarr) names the
driver that holds the store (:mod:`distattr.store.lease`).

Root attributes: ``format``, ``version``, ``status`` ("writing" until every unit is done, then "complete"),
``identity`` (what the values depend on: a store is only resumed by the same identity), ``provenance``
(versions, model description, times) and ``schema`` (this layout's sizes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

FORMAT = "distattr.store"
VERSION = 2
CHUNK_BYTES = 8 << 20  # most uncompressed bytes per chunk of an attribution array
SLOT_INFO = ("example_index", "example_id", "meta", "n_source", "n_target", "attr_pos_start", "attr_pos_end",
             "status", "error")
UNIT_PARTS_CHUNK = 4096  # units per chunk of ``unit_parts``
STATUS_EMPTY, STATUS_OK, STATUS_FAILED = 0, 1, 2


@dataclass(frozen=True)
class Schema:
    """The sizes of a store's arrays, fixed when it is created."""

    n_units: int
    unit_size: int
    max_source: int
    max_target: int
    max_steps: int
    steps_chunk: int
    source_attributions: bool  # encoder-decoder models have source matrices
    target_attributions: bool
    dims: tuple[str, ...] = ()  # extra dims of the matrices, e.g. ("layer", "head")
    dim_sizes: tuple[int, ...] = ()
    dim_labels: tuple[tuple[str, ...], ...] = ()
    step_scores: tuple[str, ...] = ()
    deltas: bool = False

    @property
    def n_slots(self) -> int:
        return self.n_units * self.unit_size

    @property
    def max_parts(self) -> int:
        return math.ceil(self.max_steps / self.steps_chunk)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Schema:
        data = dict(data)
        for key in ("dims", "dim_sizes", "step_scores"):
            data[key] = tuple(data.get(key, ()))
        data["dim_labels"] = tuple(tuple(x) for x in data.get("dim_labels", ()))
        return cls(**data)


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: object
    fill: object
    dimension_names: tuple[str, ...]


def matrix_chunks(schema: Schema, tokens: int) -> tuple[int, ...]:
    """Chunks of an attribution matrix [N, tokens, K, *D]: whole token axis, ``steps_chunk`` columns, as many
    slots of one unit as fit in :data:`CHUNK_BYTES` (a divisor of ``unit_size``), then extra dims split."""
    dims = list(schema.dim_sizes)
    per_slot = 4 * tokens * schema.steps_chunk * math.prod(dims)
    slots = schema.unit_size
    while slots > 1 and slots * per_slot > CHUNK_BYTES:
        slots = max(d for d in range(1, slots) if schema.unit_size % d == 0)
    for i in range(len(dims)):  # still too big for one slot: split the extra dims, first ones first
        while dims[i] > 1 and 4 * tokens * schema.steps_chunk * math.prod(dims) > CHUNK_BYTES:
            dims[i] = math.ceil(dims[i] / 2)
    return (slots, tokens, schema.steps_chunk, *dims)


UNIT_ARRAYS = ("done", "unit_parts", "part_error")  # the arrays over units, not slots


def array_specs(schema: Schema) -> list[ArraySpec]:
    """Every array of a store with this schema."""
    n, k, s, t, c = schema.n_slots, schema.unit_size, schema.max_source, schema.max_target, schema.steps_chunk
    steps = schema.max_steps
    dim_names = tuple(schema.dims)
    specs = [
        ArraySpec("example_index", (n,), (k,), "int64", -1, ("slot",)),
        ArraySpec("example_id", (n,), (k,), str, "", ("slot",)),
        ArraySpec("status", (n,), (k,), "int8", STATUS_EMPTY, ("slot",)),
        ArraySpec("error", (n,), (k,), str, "", ("slot",)),
        ArraySpec("meta", (n,), (k,), str, "", ("slot",)),
        ArraySpec("n_source", (n,), (k,), "int32", -1, ("slot",)),
        ArraySpec("n_target", (n,), (k,), "int32", -1, ("slot",)),
        ArraySpec("attr_pos_start", (n,), (k,), "int32", -1, ("slot",)),
        ArraySpec("attr_pos_end", (n,), (k,), "int32", -1, ("slot",)),
        ArraySpec("source_ids", (n, s), (k, s), "int32", -1, ("slot", "source_token")),
        ArraySpec("source_tokens", (n, s), (k, s), str, "", ("slot", "source_token")),
        ArraySpec("target_ids", (n, t), (k, t), "int32", -1, ("slot", "target_token")),
        ArraySpec("target_tokens", (n, t), (k, t), str, "", ("slot", "target_token")),
        ArraySpec("done", (schema.n_units, schema.max_parts), (1, 1), "int8", 0, ("unit", "part")),
        ArraySpec("unit_parts", (schema.n_units,), (min(UNIT_PARTS_CHUNK, schema.n_units),), "int16", 0, ("unit",)),
        ArraySpec("part_error", (schema.n_units, schema.max_parts), (1, 1), str, "", ("unit", "part")),
    ]
    if schema.source_attributions:
        specs.append(ArraySpec("source_attributions", (n, s, steps, *schema.dim_sizes), matrix_chunks(schema, s),
                               "float32", np.nan, ("slot", "source_token", "step", *dim_names)))
    if schema.target_attributions:
        specs.append(ArraySpec("target_attributions", (n, t, steps, *schema.dim_sizes), matrix_chunks(schema, t),
                               "float32", np.nan, ("slot", "target_token", "step", *dim_names)))
    for name in schema.step_scores:
        specs.append(ArraySpec(f"score_{name}", (n, steps), (k, c), "float32", np.nan, ("slot", "step")))
    if schema.deltas:
        specs.append(ArraySpec("deltas", (n, steps), (k, c), "float32", np.nan, ("slot", "step")))
    return specs
