"""Reading a distattr store: one example at a time, or the whole store as lazy xarray/dask arrays."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator

import numpy as np

from ..results import AttributionOutput, SequenceAttribution
from .io import exists, open_group, read_header
from .layout import Schema


class Store:
    """A distattr store opened for reading (see :func:`open_store`).

    ``store[i]`` is the ``i``-th example of the dataset (its position in the input) as an
    :class:`~distattr.results.AttributionOutput` with one sequence, like ``model.attribute`` returns;
    ``store.get(example_id)`` finds it by id; ``store.to_xarray()`` gives lazy arrays for dataset-wide work.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.attrs = read_header(url, storage_options)
        self.group = open_group(url, "r", storage_options)
        self.schema = Schema.from_json(self.attrs["schema"])
        self._slot_of: np.ndarray | None = None
        self._ids: dict[str, int] | None = None

    @property
    def identity(self) -> dict:
        """What the values depend on: model, method and arguments, dataset fingerprint, planning."""
        return self.attrs["identity"]

    @property
    def provenance(self) -> dict:
        """Library versions, the model description, times and the job summary."""
        return self.attrs["provenance"]

    @property
    def complete(self) -> bool:
        """True once every unit was written; an incomplete store can be read but misses examples."""
        return self.attrs.get("status") == "complete"

    def __len__(self) -> int:
        return int(self.identity["n_examples"])

    def __iter__(self) -> Iterator[AttributionOutput]:
        for i in range(len(self)):
            if self.slot(i) >= 0:
                yield self[i]

    def slot(self, index: int) -> int:
        """The slot of dataset example ``index`` (-1: not written yet)."""
        if self._slot_of is None:
            slots = self.group["example_index"][:]
            self._slot_of = np.full(len(self), -1, np.int64)
            used = np.flatnonzero(slots >= 0)
            self._slot_of[slots[used]] = used
        return int(self._slot_of[index])

    def get(self, example_id: str) -> AttributionOutput:
        """The example with this id."""
        if self._ids is None:
            ids = self.group["example_id"][:]
            index = self.group["example_index"][:]
            self._ids = {str(i): int(x) for i, x in zip(ids, index, strict=True) if x >= 0}
        if example_id not in self._ids:
            raise KeyError(f"no example with id {example_id!r} in {self.url}"
                           + ("" if self.complete else " (the store is incomplete: resume the job)"))
        return self[self._ids[example_id]]

    def __getitem__(self, index: int) -> AttributionOutput:
        n = len(self)
        if not isinstance(index, int | np.integer):
            raise TypeError(f"store indices are dataset positions (int), not {type(index).__name__}; use "
                            "store.get(example_id) for ids")
        if not -n <= index < n:
            raise IndexError(f"example {index} out of range: the store has {n} examples")
        index = int(index) % n
        slot = self.slot(index)
        if slot < 0:
            raise KeyError(f"example {index} is not in {self.url} yet (the job is incomplete: resume it)")
        seq, meta = self._sequence(slot)
        info = {**self.identity, **self.provenance.get("model", {}), "example_index": index,
                "example_id": str(self.group["example_id"][slot]), **meta}
        return AttributionOutput(sequences=(seq,), info=info)

    def _sequence(self, slot: int) -> tuple[SequenceAttribution, dict]:
        g, schema = self.group, self.schema
        n_src, n_tgt = int(g["n_source"][slot]), int(g["n_target"][slot])
        start, end = int(g["attr_pos_start"][slot]), int(g["attr_pos_end"][slot])
        steps = end - start

        def matrix(name: str, tokens: int) -> np.ndarray | None:
            return g[name][slot, :tokens, :steps] if name in g else None

        scores = {name: g[f"score_{name}"][slot, :steps] for name in schema.step_scores}
        seq = SequenceAttribution(
            source_tokens=tuple(str(t) for t in g["source_tokens"][slot, :n_src]),
            target_tokens=tuple(str(t) for t in g["target_tokens"][slot, :n_tgt]),
            source_ids=tuple(int(x) for x in g["source_ids"][slot, :n_src]),
            target_ids=tuple(int(x) for x in g["target_ids"][slot, :n_tgt]),
            source_attributions=matrix("source_attributions", n_src),
            target_attributions=matrix("target_attributions", n_tgt),
            step_scores=scores, attr_pos_start=start, attr_pos_end=end,
            deltas=g["deltas"][slot, :steps] if schema.deltas else None,
            dims=schema.dims, dim_labels=schema.dim_labels,
        )
        return seq, json.loads(str(g["meta"][slot]) or "{}")

    def to_xarray(self, examples_only: bool = True):
        """Every array as a lazy, dask-backed ``xarray.Dataset``.

        Dimensions: ``example`` (dataset order; with ``examples_only=False`` the raw ``slot`` axis, empty slots
        included), ``source_token``/``target_token`` (padded, NaN beyond each example's ``n_source``/
        ``n_target``), ``step`` (column ``c`` explains target position ``attr_pos_start + c``) and the method's
        extra dims (``layer``, ``head``...). Coordinates: ``example_id``, ``example_index``.
        """
        import xarray as xr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = xr.open_zarr(self.group.store, group=self.group.path or None, zarr_format=3, consolidated=False)
        ds = ds.drop_vars("done").set_coords(["example_id", "example_index"])
        for dim, labels in zip(self.schema.dims, self.schema.dim_labels, strict=False):
            if labels and len(labels) == ds.sizes.get(dim):
                ds = ds.assign_coords({dim: list(labels)})
        ds.attrs = {"identity": json.dumps(self.identity), "status": self.attrs.get("status")}
        if not examples_only:
            return ds
        index = self.group["example_index"][:]
        used = np.flatnonzero(index >= 0)
        order = used[np.argsort(index[used], kind="stable")]
        return ds.isel(slot=order).rename({"slot": "example"})

    def __repr__(self) -> str:
        ident = self.identity
        return (f"<distattr Store {self.url}: {len(self)} examples, {ident.get('method')} on {ident.get('model')}, "
                f"{self.attrs.get('status')}>")


def open_store(url: str, storage_options: dict | None = None) -> Store:
    """Open a store written by ``attribute_dataset`` (a local path or an fsspec URL such as ``s3://...``;
    ``storage_options`` go to fsspec, e.g. ``{"endpoint_url": ...}``)."""
    if not exists(str(url), storage_options):
        raise FileNotFoundError(f"no store at {url}")
    return Store(str(url), storage_options)
