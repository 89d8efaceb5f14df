"""A store opens with plain ``xarray.open_zarr(path)`` and ``zarr.open(path)`` in a process that never imports
distattr: named dims, ``example_index``/``example_id`` and the extra dims' labels as coordinates, strings that
round-trip, and the layout docstring's recipe giving exactly the examples distattr's own reader gives."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distattr.results import SequenceAttribution
from distattr.statistics.synthetic import write_synthetic_store
from distattr.store import StoreError, open_store, save_outputs
from distattr.store import io as store_io
from distattr.store.io import SlotFailure, SlotResult
from distattr.store.layout import VERSION, Schema, array_specs, dim_coordinates

# Run in a fresh interpreter: reads the stores given on the command line with xarray and zarr only, applies the
# recipe of distattr.store.layout's docstring, and writes what it saw to <out>.json (strings, dims, dtypes) and
# <out>.npz (numbers).
PLAIN_READER = r"""
import json, sys, warnings
import numpy, xarray, zarr

out, paths = sys.argv[1], sys.argv[2:]
report, numbers = {}, {}
for n, path in enumerate(paths):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = xarray.open_zarr(path)  # default arguments: consolidated=None, decode_coords=True, ...
        unit_ok = (ds.done.sum("part") >= ds.unit_parts) & ~(ds.part_error != "").any("part")
        ok = numpy.repeat(unit_ok.values, ds.attrs["schema"]["unit_size"]) & (ds.status.values == 1)
        examples = ds.isel(slot=numpy.flatnonzero(ok)).sortby("example_index").compute()
        group = zarr.open(path, mode="r")
        arrays = {name: [str(a.dtype), list(a.shape), a[...].dtype.kind] for name, a in group.arrays()}
    strings = {}
    for name, var in examples.variables.items():
        if var.dtype.kind in "OTU":
            strings[name] = var.values.tolist()
        else:
            numbers[f"{n}/{name}"] = var.values
    report[path] = {
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        "dims": {name: list(var.dims) for name, var in ds.variables.items()},
        "sizes": dict(ds.sizes), "coords": sorted(ds.coords), "indexes": sorted(ds.indexes),
        "dtypes": {name: [var.dtype.kind, var.dtype.itemsize] for name, var in ds.variables.items()},
        "ok": numpy.flatnonzero(ok).tolist(), "strings": strings, "zarr": arrays, "attrs": ds.attrs,
    }
