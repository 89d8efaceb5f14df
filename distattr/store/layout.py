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
``layer``, ``head``...      [D_i] str / int64   each extra dim's labels, a coordinate (set by ``create``)
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

Reading without distattr. A store is plain Zarr v3 that ``xarray.open_zarr(path)`` (default arguments) and
``zarr.open(path, mode="r")`` read with no distattr import and no extra codecs:

- every array names its dims (Zarr v3 ``dimension_names``): ``slot``, ``source_token``, ``target_token``, ``step``,
  the method's extra dims (``layer``, ``head``...), and ``unit``, ``part`` for the arrays over units; a dim
  has the same length in every array that has it;
- each extra dim has a coordinate array named like it (``[size]``, written by ``create``): the method's labels,
  e.g. module names, or int64 indices where the labels are ``"0", "1", ...`` or absent (:func:`dim_coordinates`);
- ``example_index`` and ``example_id`` are coordinates of every per-slot array (the CF ``coordinates``
  attribute, which xarray decodes);
- strings are Zarr v3 ``string`` (variable-length UTF-8, codec ``vlen-utf8`` then ``zstd``), read by
  zarr-python >= 3 and xarray as numpy strings; the metadata is consolidated into the root ``zarr.json``
  (``must_understand: false``: readers that do not know it read each array's own metadata).

Slots are *not* in dataset order: the planner sorts examples by length within windows of units
(:mod:`distattr.jobs.plan`; :func:`~distattr.statistics.synthetic.write_synthetic_store` sorts within slabs;
only :func:`~distattr.store.io.save_outputs` keeps dataset order), so ``example_index`` (the dataset position) is
the key to sort or select by. A slot that is empty or not written yet reads as its fill: ``example_index`` -1,
``status`` 0, ints -1, floats NaN, strings "". A plain reader keeps the slots that hold a result, in dataset
order, with the rules above (for a complete store, ``status == 1`` and no ``part_error`` of the unit suffice)::

    ds = xarray.open_zarr(path)
    unit_ok = (ds.done.sum("part") >= ds.unit_parts) & ~(ds.part_error != "").any("part")
    ok = numpy.repeat(unit_ok.values, ds.attrs["schema"]["unit_size"]) & (ds.status.values == 1)
    examples = ds.isel(slot=numpy.flatnonzero(ok)).sortby("example_index")

Layout versions: 3 added the extra dims' coordinate arrays, the ``coordinates`` attributes, Zstd on string
arrays and consolidated metadata; version 2 stores (no coordinate arrays) are still read, and resumed as
version 2 (their arrays are written the same way).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

FORMAT = "distattr.store"
VERSION = 3
READ_VERSIONS = (2, 3)  # layouts this distattr reads (and resumes: version 2 arrays are written the same way)
CHUNK_BYTES = 8 << 20  # most uncompressed bytes per chunk of an attribution array
SLOT_INFO = ("example_index", "example_id", "meta", "n_source", "n_target", "attr_pos_start", "attr_pos_end",
             "status", "error")
UNIT_PARTS_CHUNK = 4096  # units per chunk of ``unit_parts``
STATUS_EMPTY, STATUS_OK, STATUS_FAILED = 0, 1, 2
SLOT_COORDS = ("example_index", "example_id")  # coordinates of every per-slot array (CF ``coordinates``)
BASE_DIMS = ("slot", "source_token", "target_token", "step", "unit", "part")


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
    coords: tuple[str, ...] = ()  # the array's non-dimension coordinates (its ``coordinates`` attribute)

    @property
    def attributes(self) -> dict:
        return {"coordinates": " ".join(self.coords)} if self.coords else {}


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


def dim_coordinates(schema: Schema) -> dict[str, np.ndarray]:
    """The coordinate of each extra dim (``{"layer": [...], "head": [...]}``): its labels as strings, or int64
    indices where the labels are absent or are the indices written out (``"0", "1", ...``, e.g. attention's
    layers and heads)."""
    out = {}
    for axis, (dim, size) in enumerate(zip(schema.dims, schema.dim_sizes, strict=True)):
        labels = tuple(schema.dim_labels[axis]) if axis < len(schema.dim_labels) else ()
        if len(labels) != size or labels == tuple(str(j) for j in range(size)):
            out[dim] = np.arange(size, dtype=np.int64)
        else:
            out[dim] = np.array(labels, dtype=object)
    return out


def array_specs(schema: Schema) -> list[ArraySpec]:
    """Every array of a store with this schema; the extra dims' coordinate arrays (:func:`dim_coordinates`) last."""
    n, k, s, t, c = schema.n_slots, schema.unit_size, schema.max_source, schema.max_target, schema.steps_chunk
    steps = schema.max_steps
    dim_names = tuple(schema.dims)
    co = SLOT_COORDS
    specs = [
        ArraySpec("example_index", (n,), (k,), "int64", -1, ("slot",)),
        ArraySpec("example_id", (n,), (k,), str, "", ("slot",)),
        ArraySpec("status", (n,), (k,), "int8", STATUS_EMPTY, ("slot",), co),
        ArraySpec("error", (n,), (k,), str, "", ("slot",), co),
        ArraySpec("meta", (n,), (k,), str, "", ("slot",), co),
        ArraySpec("n_source", (n,), (k,), "int32", -1, ("slot",), co),
        ArraySpec("n_target", (n,), (k,), "int32", -1, ("slot",), co),
        ArraySpec("attr_pos_start", (n,), (k,), "int32", -1, ("slot",), co),
        ArraySpec("attr_pos_end", (n,), (k,), "int32", -1, ("slot",), co),
        ArraySpec("source_ids", (n, s), (k, s), "int32", -1, ("slot", "source_token"), co),
        ArraySpec("source_tokens", (n, s), (k, s), str, "", ("slot", "source_token"), co),
        ArraySpec("target_ids", (n, t), (k, t), "int32", -1, ("slot", "target_token"), co),
        ArraySpec("target_tokens", (n, t), (k, t), str, "", ("slot", "target_token"), co),
        ArraySpec("done", (schema.n_units, schema.max_parts), (1, 1), "int8", 0, ("unit", "part")),
        ArraySpec("unit_parts", (schema.n_units,), (min(UNIT_PARTS_CHUNK, schema.n_units),), "int16", 0, ("unit",)),
        ArraySpec("part_error", (schema.n_units, schema.max_parts), (1, 1), str, "", ("unit", "part")),
    ]
    if schema.source_attributions:
        specs.append(ArraySpec("source_attributions", (n, s, steps, *schema.dim_sizes), matrix_chunks(schema, s),
                               "float32", np.nan, ("slot", "source_token", "step", *dim_names), co))
    if schema.target_attributions:
        specs.append(ArraySpec("target_attributions", (n, t, steps, *schema.dim_sizes), matrix_chunks(schema, t),
                               "float32", np.nan, ("slot", "target_token", "step", *dim_names), co))
    for name in schema.step_scores:
        specs.append(ArraySpec(f"score_{name}", (n, steps), (k, c), "float32", np.nan, ("slot", "step"), co))
    if schema.deltas:
        specs.append(ArraySpec("deltas", (n, steps), (k, c), "float32", np.nan, ("slot", "step"), co))
    taken = {spec.name for spec in specs} | set(BASE_DIMS)
    clash = sorted(set(dim_names) & taken)
    if clash or len(set(dim_names)) != len(dim_names):
        raise ValueError(f"extra dims {dim_names} must be distinct and differ from the store's arrays and dims "
                         f"{sorted(taken)}; clash: {clash or 'a repeated name'}")
    for dim, values in dim_coordinates(schema).items():
        dtype, fill = (str, "") if values.dtype == object else ("int64", -1)
        specs.append(ArraySpec(dim, values.shape, (max(len(values), 1),), dtype, fill, (dim,)))
    return specs
