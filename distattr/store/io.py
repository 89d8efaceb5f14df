"""Creating, opening and writing distattr stores (the layout is in :mod:`distattr.store.layout`).

Writers are the Ray actors: each writes whole chunks of the units it runs, then marks them done; the driver
alone creates the store and updates its root attributes, so no two processes ever write the same object
concurrently (a retried unit rewrites its own chunks with the same values).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np

from ..results import SequenceAttribution
from .layout import FORMAT, SLOT_INFO, VERSION, Schema, array_specs


class StoreError(ValueError):
    """A store that cannot be used as asked: not a distattr store, written by another job, incomplete."""


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
    if attrs.get("version") != VERSION:
        raise StoreError(f"{url} is a distattr store of layout version {attrs.get('version')}; this distattr "
                         f"reads version {VERSION}")
    return attrs


def create(url: str, schema: Schema, identity: dict, provenance: dict, storage_options: dict | None = None,
           overwrite: bool = False):
    """Create an empty store (status "writing") with every array of ``schema``."""
    from zarr.codecs import ZstdCodec

    group = open_group(url, "w" if overwrite else "w-", storage_options)
    # the header first: a store interrupted while being created is still recognised (and replaceable)
    group.attrs.update({"format": FORMAT, "version": VERSION, "status": "creating", "identity": identity,
                        "provenance": provenance, "schema": schema.to_json()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in array_specs(schema):
            group.create_array(spec.name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype,
                               fill_value=spec.fill, dimension_names=spec.dimension_names,
                               compressors=None if spec.dtype is str else ZstdCodec(level=3))
    group.attrs.update({"status": "writing"})
    return group


def identity_differences(stored: dict, wanted: dict) -> list[str]:
    """Human-readable differences between two store identities (empty: the same job)."""
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: store has {stored.get(k)!r}, this job {wanted.get(k)!r}" for k in keys
            if json.dumps(stored.get(k), sort_keys=True) != json.dumps(wanted.get(k), sort_keys=True)]


def done_cells(group, schema: Schema) -> set[tuple[int, int]]:
    """``(unit, part)`` pairs marked done, found by listing the ``done`` array's chunk keys (one LIST request on
    object stores instead of one GET per cell)."""
    from zarr.core.sync import sync

    async def collect() -> list[str]:
        return [key async for key in group.store.list_prefix(_prefix(group, "done/c/"))]

    # A chunk key exists only while its cell holds 1: zarr stores no chunk equal to the fill value 0 (and deletes
    # one rewritten to 0), so the listing alone is the answer; no cell needs to be read.
    cells = set()
    for key in sync(collect()):
        unit, part = (int(x) for x in key.rsplit("/", 2)[-2:])
        if unit < schema.n_units and part < schema.max_parts:
            cells.add((unit, part))
    return cells


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


def write_part(group, schema: Schema, unit: int, part: int, n_parts: int, results: list[SlotResult]) -> None:
    """Write part ``part`` of unit ``unit`` (whole chunks only) and mark it done last."""
    base, k = unit * schema.unit_size, schema.unit_size
    rows = slice(base, base + k)
    for r in results:
        _check_bounds(schema, r)
    if part == 0:
        for name, block in _slot_blocks(schema, results).items():
            group[name][rows] = block
    if n_parts == 1:
        c0, c1 = 0, schema.max_steps
    else:
        c0 = part * schema.steps_chunk
        c1 = min(c0 + schema.steps_chunk, schema.max_steps)
    for name, block in _column_blocks(schema, results, c0, c1).items():
        if block.ndim == 2:
            group[name][rows, c0:c1] = block
        else:
            group[name][rows, :, c0:c1] = block
    group["done"][unit, part] = 1


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


def _slot_blocks(schema: Schema, results: list[SlotResult]) -> dict[str, np.ndarray]:
    k, s, t = schema.unit_size, schema.max_source, schema.max_target
    blocks = {
        "example_index": np.full(k, -1, np.int64),
        "example_id": np.full(k, "", dtype=object),
        "meta": np.full(k, "", dtype=object),
        "n_source": np.full(k, -1, np.int32), "n_target": np.full(k, -1, np.int32),
        "attr_pos_start": np.full(k, -1, np.int32), "attr_pos_end": np.full(k, -1, np.int32),
        "source_ids": np.full((k, s), -1, np.int32), "source_tokens": np.full((k, s), "", dtype=object),
        "target_ids": np.full((k, t), -1, np.int32), "target_tokens": np.full((k, t), "", dtype=object),
    }
    assert set(SLOT_INFO) <= set(blocks)
    for r in results:
        j, seq = r.slot, r.seq
        blocks["example_index"][j] = r.index
        blocks["example_id"][j] = r.example_id
        blocks["meta"][j] = json.dumps(r.meta, ensure_ascii=False)
        blocks["n_source"][j], blocks["n_target"][j] = len(seq.source_ids), len(seq.target_ids)
        blocks["attr_pos_start"][j], blocks["attr_pos_end"][j] = r.attr_pos
        blocks["source_ids"][j, : len(seq.source_ids)] = seq.source_ids
        blocks["source_tokens"][j, : len(seq.source_tokens)] = seq.source_tokens
        blocks["target_ids"][j, : len(seq.target_ids)] = seq.target_ids
        blocks["target_tokens"][j, : len(seq.target_tokens)] = seq.target_tokens
    return blocks


def _column_blocks(schema: Schema, results: list[SlotResult], c0: int, c1: int) -> dict[str, np.ndarray]:
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
    ``info``). The identity defaults to the first output's method description."""
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
    group = create(url, schema, identity, provenance, storage_options, overwrite=overwrite)
    for unit in range(schema.n_units):
        chunk = range(unit * unit_size, min((unit + 1) * unit_size, len(seqs)))
        results = [SlotResult(slot=i - unit * unit_size, index=i, example_id=ids[i],
                              meta=(metas[i] if metas is not None else _info_meta(*infos[i])), seq=seqs[i],
                              attr_pos=(seqs[i].attr_pos_start, seqs[i].attr_pos_end), column=0) for i in chunk]
        write_part(group, schema, unit, 0, 1, results)
    group.attrs.update({"status": "complete"})
    return group


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
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