report["distattr imported"] = "distattr" in sys.modules
json.dump(report, open(out + ".json", "w"))
numpy.savez(out + ".npz", **numbers)
"""


def read_plainly(tmp_path: Path, *paths: str) -> tuple[dict, dict]:
    """What a process without distattr sees in each store: ``({path: report}, {(path, variable): values})``."""
    out = str(tmp_path / "plain")
    run = subprocess.run([sys.executable, "-c", PLAIN_READER, out, *paths], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(Path(out + ".json").read_text())
    assert report.pop("distattr imported") is False
    with np.load(out + ".npz") as npz:
        numbers = {(paths[int(key.split("/")[0])], key.split("/", 1)[1]): npz[key] for key in npz.files}
    return report, numbers


def check_like_distattr(url: str, seen: dict, numbers: dict) -> None:
    """The plain view of ``url`` against distattr's: dims and coordinates as the layout says, and the recipe's
    examples equal to ``Store.to_xarray()`` (same order, same values, NaN where NaN)."""
    store = open_store(url)
    schema = store.schema
    assert not [w for w in seen["warnings"] if "RuntimeWarning" in w or "onsolidat" in w], seen["warnings"]
    specs = {spec.name: spec for spec in array_specs(schema)}
    assert set(seen["zarr"]) == set(specs)  # zarr.open reads every array
    assert {name: seen["dims"][name] for name in specs} == {n: list(s.dimension_names) for n, s in specs.items()}
    sizes = {"slot": schema.n_slots, "source_token": schema.max_source, "target_token": schema.max_target,
             "step": schema.max_steps, "unit": schema.n_units, "part": schema.max_parts,
             **dict(zip(schema.dims, schema.dim_sizes, strict=True))}
    assert seen["sizes"] == sizes
    assert set(seen["coords"]) == {"example_index", "example_id", *schema.dims}
    assert set(seen["indexes"]) == set(schema.dims)
    for name, spec in specs.items():  # strings are numpy strings, integers stay integers (-1 is not masked)
        kind = seen["dtypes"][name][0]
        assert kind in "TU" if spec.dtype is str else kind == np.dtype(spec.dtype).kind, (name, kind)
    assert seen["ok"] == np.flatnonzero(store.valid_slots).tolist()

    ds = store.to_xarray()
    assert seen["strings"]["example_id"] == ds.example_id.values.tolist()
    assert numbers[url, "example_index"].tolist() == ds.example_index.values.tolist() == sorted(
        ds.example_index.values.tolist())
    for name in ds.variables:
        if name in seen["strings"]:
            assert seen["strings"][name] == ds[name].values.tolist(), name
        else:
            np.testing.assert_array_equal(numbers[url, name], ds[name].values, err_msg=name)
    assert set(ds.variables) | {"done", "unit_parts", "part_error"} == set(seen["dims"])
    for dim, values in dim_coordinates(schema).items():
        assert ds[dim].values.tolist() == values.tolist()


# ---------------------------------------------------------------- stores


def with_unicode(seq: SequenceAttribution, j: int) -> SequenceAttribution:
    """The tiny word-level tokenizer knows ASCII words only: give the tokens byte-level BPE spellings and accents."""
    return dataclasses.replace(seq, source_tokens=tuple(f"Ġé{j}{t}" for t in seq.source_tokens),
                               target_tokens=tuple(f"Ġ{t}ß" for t in seq.target_tokens))


@pytest.fixture
def attention_store(tiny, tmp_path):
    """An encoder-decoder attention store (source and target matrices, dims layer x head, labels "0", "1") of 3
    examples in units of 2, one slot empty; ids, texts and tokens with non-ASCII characters."""
    model = tiny("t5", "attention")
    texts = ["the cat is in the house", "a dog", "paris is big"]
    out = model.attribute(texts, generation_args={"max_new_tokens": 3}, step_scores=["probability"],
                          attribute_target=True, show_progress=False)
    out = dataclasses.replace(out, sequences=tuple(with_unicode(s, j) for j, s in enumerate(out.sequences)))
    url = str(tmp_path / "attention.zarr")
    save_outputs(url, out, ids=["café-0", "Ġnaïve", "日本"], unit_size=2,
                 metas=[{"text": t, "note": "é Ġ ✓"} for t in texts])
    return url, out


def test_plain_xarray_reads_a_saved_store_like_distattr(attention_store, tmp_path):
    url, out = attention_store
    report, numbers = read_plainly(tmp_path, url)
    seen = report[url]
    check_like_distattr(url, seen, numbers)
    assert seen["attrs"]["version"] == VERSION and seen["attrs"]["status"] == "complete"
    assert seen["dims"]["source_attributions"] == ["slot", "source_token", "step", "layer", "head"]
    assert seen["dtypes"]["layer"] == ["i", 8] and seen["dtypes"]["head"] == ["i", 8]  # indices, not "0", "1"
    assert seen["strings"]["example_id"] == ["café-0", "Ġnaïve", "日本"]
    for j, seq in enumerate(out.sequences):
        n_src, n_tgt, steps = len(seq.source_ids), len(seq.target_ids), seq.attr_pos_end - seq.attr_pos_start
        padding = [""] * (seen["sizes"]["source_token"] - n_src)
        assert seen["strings"]["source_tokens"][j] == [*seq.source_tokens, *padding]
        assert seen["strings"]["target_tokens"][j][:n_tgt] == list(seq.target_tokens)
        assert seq.source_tokens[0].startswith("Ġé") and seq.target_tokens[0].endswith("ß")
        assert json.loads(seen["strings"]["meta"][j])["note"] == "é Ġ ✓"
        np.testing.assert_array_equal(numbers[url, "source_attributions"][j, :n_src, :steps], seq.source_attributions)
        np.testing.assert_array_equal(numbers[url, "target_attributions"][j, :n_tgt, :steps], seq.target_attributions)
        assert np.isnan(numbers[url, "target_attributions"][j, n_tgt:]).all()  # padding is NaN
        assert (numbers[url, "target_ids"][j, n_tgt:] == -1).all()


def test_plain_xarray_puts_shuffled_slots_in_dataset_order(tmp_path):
    url = str(tmp_path / "synthetic.zarr")
    written = write_synthetic_store(url, 21, prompt=(2, 9), steps=3, dims=(("layer", 2), ("head", 3)), unit_size=4,
                                    slab_units=3)
    store = open_store(url)
    slots = store.states.example_index
    assert slots[: 21].tolist() != sorted(slots[: 21].tolist())  # slots are sorted by length, not dataset order
    report, numbers = read_plainly(tmp_path, url)
    check_like_distattr(url, report[url], numbers)
    assert numbers[url, "example_index"].tolist() == list(range(written.n_examples))
    assert report[url]["strings"]["layer"] == ["layer0", "layer1"]  # labels that are not indices stay strings
    assert report[url]["strings"]["example_id"] == [f"ex-{i:07d}" for i in range(21)]


def make_seq(index: int, n_source: int = 3, steps: int = 4, columns: tuple[int, int] | None = None
             ) -> SequenceAttribution:
    rng = np.random.default_rng(index)
    n_target = n_source + steps
    c0, c1 = columns or (0, steps)
    ids = tuple(int(x) for x in 10 * index + np.arange(n_target))
    return SequenceAttribution(
        source_tokens=tuple(f"é{i}" for i in ids[:n_source]), target_tokens=tuple(f"Ġ{i}" for i in ids),
        source_ids=ids[:n_source], target_ids=ids, source_attributions=None,
        target_attributions=rng.normal(size=(n_target, c1 - c0)).astype(np.float32),
        step_scores={"probability": rng.uniform(size=c1 - c0).astype(np.float32)},
        attr_pos_start=n_source + c0, attr_pos_end=n_source + c1)


def result(slot: int, index: int, columns: tuple[int, int] | None = None) -> SlotResult:
    return SlotResult(slot=slot, index=index, example_id=f"ex-{index}", meta={}, seq=make_seq(index, columns=columns),
                      attr_pos=(3, 7), column=(columns or (0, 0))[0])


def test_plain_recipe_keeps_exactly_the_results_of_a_store_with_failures_and_a_crash(tmp_path):
    """Unit 0: examples 5, 0 (out of order); unit 1: example 2 ok, example 1 failed; unit 2: example 3 split in two
    parts, the second failed (``part_error``); unit 3: example 4 written but never marked done (a crash)."""
    schema = Schema(n_units=4, unit_size=2, max_source=3, max_target=7, max_steps=4, steps_chunk=2,
                    source_attributions=False, target_attributions=True, step_scores=("probability",))
    url = str(tmp_path / "faulty.zarr")
    group = store_io.create(url, schema, {"model": "hand", "method": "hand", "n_examples": 6}, {"model": {}},
                            unit_parts=[1, 1, 2, 1])
    store_io.write_part(group, schema, 0, 0, 1, [result(0, 5), result(1, 0)])
    store_io.write_part(group, schema, 1, 0, 1, [result(0, 2)],
                        [SlotFailure(slot=1, index=1, example_id="ex-1", meta={}, error="out of mémoire")])
    store_io.write_part(group, schema, 2, 0, 2, [result(0, 3, columns=(0, 2))])
    store_io.write_part_failure(group, schema, 2, 1, "part 1 failed: ✗")
    store_io.write_part(group, schema, 3, 0, 1, [result(0, 4)])
    group["done"][3, 0] = 0
    report, numbers = read_plainly(tmp_path, url)
    seen = report[url]
    check_like_distattr(url, seen, numbers)
    assert seen["ok"] == [0, 1, 2] and numbers[url, "example_index"].tolist() == [0, 2, 5]
    assert seen["strings"]["example_id"] == ["ex-0", "ex-2", "ex-5"]
    assert seen["attrs"]["status"] == "writing"


# ---------------------------------------------------------------- layout versions


def as_version_2(url: str) -> None:
    """Rewrite a store's metadata as layout version 2 wrote it: no coordinate arrays, no ``coordinates``
    attributes, no consolidated metadata, ``version`` 2 (the arrays themselves are written the same way)."""
    root = Path(url)
    header = json.loads((root / "zarr.json").read_text())
    header.pop("consolidated_metadata", None)
    header["attributes"]["version"] = 2
    schema = Schema.from_json(header["attributes"]["schema"])
    (root / "zarr.json").write_text(json.dumps(header))
    for dim in schema.dims:
        for item in sorted((root / dim).rglob("*"), reverse=True):
            item.unlink() if item.is_file() else item.rmdir()
        (root / dim).rmdir()
    for meta in root.glob("*/zarr.json"):
        array = json.loads(meta.read_text())
        array["attributes"] = {}
        meta.write_text(json.dumps(array))


def test_version_2_stores_are_still_read_with_the_same_coordinates(tmp_path):
    url = str(tmp_path / "v2.zarr")
    write_synthetic_store(url, 9, prompt=(2, 5), steps=2, dims=(("layer", 2),), unit_size=4)
    before = open_store(url).to_xarray().compute()
    as_version_2(url)
    store = open_store(url)
    assert store.attrs["version"] == 2 and "layer" not in store.group
    after = store.to_xarray().compute()
    assert set(after.coords) == set(before.coords) == {"example_id", "example_index", "layer"}
    assert after.layer.values.tolist() == before.layer.values.tolist() == ["layer0", "layer1"]
    for name in before.variables:
        if before[name].dtype.kind in "OTU":
            assert after[name].values.tolist() == before[name].values.tolist(), name
        else:
            np.testing.assert_array_equal(after[name].values, before[name].values, err_msg=name)
    assert store[4].sequences[0].dim_labels == (("layer0", "layer1"),)


def test_unknown_layout_versions_are_refused_with_the_readable_ones(tmp_path):
    url = str(tmp_path / "v9.zarr")
    write_synthetic_store(url, 2, prompt=(2, 3), steps=1)
    header = json.loads((Path(url) / "zarr.json").read_text())
    header["attributes"]["version"] = 9
    (Path(url) / "zarr.json").write_text(json.dumps(header))
    with pytest.raises(StoreError, match="layout version 9; this distattr reads versions 2, 3"):
        open_store(url)


def test_extra_dims_named_like_an_array_or_a_dim_are_refused():
    schema = Schema(n_units=1, unit_size=1, max_source=2, max_target=3, max_steps=1, steps_chunk=1,
                    source_attributions=False, target_attributions=True, dims=("step",), dim_sizes=(2,))
    with pytest.raises(ValueError, match="clash: \\['step'\\]"):
        array_specs(schema)
    with pytest.raises(ValueError, match="clash: \\['status'\\]"):
        array_specs(dataclasses.replace(schema, dims=("status",)))


def test_dim_coordinates_are_indices_unless_the_labels_say_more():
    schema = Schema(n_units=1, unit_size=1, max_source=2, max_target=3, max_steps=1, steps_chunk=1,
                    source_attributions=False, target_attributions=True, dims=("layer", "head", "extra"),
                    dim_sizes=(2, 3, 2), dim_labels=(("0", "1"), ("h0", "h1", "h2"), ()))
    coords = dim_coordinates(schema)
    assert coords["layer"].dtype == np.int64 and coords["layer"].tolist() == [0, 1]
    assert coords["head"].tolist() == ["h0", "h1", "h2"]
    assert coords["extra"].tolist() == [0, 1]
