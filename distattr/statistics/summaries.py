"""Per-example summaries of a store, one table row per example, computed block by block with dask.

For each example the token-level scores ``m[r, c]`` (row ``r`` a context token, column ``c`` an explained step) are
``|A|`` averaged over the extra dims (layer, head; or one entry of them with ``select``); column ``c``'s shares are
``p[r, c] = m[r, c] / sum_r m[r, c]`` (Inseq's display normalisation; a column with no attribution is skipped).

==========================  ==============================================================================
``share_source``            mean over columns of the share on the source: the encoder input (encoder-decoder)
                            or the prompt, rows ``< n_source`` (decoder-only); ``share_prefix = 1 - it``, the
                            share on the generated prefix
``entropy``                 mean over columns of ``-sum_r p log p`` (nats)
``entropy_normalized``      mean over columns of the entropy divided by ``log`` of the column's token count
                            (columns of two tokens or more)
``mass``                    mean over columns of ``sum_r m[r, c]`` (the raw size of the scores)
``top{j}_token/_side/       the j-th context token by mean share over the columns: its string, side (``source``
_position/_share``          or ``prefix``), position in its own sequence and mean share
``<score>_mean``            mean of each step score over the steps; ``delta_abs_mean``: mean ``|delta|``
metadata fields             the example's kept fields (``text``/``generated_text`` with ``texts=True``)
==========================  ==============================================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..store.reader import Store
from .chunks import BLOCK_BYTES, SLOT_FIELDS, Block, Condition, context, map_blocks, selection, waves

TEXT_FIELDS = ("text", "generated_text", "target", "contrast")


@dataclass(frozen=True)
class Partial:
    """Additive per-slot sums of one block (slot block x step block): summed over step blocks."""

    columns: np.ndarray  # [n] columns with attribution
    share_source: np.ndarray  # [n] sums over columns
    entropy: np.ndarray
    entropy_normalized: np.ndarray
    entropy_columns: np.ndarray  # [n] columns of 2+ tokens
    mass: np.ndarray
    token_share: np.ndarray  # [n, R] sum over columns of p
    score_sums: dict[str, np.ndarray]  # name -> [n]
    score_counts: dict[str, np.ndarray]

    def __add__(self, other: Partial) -> Partial:
        def add(a, b):
            return {k: a[k] + b[k] for k in a} if isinstance(a, dict) else a + b

        return Partial(**{f.name: add(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})


def token_mass(values: np.ndarray, n_dims: int) -> np.ndarray:
    """``[n, R, c, *dims]`` -> ``[n, R, c]``: ``|A|`` averaged over the extra dims, NaN entries skipped (NaN
    where every entry is NaN)."""
    if n_dims == 0:
        return np.abs(values)
    axes = tuple(range(3, 3 + n_dims))
    finite = ~np.isnan(values)
    count = finite.sum(axis=axes)
    total = np.where(finite, np.abs(values), 0.0).sum(axis=axes, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def shares(m: np.ndarray, valid_columns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column shares ``p [n, R, c]`` (0 outside the context), column totals ``[n, c]`` and which columns count
    (``valid_columns`` with a positive total)."""
    filled = np.where(np.isnan(m), 0.0, m.astype(np.float64))
    total = filled.sum(axis=1)
    used = valid_columns & (total > 0)
    filled /= np.where(total > 0, total, 1.0)[:, None, :]
    return filled, total, used


