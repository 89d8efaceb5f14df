"""Reading a distattr store: one example at a time, or the whole store as lazy xarray/dask arrays."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator

import numpy as np

from ..results import AttributionOutput, SequenceAttribution
from .io import SlotStates, exists, failure_list, open_group, read_header, slot_states
from .layout import UNIT_ARRAYS, Schema, dim_coordinates


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
        self._states: SlotStates | None = None
        self._slot_of: np.ndarray | None = None
        self._ids: dict[str, int] | None = None
        self._failures: list[tuple[int, str, str]] | None = None

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
        """The results in dataset order; failed and absent examples are skipped (see :attr:`failures`)."""
        for i in range(len(self)):
            if self.slot(i) >= 0:
                yield self[i]

    @property
    def states(self) -> SlotStates:
        """What every slot holds (read once, when first needed): see :class:`~distattr.store.io.SlotStates`."""
        if self._states is None:
            self._states = slot_states(self.group, self.schema)
        return self._states

    @property
    def valid_slots(self) -> np.ndarray:
        """``[n_slots]`` bool: the slot holds a result (its unit is complete and the example did not fail)."""
        return self.states.valid

    @property
    def failures(self) -> list[tuple[int, str, str]]:
        """``(example_index, example_id, message)`` of every failed example, in dataset order."""
        if self._failures is None:
            self._failures = failure_list(self.group, self.states)
        return self._failures

    def _slots(self) -> np.ndarray:
        """``[n_examples]``: the slot of each example, valid or failed (-1: absent)."""
        if self._slot_of is None:
            states = self.states
            self._slot_of = np.full(len(self), -1, np.int64)
            used = np.flatnonzero(states.valid | states.failed)
            self._slot_of[states.example_index[used]] = used
        return self._slot_of

    def slot(self, index: int) -> int:
        """The slot of dataset example ``index``; -1 when it has no result (not written yet, or failed)."""
        slot = int(self._slots()[index])
        return slot if slot >= 0 and self.states.valid[slot] else -1

    def get(self, example_id: str) -> AttributionOutput:
        """The example with this id (KeyError when it is not written yet or failed)."""
        if self._ids is None:
            slots = self._slots()
            used = np.flatnonzero(slots >= 0)
            ids = self.group["example_id"].get_coordinate_selection(slots[used]) if len(used) else []
            self._ids = {str(i): int(x) for i, x in zip(ids, used, strict=True)}
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
            failed = int(self._slots()[index])
            if failed >= 0:
                raise KeyError(f"example {index} ({self.group['example_id'][failed]}) failed: "
                               f"{self.states.messages[failed]}")
            raise KeyError(f"example {index} is not written in {self.url} yet (the job is incomplete: resume it)")
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

    def to_xarray(self, examples_only: bool = True, include_failed: bool = False):
        """Every per-slot array as a lazy, dask-backed ``xarray.Dataset``.

        Dimensions: ``example`` (dataset order, results only: failed and absent examples are left out, failed ones
        kept with ``include_failed``; with ``examples_only=False`` the raw ``slot`` axis, every slot included, to be
        judged by :attr:`valid_slots`), ``source_token``/``target_token`` (padded, NaN beyond each example's
        ``n_source``/``n_target``), ``step`` (column ``c`` explains target position ``attr_pos_start + c``) and the
        method's extra dims (``layer``, ``head``...). Coordinates: ``example_id``, ``example_index`` and each extra
        dim's labels (:func:`~distattr.store.layout.dim_coordinates`: int64 indices or label strings); ``status``
        (1 ok, 2 failed) and ``error`` are variables.

        ``xarray.open_zarr(url)`` without distattr gives the same arrays over ``slot`` (see
        :mod:`distattr.store.layout`); this adds the done markers' verdict and the dataset order.
        """
        import xarray as xr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a version 2 store has no consolidated metadata: xarray warns
            ds = xr.open_zarr(self.group.store, group=self.group.path or None, zarr_format=3)
        ds = ds.drop_vars([n for n in UNIT_ARRAYS if n in ds]).set_coords(["example_id", "example_index"])
        missing = {dim: values for dim, values in dim_coordinates(self.schema).items() if dim not in ds.coords}
        ds = ds.assign_coords(missing)  # version 2 stores have no coordinate arrays
        ds.attrs = {"identity": json.dumps(self.identity), "status": self.attrs.get("status")}
        if not examples_only:
            return ds
        states = self.states
        used = np.flatnonzero(states.valid | (states.failed if include_failed else False))
        order = used[np.argsort(states.example_index[used], kind="stable")]
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
