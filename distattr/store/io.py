"""Creating, opening and writing distattr stores (the layout is in :mod:`distattr.store.layout`).

Writers are the Ray actors: each writes whole chunks of the units it runs, then marks them done; the driver
alone creates the store and updates its root attributes, so no two processes ever write the same object
concurrently (a retried unit rewrites its own chunks with the same values).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC

import numpy as np

from ..results import SequenceAttribution
from .errors import StorageFatal, StoreBusy, StoreError
from .faults import RetryCount, one_line, retrying
from .layout import (
    FORMAT,
    READ_VERSIONS,
    SLOT_INFO,
    STATUS_FAILED,
    STATUS_OK,
    VERSION,
    Schema,
    array_specs,
    dim_coordinates,
)

__all__ = ["SlotFailure", "SlotResult", "SlotStates", "StorageFatal", "StoreBusy", "StoreError", "create",
           "done_cells", "done_units", "exists", "failure_list", "failures", "open_group", "read_header",
           "save_outputs", "slot_states", "stored_targets", "valid_slots", "write_part", "write_part_failure",
           "write_targets"]


# zarr warns about any object at a group's root that is not part of the hierarchy: the lease is expected there
warnings.filterwarnings("ignore", message=r"Object at lease\.json is not recognized")


def open_group(url: str, mode: str, storage_options: dict | None = None):
    """The Zarr group at ``url`` (a local path or any fsspec URL, e.g. ``s3://bucket/run.zarr``)."""
    import zarr

    kwargs = {"storage_options": storage_options} if storage_options else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that its string dtype has no v3 spec yet
        return zarr.open_group(url, mode=mode, zarr_format=3, **kwargs)


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether anything (a store, another Zarr group, a file or folder) is at ``url``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.exists(path)


def read_header(url: str, storage_options: dict | None = None) -> dict:
    """The root attributes of the distattr store at ``url``; :class:`StoreError` if it is not one."""
    try:
        group = open_group(url, "r", storage_options)
    except Exception as err:  # FileNotFoundError, zarr's GroupNotFoundError, a folder that is not Zarr
        raise StoreError(f"{url} exists but is not a distattr store ({type(err).__name__}: {err})") from None
    attrs = group.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{url} is a Zarr group but not a distattr store (no format={FORMAT!r} attribute); "
                         "choose another --store path")
    if attrs.get("version") not in READ_VERSIONS:
        raise StoreError(f"{url} is a distattr store of layout version {attrs.get('version')}; this distattr "
                         f"reads versions {', '.join(map(str, READ_VERSIONS))}")
    return attrs