def entropies(p: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shares ``p [n, R, c]`` and the number of context tokens per column ``[n, c]`` -> column entropies (nats)
    and their normalised values (NaN for columns of < 2 tokens)."""
    positive = p > 0
    logs = np.log(p, where=positive, out=np.zeros_like(p))
    entropy = -(p * logs).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = np.where(tokens >= 2, entropy / np.log(np.maximum(tokens, 2)), np.nan)
    return entropy, normalized


def block_partial(block: Block) -> Partial:
    """The additive sums of one block."""
    ctx = context(block)
    m = token_mass(ctx.values, len(block.dims))
    p, total, used = shares(m, block.column_valid())
    source = (p * (ctx.side == 0)[:, :, None]).sum(axis=1)
    entropy, normalized = entropies(p, (~np.isnan(m)).sum(axis=1))
    has_norm = used & ~np.isnan(normalized)
    score_sums, score_counts = {}, {}
    named = dict(block.scores or {})
    if block.deltas is not None:
        named["delta_abs"] = np.abs(block.deltas)
    for name, values in named.items():
        ok = block.column_valid() & ~np.isnan(values)
        score_sums[name] = np.where(ok, values, 0.0).sum(axis=1, dtype=np.float64)
        score_counts[name] = ok.sum(axis=1)
    return Partial(
        columns=used.sum(axis=1), share_source=np.where(used, source, 0.0).sum(axis=1),
        entropy=np.where(used, entropy, 0.0).sum(axis=1),
        entropy_normalized=np.where(has_norm, normalized, 0.0).sum(axis=1), entropy_columns=has_norm.sum(axis=1),
        mass=np.where(used, total, 0.0).sum(axis=1),
        token_share=(p * used[:, None, :]).sum(axis=2),
        score_sums=score_sums, score_counts=score_counts)


def _ratio(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _finish(info: dict, partial: Partial, tokens: dict, metas, ids, top_k: int, texts: bool, enc_dec: bool):
    """One slot block's rows (selected slots only) as a DataFrame."""
    import pandas as pd

    n_cols = partial.columns.astype(np.float64)
    share = _ratio(partial.share_source, n_cols)
    data = {
        "example_index": info["example_index"], "example_id": np.asarray(ids).astype(object),
        "n_source": info["n_source"], "n_target": info["n_target"],
        "n_steps": info["attr_pos_end"] - info["attr_pos_start"],
        "share_source": share, "share_prefix": 1.0 - share, "entropy": _ratio(partial.entropy, n_cols),
        "entropy_normalized": _ratio(partial.entropy_normalized, partial.entropy_columns.astype(np.float64)),
        "mass": _ratio(partial.mass, n_cols),
    }
    data.update(_top_tokens(info, partial, tokens, top_k, enc_dec))
    for name, sums in partial.score_sums.items():
        data[f"{name}_mean"] = _ratio(sums, partial.score_counts[name])
    frame = pd.DataFrame(data)
    extra = pd.DataFrame([_metadata(m, texts) for m in metas], index=frame.index)
    for column in extra.columns:
        frame[column if column not in frame.columns else f"meta_{column}"] = extra[column]
    return frame[info["selected"]]


def _top_tokens(info: dict, partial: Partial, tokens: dict, top_k: int, enc_dec: bool) -> dict:
    """``top{j}_token/_side/_position/_share`` columns: context tokens by mean share over the columns."""
    import pandas as pd

    n_cols = partial.columns.astype(np.float64)
    avg = partial.token_share / np.maximum(n_cols, 1)[:, None]
    strings = np.concatenate([np.asarray(tokens[f]).astype(object) for f in ("source_tokens", "target_tokens")
                              if f in tokens], axis=1)
    n_src_rows = tokens["source_tokens"].shape[1] if enc_dec else 0
    order = np.argsort(-avg, axis=1, kind="stable")
    out = {}
    for j in range(top_k):
        rows = order[:, min(j, order.shape[1] - 1)]
        share = np.take_along_axis(avg, rows[:, None], axis=1)[:, 0]
        present = (share > 0) & (n_cols > 0) & (j < order.shape[1])
        if enc_dec:
            side = np.where(rows < n_src_rows, "source", "prefix")
            position = np.where(rows < n_src_rows, rows, rows - n_src_rows)
        else:
            side = np.where(rows < info["n_source"], "source", "prefix")
            position = rows
        out[f"top{j + 1}_token"] = np.where(present, np.take_along_axis(strings, rows[:, None], axis=1)[:, 0], None)
        out[f"top{j + 1}_side"] = np.where(present, side.astype(object), None)
        out[f"top{j + 1}_position"] = pd.array([int(x) if ok else None for x, ok in zip(position, present,
                                                                                          strict=True)],
                                               dtype="Int64")
        out[f"top{j + 1}_share"] = np.where(present, share, np.nan)
    return out


def _metadata(text: str, texts: bool) -> dict:
    meta = json.loads(str(text) or "{}")
    return {k: (v if isinstance(v, str) or v is None else json.dumps(v)) for k, v in meta.items()
            if texts or k not in TEXT_FIELDS}


def summarize(store: Store, *, top_k: int = 3, where: Sequence[Condition | str] = (),
              select: Mapping[str, int] | None = None, texts: bool = False, block_bytes: int = BLOCK_BYTES,
              workers: int | None = None):
    """Per-example summaries (see the module docstring) as a pandas DataFrame in dataset order, one row per
    example that passes ``where``; ``select`` picks one entry of extra dims (``{"layer": -1}``) instead of
    averaging them."""
    import dask
    import dask.array as da
    import pandas as pd

    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    selected = selection(store, where)
    blocks, cut = map_blocks(store, block_partial, selected=selected, select=select, scores=True,
                             block_bytes=block_bytes, name="summary-block")
    g, schema = store.group, store.schema
    per_slot = {f: da.from_zarr(g[f], chunks=(cut.slots,)).to_delayed() for f in (*SLOT_FIELDS, "example_id", "meta")}
    token_arrays = {f: da.from_zarr(g[f], chunks=(cut.slots, g[f].shape[1])).to_delayed()[:, 0]
                    for f, present in (("source_tokens", schema.source_attributions),
                                       ("target_tokens", schema.target_attributions)) if present}
    add, finish = dask.delayed(Partial.__add__, pure=True), dask.delayed(_finish, pure=True)
    frames = []
    for i in range(blocks.shape[0]):
        partial = blocks[i, 0]
        for j in range(1, blocks.shape[1]):
            partial = add(partial, blocks[i, j])
        info = {f: per_slot[f][i] for f in SLOT_FIELDS}
        info["selected"] = selected[i * cut.slots : (i + 1) * cut.slots]
        frames.append(finish(info, partial, {f: a[i] for f, a in token_arrays.items()}, per_slot["meta"][i],
                             per_slot["example_id"][i], top_k, texts, schema.source_attributions,
                             dask_key_name=f"summary-rows-{i}"))
    table = pd.concat([frame for wave in waves(frames, workers) for frame in wave], ignore_index=True)
    return table.sort_values("example_index", kind="stable").reset_index(drop=True)


def write_table(table, path: str | Path) -> Path:
    """Write a DataFrame as Parquet (``.parquet``/``.pq``) or CSV (``.csv``, ``.tsv``), by extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        table.to_parquet(path, index=False)
    elif suffix in (".csv", ".tsv"):
        table.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    else:
        raise ValueError(f"unknown table format {path.suffix!r} for {path}: use .parquet, .csv or .tsv")
    return path
