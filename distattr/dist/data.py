"""Dataset input for ``attribute-dataset``: records read lazily from JSONL, CSV, Parquet, a Hugging Face
``datasets`` dataset, a ``ray.data.Dataset`` or a list of dicts.

Every reader is re-iterable and streams: the driver reads the data twice (a survey, then the dispatch) and
never holds more than a window of records. Validation names the row at fault.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


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


def _json_lines(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object")
            yield row


def _json_array(path: Path) -> Iterator[dict]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of objects (or JSON lines)")
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {number} is a JSON {type(row).__name__}, not an object")
        yield row


def _csv_rows(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle)


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    for batch in parquet.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _hf_dataset_rows(path: Path) -> Iterator[dict]:
    import datasets

    yield from datasets.load_from_disk(str(path))


_READERS = {".jsonl": _json_lines, ".ndjson": _json_lines, ".json": None, ".csv": _csv_rows,
            ".parquet": _parquet_rows, ".pq": _parquet_rows}


def _file_rows(path: Path) -> Iterator[dict]:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _hf_dataset_rows(path)
        raise DataError(f"{path} is a folder but not a saved Hugging Face dataset (datasets.save_to_disk)")
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise DataError(f"{path}: unknown data format {suffix or '(no extension)'}; use .jsonl, .json, .csv or "
                        ".parquet, or a saved Hugging Face dataset folder")
    if suffix == ".json":  # JSON lines or one array
        with path.open(encoding="utf-8") as handle:
            first = handle.read(1024).lstrip()
        return _json_array(path) if first.startswith("[") else _json_lines(path)
    return _READERS[suffix](path)


class Rows:
    """A re-iterable stream of row dicts from ``source`` (see the module docstring)."""

    def __init__(self, source):
        self.source = source
        if isinstance(source, str | Path):
            path = Path(source).expanduser()
            if not path.exists():
                raise DataError(f"data file not found: {source}")
            self.source = path
        self.name = str(self.source) if isinstance(self.source, Path) else type(source).__name__

    def __iter__(self) -> Iterator[dict]:
        src = self.source
        if isinstance(src, Path):
            try:
                yield from _file_rows(src)
            except (UnicodeDecodeError, csv.Error) as err:
                raise DataError(f"{src}: unreadable ({err})") from None
        elif hasattr(src, "iter_rows"):  # ray.data.Dataset: streamed block by block
            yield from src.iter_rows()
        elif isinstance(src, Iterable) and not isinstance(src, str | bytes | dict):
            yield from src  # a list of dicts, a datasets.Dataset
        else:
            raise DataError(f"cannot read examples from a {type(src).__name__}: give a file path, a list of dicts, "
                            "a datasets.Dataset or a ray.data.Dataset")


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
    """The bytes of a record that its attribution depends on, for the dataset fingerprint."""
    return json.dumps([record.id, record.text, record.target, record.contrast], ensure_ascii=False).encode()