def create(url: str, schema: Schema, identity: dict, provenance: dict, storage_options: dict | None = None,
           overwrite: bool = False, *, unit_parts: Sequence[int] | None = None):
    """Create an empty store (status "writing") with every array of ``schema``, the extra dims' coordinates
    written and the metadata consolidated (what plain ``xarray.open_zarr`` needs: :mod:`~distattr.store.layout`).

    ``unit_parts``: ``[n_units]`` the number of parts of each unit (1 .. ``schema.max_parts``), from the driver's
    survey; a unit is complete once that many parts are marked done. None means one part per unit (a store
    written in whole units, e.g. by :func:`save_outputs`). With ``overwrite`` a distattr store at ``url`` is replaced
    whole, a ``lease.json`` included (check :func:`~distattr.store.lease.check_free` first); anything else there
    raises :class:`StoreError` and is left as it is."""
    from zarr.codecs import ZstdCodec

    parts = np.ones(schema.n_units, np.int16) if unit_parts is None else np.asarray(unit_parts)
    if parts.shape != (schema.n_units,) or not ((parts >= 1) & (parts <= schema.max_parts)).all():
        raise ValueError(f"unit_parts must hold one count in 1..{schema.max_parts} per unit ({schema.n_units} "
                         f"units), got shape {parts.shape} with range {parts.min(initial=0)}..{parts.max(initial=0)}")
    if overwrite:  # every replace path (--new-store, save_outputs, synthetic stores) deletes only a distattr store
        _check_replaceable(url, storage_options)
    group = open_group(url, "w" if overwrite else "w-", storage_options)
    # the header first: a store interrupted while being created is still recognised (and replaceable)
    group.attrs.update({"format": FORMAT, "version": VERSION, "status": "creating", "identity": identity,
                        "provenance": provenance, "schema": schema.to_json()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in array_specs(schema):
            group.create_array(spec.name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype,
                               fill_value=spec.fill, dimension_names=spec.dimension_names,
                               attributes=spec.attributes, compressors=ZstdCodec(level=3))
    group["unit_parts"][:] = parts.astype(np.int16)
    for dim, values in dim_coordinates(schema).items():
        group[dim][:] = values
    group = _consolidated(group)
    group.attrs.update({"status": "writing"})
    return group


def _consolidated(group):
    """The group with every array's metadata copied into its ``zarr.json`` (readers then open the store with one
    read, and ``xarray.open_zarr`` finds it without a warning); the group as it is on a store that cannot hold
    consolidated metadata. The arrays' metadata never changes after :func:`create`, so the copy stays true, and
    root attribute updates keep it."""
    import zarr

    if not getattr(group.store, "supports_consolidated_metadata", True):
        return group
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that consolidated metadata is not in the v3 spec (readers skip it)
        return zarr.consolidate_metadata(group.store, path=group.path or None, zarr_format=3)


def identity_differences(stored: dict, wanted: dict) -> list[str]:
    """Human-readable differences between two store identities (empty: the same job)."""
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: store has {stored.get(k)!r}, this job {wanted.get(k)!r}" for k in keys
            if json.dumps(stored.get(k), sort_keys=True) != json.dumps(wanted.get(k), sort_keys=True)]


def done_cells(group, schema: Schema) -> set[tuple[int, int]]:
    """``(unit, part)`` pairs marked done, found by listing the ``done`` array's chunk keys (one LIST request on
    object stores instead of one GET per cell)."""
    # A chunk key exists only while its cell holds 1: zarr stores no chunk equal to the fill value 0 (and deletes
    # one rewritten to 0), so the listing alone is the answer; no cell needs to be read.
    return _listed_cells(group, schema, "done")


def _listed_cells(group, schema: Schema, name: str) -> set[tuple[int, int]]:
    """The ``(unit, part)`` cells of a one-cell-chunk array ``[U, P]`` that are stored (differ from the fill)."""
    from zarr.core.sync import sync

    async def collect() -> list[str]:
        return [key async for key in group.store.list_prefix(_prefix(group, f"{name}/c/"))]

    cells = set()
    for key in sync(collect()):
        unit, part = (int(x) for x in key.rsplit("/", 2)[-2:])
        if unit < schema.n_units and part < schema.max_parts:
            cells.add((unit, part))
    return cells


def done_units(group, schema: Schema) -> np.ndarray:
    """``[n_units]`` bool: unit ``u`` is complete, i.e. ``done[u, p]`` is set for every ``p < unit_parts[u]``.

    Reads ``unit_parts`` (one chunk per 4096 units) and lists the done markers (:func:`done_cells`); no done cell is
    read."""
    parts = group["unit_parts"][:].astype(np.int64)
    count = np.zeros(schema.n_units, np.int64)
    for unit, part in done_cells(group, schema):
        if part < parts[unit]:
            count[unit] += 1
    return (parts > 0) & (count >= parts)


def part_errors(group, schema: Schema) -> dict[int, str]:
    """``{unit: message}`` for units with a ``part_error`` (the first failed part's message); found by listing,
    then reading only the stored cells."""
    out: dict[int, str] = {}
    for unit, part in sorted(_listed_cells(group, schema, "part_error")):
        message = str(group["part_error"][unit, part])
        if message and unit not in out:
            out[unit] = message
    return out


@dataclass(frozen=True)
class SlotStates:
    """What every slot holds, as readers must see it (the rules are in :mod:`distattr.store.layout`).

    ``example_index``: ``[N]`` int64 as stored; ``valid``: ``[N]`` bool, a result to read; ``failed``: ``[N]`` bool,
    an example of a complete unit that failed, ``messages[slot]`` saying why. Every other slot is absent."""

    example_index: np.ndarray
    valid: np.ndarray
    failed: np.ndarray
    messages: dict[int, str] = field(default_factory=dict)


def slot_states(group, schema: Schema) -> SlotStates:
    """Read ``example_index``, ``status``, the done markers and the failure messages once; see :class:`SlotStates`."""
    index = group["example_index"][:]
    status = group["status"][:]
    complete = np.repeat(done_units(group, schema), schema.unit_size)
    unit_errors = part_errors(group, schema)
    unit_failed = np.zeros(schema.n_units, bool)
    unit_failed[list(unit_errors)] = True
    unit_failed = np.repeat(unit_failed, schema.unit_size)
    written = complete & (index >= 0)
    failed = written & ((status == STATUS_FAILED) | unit_failed)
    valid = written & (status == STATUS_OK) & ~failed
    slots = np.flatnonzero(failed)
    texts = group["error"].get_coordinate_selection(slots) if len(slots) else []
    messages = {}
    for slot, text in zip(slots.tolist(), texts, strict=True):
        unit = slot // schema.unit_size
        messages[slot] = unit_errors.get(unit) or str(text) or "failed (no message)"
    return SlotStates(example_index=index, valid=valid, failed=failed, messages=messages)


def valid_slots(group, schema: Schema) -> np.ndarray:
    """``[n_slots]`` bool: the slot holds a result to read (complete unit, ``example_index >= 0``, status ok, no
    part error). Statistics and readers must treat every other slot as absent."""
    return slot_states(group, schema).valid


def failures(group, schema: Schema) -> list[tuple[int, str, str]]:
    """``(example_index, example_id, message)`` of every failed example of a complete unit, in dataset order."""
    return failure_list(group, slot_states(group, schema))


def failure_list(group, states: SlotStates) -> list[tuple[int, str, str]]:
    """:func:`failures` from slot states already read."""
    slots = np.flatnonzero(states.failed)
    if not len(slots):
        return []
    ids = group["example_id"].get_coordinate_selection(slots)
    rows = [(int(states.example_index[s]), str(i), states.messages[int(s)]) for s, i in zip(slots, ids, strict=True)]
    return sorted(rows)


def _prefix(group, key: str) -> str:
    return f"{group.path}/{key}" if group.path else key


# ---------------------------------------------------------------- writing one unit part


@dataclass(frozen=True)
class SlotResult:
    """One example's share of a unit part: its attribution (possibly a column range of it) and slot info."""

    slot: int  # position inside the unit
    index: int  # dataset position
    example_id: str
    meta: dict
    seq: SequenceAttribution
    attr_pos: tuple[int, int]  # the example's whole attributed range of target positions
    column: int  # store column of the first column of ``seq``


@dataclass(frozen=True)
class SlotFailure:
    """An example of a unit part that failed: its slot info (tokens when known) and a one-line ``error``; it is
    stored with status 2 and no attribution values."""

    slot: int  # position inside the unit
    index: int  # dataset position
    example_id: str
    meta: dict
    error: str
    source_ids: tuple[int, ...] = ()
    target_ids: tuple[int, ...] = ()
    source_tokens: tuple[str, ...] = ()
    target_tokens: tuple[str, ...] = ()


def store_url(group) -> str:
    """Where ``group`` lives, for messages (``file:///...``, ``s3://bucket/run.zarr``)."""
    store = group.store
    if hasattr(store, "fs") and hasattr(store, "path"):  # zarr's FsspecStore
        protocol = store.fs.protocol[0] if isinstance(store.fs.protocol, tuple | list) else store.fs.protocol
        url = f"{protocol}://{store.path}"
    else:
        url = str(store)
    return f"{url.rstrip('/')}/{group.path}" if group.path else url


def _writer(group, what: str, counter: RetryCount | None):
    """``write(name, selection, value)``: one array write, retried on transient storage faults."""
    where = f"{store_url(group)} ({what})"

    def write(name: str, selection, value) -> None:
        def put() -> None:
            group[name][selection] = value

        retrying(put, what=where, counter=counter)

    return write


def write_part(group, schema: Schema, unit: int, part: int, n_parts: int, results: Sequence[SlotResult],
               failures: Sequence[SlotFailure] = (), *, counter: RetryCount | None = None) -> None:
    """Write part ``part`` of unit ``unit`` (whole chunks only) and mark it done last.

    Part 0 writes the slot arrays (``[unit_size]`` rows: ``results`` with status 1, ``failures`` with status 2 and
    their message, ``n_target`` after ``target_ids``); every part writes its step columns of the value arrays
    (columns ``[part * steps_chunk, ...)`` of a split unit, all of them otherwise). Parts > 0 write no slot arrays
    (another part may be writing them): their failures go through :func:`write_part_failure`. Each write is retried
    on transient storage faults (counted in ``counter``); fatal ones raise :class:`StorageFatal`."""
    if failures and part != 0:
        raise ValueError(f"unit {unit} part {part}: only part 0 writes slot arrays; record a failure of a later part "
                         "with write_part_failure")
    slots = [r.slot for r in results] + [f.slot for f in failures]
    if len(set(slots)) != len(slots) or not all(0 <= j < schema.unit_size for j in slots):
        raise ValueError(f"unit {unit} part {part}: slots must be distinct and in 0..{schema.unit_size - 1}, got "
                         f"{sorted(slots)}")
    base, k = unit * schema.unit_size, schema.unit_size
    rows = slice(base, base + k)
    for r in results:
        _check_bounds(schema, r)
    write = _writer(group, f"writing unit {unit}, part {part}", counter)
    if part == 0:
        for name, block in _slot_blocks(schema, results, failures).items():
            write(name, rows, block)
    if n_parts == 1:
        c0, c1 = 0, schema.max_steps
    else:
        c0 = part * schema.steps_chunk
        c1 = min(c0 + schema.steps_chunk, schema.max_steps)
    for name, block in _column_blocks(schema, results, c0, c1).items():
        write(name, (rows, slice(c0, c1)) if block.ndim == 2 else (rows, slice(None), slice(c0, c1)), block)
    if part > 0:  # a part that failed before and now succeeds: its message goes (no object stays for the fill "")
        write("part_error", (unit, part), "")
    write("done", (unit, part), 1)


def write_part_failure(group, schema: Schema, unit: int, part: int, message: str, *,
                       counter: RetryCount | None = None) -> None:
    """Record that part ``part`` (> 0) of split unit ``unit`` failed: ``part_error[unit, part]`` (one line), then its
    done marker. Readers then treat the unit's example as failed with this message. (Part 0 records failures
    with ``write_part(..., failures=...)``, which also stores the example's id.)"""
    if part == 0:
        raise ValueError(f"unit {unit}: part 0 records failures with write_part(..., failures=[SlotFailure(...)])")
    if not 0 < part < schema.max_parts:
        raise ValueError(f"part {part} out of range: the store's units have at most {schema.max_parts} parts")
    write = _writer(group, f"writing the failure of unit {unit}, part {part}", counter)
    write("part_error", (unit, part), one_line(message) or "failed (no message)")
    write("done", (unit, part), 1)


def write_targets(group, schema: Schema, unit: int, result: SlotResult, *, counter: RetryCount | None = None) -> None:
    """Store the generation of split unit ``unit`` (one example, in slot 0) before its parts are attributed: the
    slot arrays of the unit except ``status`` and ``error``, ``n_target`` written last, so that ``n_target >= 0``
    proves ``target_ids`` complete. A resumed job reads it back with :func:`stored_targets`. Marks nothing done."""
    if result.slot != 0:
        raise ValueError(f"a split unit holds one example, in slot 0; got slot {result.slot}")
    _check_bounds(schema, result)
    base = unit * schema.unit_size
    rows = slice(base, base + schema.unit_size)
    write = _writer(group, f"writing the targets of unit {unit}", counter)
    for name, block in _slot_blocks(schema, [result], ()).items():
        if name not in ("status", "error"):  # a later part may already be done: status belongs to part 0
            write(name, rows, block)


def stored_targets(group, schema: Schema, unit: int) -> list[int] | None:
    """The target ids stored for slot 0 of ``unit`` (by :func:`write_targets` or part 0), or None when none are
    complete (``n_target`` < 0)."""
    slot = unit * schema.unit_size
    n = int(group["n_target"][slot])
    if n < 0:
        return None
    return [int(x) for x in group["target_ids"][slot, :n]]


def _check_bounds(schema: Schema, r: SlotResult) -> None:
    seq = r.seq
    n_src, n_tgt = len(seq.source_ids), len(seq.target_ids)
    columns = seq.attr_pos_end - seq.attr_pos_start
    problems = []
    if n_src > schema.max_source:
        problems.append(f"{n_src} source tokens > the store's {schema.max_source}")
    if n_tgt > schema.max_target:
        problems.append(f"{n_tgt} target tokens > the store's {schema.max_target}")
    if r.column + columns > schema.max_steps:
        problems.append(f"{r.column + columns} steps > the store's {schema.max_steps}")
    if problems:
        raise StoreError(f"example {r.example_id!r} does not fit the store: {'; '.join(problems)} (the bounds "
                         "come from max_new_tokens and the data; a re-tokenized encoder-decoder target can exceed "
                         "them: rerun with a larger max_new_tokens)")


def _slot_blocks(schema: Schema, results: Sequence[SlotResult],
                 failures: Sequence[SlotFailure]) -> dict[str, np.ndarray]:
    """The unit's slot arrays (``[unit_size]`` or ``[unit_size, tokens]``), in write order: ``n_target`` after
    ``target_ids``."""
    k, s, t = schema.unit_size, schema.max_source, schema.max_target
    blocks = {
        "example_index": np.full(k, -1, np.int64),
        "example_id": np.full(k, "", dtype=object),
        "meta": np.full(k, "", dtype=object),
        "status": np.zeros(k, np.int8), "error": np.full(k, "", dtype=object),
        "n_source": np.full(k, -1, np.int32),
        "attr_pos_start": np.full(k, -1, np.int32), "attr_pos_end": np.full(k, -1, np.int32),
        "source_ids": np.full((k, s), -1, np.int32), "source_tokens": np.full((k, s), "", dtype=object),
        "target_ids": np.full((k, t), -1, np.int32), "target_tokens": np.full((k, t), "", dtype=object),
        "n_target": np.full(k, -1, np.int32),
    }
    assert set(SLOT_INFO) <= set(blocks) and list(blocks)[-1] == "n_target"
    for r in results:
        j, seq = r.slot, r.seq
        blocks["example_index"][j] = r.index
        blocks["example_id"][j] = r.example_id
        blocks["meta"][j] = json.dumps(r.meta, ensure_ascii=False)
        blocks["status"][j] = STATUS_OK
        blocks["n_source"][j], blocks["n_target"][j] = len(seq.source_ids), len(seq.target_ids)
        blocks["attr_pos_start"][j], blocks["attr_pos_end"][j] = r.attr_pos
        blocks["source_ids"][j, : len(seq.source_ids)] = seq.source_ids
        blocks["source_tokens"][j, : len(seq.source_tokens)] = seq.source_tokens
        blocks["target_ids"][j, : len(seq.target_ids)] = seq.target_ids
        blocks["target_tokens"][j, : len(seq.target_tokens)] = seq.target_tokens
    for f in failures:  # tokens beyond the store's bounds (perhaps the reason it failed) are cut
        j = f.slot
        blocks["example_index"][j] = f.index
        blocks["example_id"][j] = f.example_id
        blocks["meta"][j] = json.dumps(f.meta, ensure_ascii=False)
        blocks["status"][j] = STATUS_FAILED
        blocks["error"][j] = one_line(f.error) or "failed (no message)"
        src, tgt = tuple(f.source_ids)[:s], tuple(f.target_ids)[:t]
        blocks["n_source"][j] = len(src) if src else -1
        blocks["n_target"][j] = len(tgt) if tgt else -1
        blocks["source_ids"][j, : len(src)] = src
        blocks["source_tokens"][j, : min(len(f.source_tokens), s)] = tuple(f.source_tokens)[:s]
        blocks["target_ids"][j, : len(tgt)] = tgt
        blocks["target_tokens"][j, : min(len(f.target_tokens), t)] = tuple(f.target_tokens)[:t]
    return blocks


def _column_blocks(schema: Schema, results: Sequence[SlotResult], c0: int, c1: int) -> dict[str, np.ndarray]:
    k, width, dims = schema.unit_size, c1 - c0, schema.dim_sizes
    blocks: dict[str, np.ndarray] = {}
    if schema.source_attributions:
        blocks["source_attributions"] = np.full((k, schema.max_source, width, *dims), np.nan, np.float32)
    if schema.target_attributions:
        blocks["target_attributions"] = np.full((k, schema.max_target, width, *dims), np.nan, np.float32)
    for name in schema.step_scores:
        blocks[f"score_{name}"] = np.full((k, width), np.nan, np.float32)
    if schema.deltas:
        blocks["deltas"] = np.full((k, width), np.nan, np.float32)
    for r in results:
        seq, j = r.seq, r.slot
        cols = slice(r.column - c0, r.column - c0 + seq.attr_pos_end - seq.attr_pos_start)
        if schema.source_attributions and seq.source_attributions is not None:
            blocks["source_attributions"][j, : seq.source_attributions.shape[0], cols] = seq.source_attributions
        if schema.target_attributions and seq.target_attributions is not None:
            blocks["target_attributions"][j, : seq.target_attributions.shape[0], cols] = seq.target_attributions
        for name in schema.step_scores:
            if name in seq.step_scores:  # an example with nothing generated has no steps
                blocks[f"score_{name}"][j, cols] = seq.step_scores[name]
        if schema.deltas and seq.deltas is not None:
            blocks["deltas"][j, cols] = seq.deltas
    return blocks


# ---------------------------------------------------------------- one process: results already in memory


def save_outputs(url: str, outputs, *, ids=None, metas=None, unit_size: int = 16, identity: dict | None = None,
                 storage_options: dict | None = None, overwrite: bool = False):
    """Write in-memory results (one or more :class:`~distattr.results.AttributionOutput`, all from the same
    method) as a complete store, without Ray: e.g. a case study's results, or synthetic data for statistics.

    ``ids`` / ``metas``: one id string / metadata dict per example (default: positions, the output's
    ``info``). The identity defaults to the first output's method description. ``overwrite`` replaces only a
    distattr store (:func:`create` checks): anything else at ``url`` (a file, a folder, another Zarr group) raises
    :class:`StoreError` and is left as it is."""
    from ..results import AttributionOutput

    outputs = [outputs] if isinstance(outputs, AttributionOutput) else list(outputs)
    seqs = [seq for out in outputs for seq in out.sequences]
    if not seqs:
        raise ValueError("no results to save")
    infos = [(out.info, j) for out in outputs for j in range(len(out.sequences))]  # (info, position in its output)
    ids = [str(i) for i in range(len(seqs))] if ids is None else [str(i) for i in ids]
    if len(ids) != len(seqs) or len(set(ids)) != len(ids):
        raise ValueError(f"need {len(seqs)} unique ids, got {len(ids)} ({len(set(ids))} distinct)")
    first = seqs[0]
    matrix = first.target_attributions if first.target_attributions is not None else first.source_attributions
    schema = Schema(
        n_units=-(-len(seqs) // unit_size), unit_size=unit_size,
        max_source=max(len(s.source_ids) for s in seqs), max_target=max(len(s.target_ids) for s in seqs),
        max_steps=max(max(s.attr_pos_end - s.attr_pos_start for s in seqs), 1),
        steps_chunk=max(max(s.attr_pos_end - s.attr_pos_start for s in seqs), 1),
        source_attributions=first.source_attributions is not None,
        target_attributions=first.target_attributions is not None,
        dims=tuple(first.dims), dim_sizes=tuple(matrix.shape[2:]) if matrix is not None else (),
        dim_labels=tuple(first.dim_labels), step_scores=tuple(first.step_scores), deltas=first.deltas is not None)
    info = infos[0][0]
    identity = identity or {"model": info.get("model_name"), "method": info.get("attribution_method"),
                            "method_args": info.get("attribution_args"), "attributed_fn": info.get("attributed_fn"),
                            "n_examples": len(seqs), "source": "save_outputs"}
    identity = {**identity, "n_examples": len(seqs)}
    provenance = {"model": {k: v for k, v in info.items() if k.startswith(("model_", "tokenizer_", "dtype"))},
                  "versions": info.get("versions", {}), "created": now_utc()}
    group = create(url, schema, identity, provenance, storage_options, overwrite=overwrite,
                   unit_parts=[1] * schema.n_units)
    for unit in range(schema.n_units):
        chunk = range(unit * unit_size, min((unit + 1) * unit_size, len(seqs)))
        results = [SlotResult(slot=i - unit * unit_size, index=i, example_id=ids[i],
                              meta=(metas[i] if metas is not None else _info_meta(*infos[i])), seq=seqs[i],
                              attr_pos=(seqs[i].attr_pos_start, seqs[i].attr_pos_end), column=0) for i in chunk]
        write_part(group, schema, unit, 0, 1, results)
    group.attrs.update({"status": "complete"})
    return group


def _check_replaceable(url: str, storage_options: dict | None = None) -> None:
    """Before replacing what is at ``url``: nothing, or a distattr store (of any status, even one interrupted while
    being created); :class:`StoreError` for anything else, so that other data is never deleted."""
    if exists(url, storage_options):
        try:
            read_header(url, storage_options)
        except StoreError as err:
            raise StoreError(f"overwrite=True replaces only a distattr store; left {url} as it is: {err}") from None


def _info_meta(info: dict, j: int) -> dict:
    """Example ``j`` of an output's input and generated texts."""
    out = {}
    for key, name in (("input_texts", "text"), ("generated_texts", "generated_text")):
        values = info.get(key)
        if isinstance(values, list) and j < len(values):
            out[name] = values[j]
    return out


def now_utc() -> str:
    """The time stamps of store attributes: UTC, ISO 8601, seconds."""
    from datetime import datetime

    return datetime.now(UTC).isoformat(timespec="seconds")
