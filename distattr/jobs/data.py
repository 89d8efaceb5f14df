"""Dataset input for ``attribute-dataset``: records read lazily from JSONL, CSV, Parquet, a Hugging Face
``datasets`` dataset (a split of a ``DatasetDict``), a ``ray.data.Dataset`` or a list of dicts.

Files may be local paths or fsspec URLs (``s3://``, ``gs://``, ``https://``, ``memory://``, ``file://``, with
``storage_options`` for the filesystem). Every reader is re-iterable and streams: the driver reads the data
twice (a survey, then the dispatch) and never holds more than a window of records. JSON lines and CSV are read
line by line through fsspec's block cache, Parquet row group by row group (only a JSON array is read whole).
A saved dataset folder at a URL is copied to a local temporary folder by ``datasets.load_from_disk``.
Validation names the row at fault.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse


@dataclass(frozen=True)
class Fields:
    """Which fields of a row hold what. ``text`` is required; the others are optional field names."""

    text: str = "prompt"
    target: str | None = None  # constrained decoding: attribute this output instead of generating
    contrast: str | None = None  # contrastive target of contrast_* attributed functions
    id: str | None = None  # stable example id (default: the row's position, "0", "1", ...)
    keep: tuple[str, ...] = ()  # more fields copied into each example's metadata


@dataclass(frozen=True)
class Record:
    """One example: its position in the dataset, id, texts and kept metadata."""

    index: int
    id: str
    text: str
    target: str | None = None
    contrast: str | None = None
    meta: tuple[tuple[str, str], ...] = ()


class DataError(ValueError):
    """Bad input data: a missing field, an empty text, a duplicate id, an unreadable file."""


# ---------------------------------------------------------------- rows from any source

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class _File:
    """One data file, local or remote: ``url`` for fsspec (a local path is one), ``name`` for messages."""

    url: str
    name: str
    suffix: str  # lower-case file extension: which reader
    options: dict = field(default_factory=dict)  # fsspec storage options

    def open(self, mode: str):
        """An fsspec ``OpenFile`` (a context manager): text mode decodes UTF-8 and keeps line ends for csv."""
        import fsspec

        text = {"encoding": "utf-8", "newline": ""} if "t" in mode else {}
        return fsspec.open(self.url, mode, **text, **self.options)


@dataclass(frozen=True)
class _SavedDataset:
    """A ``datasets.save_to_disk`` folder of one dataset (for a ``DatasetDict``: the chosen split's folder)."""

    url: str
    options: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[dict]:
        import datasets

        yield from datasets.load_from_disk(self.url, storage_options=self.options or None)


def _json_lines(file: _File) -> Iterator[dict]:
    with file.open("rt") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{file.name}: line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{file.name}: line {number} is a JSON {type(row).__name__}, not an object")
            yield row


def _json_array(file: _File) -> Iterator[dict]:
    with file.open("rt") as handle:
        try:
            rows = json.load(handle)
        except json.JSONDecodeError as err:
            raise DataError(f"{file.name}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{file.name}: expected a JSON array of objects (or JSON lines)")
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{file.name}: item {number} is a JSON {type(row).__name__}, not an object")
        yield row


def _json(file: _File) -> Iterator[dict]:
    """A ``.json`` file holds JSON lines or one array: the first non-blank character says which."""
    with file.open("rt") as handle:
        first = handle.read(1024).lstrip()
    return _json_array(file) if first.startswith("[") else _json_lines(file)


def _csv_rows(file: _File) -> Iterator[dict]:
    with file.open("rt") as handle:
        yield from csv.DictReader(handle)


def _parquet_rows(file: _File) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with file.open("rb") as handle:  # pyarrow seeks to the footer, then reads one row group at a time
        try:
            parquet = pq.ParquetFile(handle)
        except Exception as err:  # pyarrow raises ArrowInvalid and friends
            raise DataError(f"{file.name}: not a readable Parquet file ({err})") from None
        for batch in parquet.iter_batches(batch_size=1024):
            yield from batch.to_pylist()


_READERS = {".jsonl": _json_lines, ".ndjson": _json_lines, ".json": _json, ".csv": _csv_rows,
            ".parquet": _parquet_rows, ".pq": _parquet_rows}


def _choose_split(splits: Iterable[str], split: str | None, name: str) -> str:
    """``split`` if ``splits`` (of the DatasetDict ``name``) has it; else a DataError listing them."""
    splits = list(splits)
    if split is None or split not in splits:
        wrong = "" if split is None else f"has no split {split!r}: it "
        raise DataError(f"{name} {wrong}is a DatasetDict with splits {', '.join(splits)}: choose one with --split")
    return split


def _locate(url: str, name: str, options: dict, split: str | None) -> _File | _SavedDataset:
    """What is at ``url`` (a local path or an fsspec URL): a data file or a saved dataset folder."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        suffix = PurePosixPath(urlparse(url).path if _URL.match(url) else url).suffix.lower()
        if not fs.exists(path):
            raise DataError(f"data {'' if _URL.match(url) else 'file '}not found: {name}")
        if suffix in _READERS:  # decided by the name: an HTTP "isdir" would download the file to list its links
            _no_split(split, name)
            return _File(url=url, name=name, suffix=suffix, options=options)
        if fs.exists(_join(path, "dataset_dict.json")):
            splits = json.loads(fs.cat_file(_join(path, "dataset_dict.json")))["splits"]
            return _SavedDataset(url=_join(url, _choose_split(splits, split, name)), options=options)
        if fs.exists(_join(path, "dataset_info.json")) or fs.exists(_join(path, "state.json")):
            _no_split(split, name)
            return _SavedDataset(url=url, options=options)
        if fs.isdir(path):
            raise DataError(f"{name} is a folder but not a saved Hugging Face dataset (datasets.save_to_disk)")
        raise DataError(f"{name}: unknown data format {suffix or '(no extension)'}; use .jsonl, .json, .csv or "
                        ".parquet, or a saved Hugging Face dataset folder")
    except DataError:
        raise
    except Exception as err:  # fsspec backends raise their own errors (credentials, unknown protocol, network)
        raise DataError(f"cannot read {name}: {type(err).__name__}: {err}") from None


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _no_split(split: str | None, name: str) -> None:
    if split is not None:
        raise DataError(f"--split {split!r} applies only to a DatasetDict; {name} is a single dataset")


def _dataset_dict(source) -> dict | None:
    """``source`` if it is a ``datasets.DatasetDict`` or ``IterableDatasetDict`` (without importing datasets)."""
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(source, datasets.DatasetDict | datasets.IterableDatasetDict):
        return source
    return None


class Rows:
    """A re-iterable stream of row dicts from ``source`` (see the module docstring).

    Args:
        source: a local path or fsspec URL of a data file or saved dataset folder, a list of dicts, a
            ``datasets.Dataset`` / ``DatasetDict``, or a ``ray.data.Dataset``.
        storage_options: options of the URL's fsspec filesystem (e.g. ``endpoint_url``, ``key``, ``secret``).
        split: which split of a ``DatasetDict`` to read (required for one, refused for anything else).

    Raises :class:`DataError` at once when the source is missing, of an unknown format, or needs a split.
    """

    def __init__(self, source, storage_options: dict | None = None, split: str | None = None):
        options = dict(storage_options or {})
        self.name = str(source) if isinstance(source, str | Path) else type(source).__name__
        if isinstance(source, str) and _URL.match(source):
            self.source = _locate(source, source, options, split)
        elif isinstance(source, str | Path):
            path = Path(source).expanduser()
            self.source = _locate(str(path), str(source), {}, split)
        elif (splits := _dataset_dict(source)) is not None:
            self.source = splits[_choose_split(splits, split, f"the {type(source).__name__}")]
        else:
            _no_split(split, f"the {type(source).__name__}")
            self.source = source

    def __iter__(self) -> Iterator[dict]:
        src = self.source
        if isinstance(src, _File):
            try:
                yield from _READERS[src.suffix](src)
            except (UnicodeDecodeError, csv.Error) as err:
                raise DataError(f"{src.name}: unreadable ({err})") from None
        elif hasattr(src, "iter_rows"):  # ray.data.Dataset: streamed block by block
            yield from src.iter_rows()
        elif isinstance(src, Iterable) and not isinstance(src, str | bytes | dict):
            yield from src  # a list of dicts, a datasets.Dataset, a _SavedDataset
        else:
            raise DataError(f"cannot read examples from a {type(src).__name__}: give a file path or URL, a list of "
                            "dicts, a datasets.Dataset or a ray.data.Dataset")


# ---------------------------------------------------------------- validated records


def records(rows: Iterable[dict], fields: Fields, start: int = 0) -> Iterator[Record]:
    """Validated :class:`Record` objects; raises :class:`DataError` naming the row on bad input."""
    for index, row in enumerate(rows, start=start):
        where = f"row {index}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a mapping of fields, got {type(row).__name__}")
        text = _text(row, fields.text, where)
        example_id = str(row[fields.id]) if fields.id is not None and _has(row, fields.id, where) else str(index)
        meta = tuple((k, _meta_value(row, k, where)) for k in fields.keep)
        yield Record(index=index, id=example_id, text=text, target=_text(row, fields.target, where),
                     contrast=_text(row, fields.contrast, where), meta=meta)


def _has(row: dict, name: str, where: str) -> bool:
    if name not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{where}: missing field {name!r} (fields present: {present})")
    return True


def _text(row: dict, name: str | None, where: str) -> str | None:
    """The string in field ``name`` (every named field is required in every row)."""
    if name is None:
        return None
    _has(row, name, where)
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, not {type(value).__name__} ({value!r:.40})")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _meta_value(row: dict, name: str, where: str) -> str:
    _has(row, name, where)
    value = row[name]
    return value if isinstance(value, str) else json.dumps(value, default=str)


def record_digest(record: Record) -> bytes:
    """The bytes of a record that its attribution and its stored place depend on, for the dataset fingerprint:
    its index, id, texts and kept metadata (a self-delimiting JSON array)."""
    return json.dumps([record.index, record.id, record.text, record.target, record.contrast,
                       [list(item) for item in record.meta]], ensure_ascii=False).encode()
