"""What model a job ran: short hashes of its weights and its tokenizer, cheap enough to take on every job start.

``model_identity(spec)`` answers for every model spec that :func:`distattr.models.sources.resolve_folder`
understands, without contacting the hub and without reading whole weight files:

============  =====================================================================================
source        what is hashed
============  =====================================================================================
folder        the folder's weight files and tokenizer files (its path is left out: a copy is the same)
hub           the snapshot of the id in the local Hugging Face cache; ``commit`` is its folder name
embedded      the converted folder of an embedded model (``smollm2-135m``)
gguf          the converted folder of a ``.gguf`` file (converted on first use, as loading does)
petals        the local parts (a folder, hub id or embedded name) plus the swarm's ``dht_prefix``
============  =====================================================================================

``weights`` hashes, per weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``, ``*.h5``,
``*.msgpack``) in name order: its name and size and a sample of its bytes; plus the shard index files
(``*.index.json``). A safetensors sample is the header (every tensor's name, dtype, shape and offsets), the first
4 KiB of every tensor and the last 1 MiB of the file; another file's sample is its first and last 1 MiB and
64 KiB at 16 evenly spaced offsets. A sample is not a checksum: two files that differ only outside it (say one
weight in the middle of a tensor) get the same identity; a retrained or fine-tuned tensor changes its first
4 KiB. ``tokenizer`` is the sha256 of the tokenizer files' names and whole contents (they are small).
Hashes are the first 16 hex digits of a sha256; None where the folder has no such files.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from . import embedded
from .petals_spec import is_petals_spec, parse_spec
from .sources import resolve_folder

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "merges.txt", "chat_template.jinja", "chat_template.json")
TOKENIZER_PATTERNS = ("vocab*", "*.model", "*.spm", "*.tiktoken")  # sentencepiece (spiece.model, source.spm)

EDGE_BYTES = 1 << 20  # first / last bytes sampled of a weight file
TENSOR_BYTES = 4096  # first bytes sampled of each safetensors tensor
SPREAD_SAMPLES, SPREAD_BYTES = 16, 64 << 10  # evenly spaced samples of a non-safetensors weight file
_MAX_HEADER = 100 << 20  # a larger safetensors header length means the file is something else
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def model_identity(spec: str, revision: str | None = None) -> dict:
    """``{"source": ..., "weights": "<hex16>" | None, "tokenizer": "<hex16>" | None, ...}`` for a model spec.

    Args:
        spec: a model folder, a hub id (found in the local Hugging Face cache only), an embedded model name,
            a ``.gguf`` file or a ``petals://`` spec.
        revision: the hub revision (branch, tag or commit; default ``main``); ignored for the other sources.

    Returns:
        ``source`` (see the module docstring), ``weights`` and ``tokenizer`` hashes; for ``hub`` also ``repo``
        and ``commit`` (None, with None hashes, when the cache holds no snapshot of that revision); for
        ``petals`` also ``parts`` (the local parts' source) and ``dht_prefix``.

    Raises:
        FileNotFoundError: a path-like spec (or GGUF file) that does not exist.
    """
    if is_petals_spec(spec):
        parsed = parse_spec(spec)
        parts = model_identity(parsed.model, revision)
        return {**parts, "source": "petals", "parts": parts["source"], "dht_prefix": parsed.dht_prefix}
    if spec in embedded.EMBEDDED_MODELS:
        return {"source": "embedded", **folder_identity(resolve_folder(spec)[0])}
    if spec.endswith(".gguf"):
        return {"source": "gguf", **folder_identity(resolve_folder(spec)[0])}
    path = Path(spec).expanduser()
    if path.is_dir():
        return {"source": "folder", **folder_identity(path)}
    resolve_folder(spec)  # raises for a missing path-like spec or a plain file
    commit, snapshot = cached_snapshot(spec, revision)
    hashes = folder_identity(snapshot) if snapshot is not None else {"weights": None, "tokenizer": None}
    return {"source": "hub", "repo": spec, "commit": commit, **hashes}


def folder_identity(folder: str | Path) -> dict:
    """``{"weights": ..., "tokenizer": ...}`` of a model folder (top-level files; symlinks are followed)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json")]
    tokenizer = [p for p in files if p.name in TOKENIZER_NAMES or any(p.match(g) for g in TOKENIZER_PATTERNS)]
    weight_hash = hashlib.sha256()
    for path in weights:
        weight_hash.update(_entry(path.name, path.stat().st_size))
        with path.open("rb") as handle:
            for piece in _sample(path, handle):
                weight_hash.update(_entry("", len(piece)))
                weight_hash.update(piece)
    token_hash = hashlib.sha256()
    for path in tokenizer:
        token_hash.update(_entry(path.name, 0) + hashlib.sha256(path.read_bytes()).digest())
    return {"weights": weight_hash.hexdigest()[:16] if weights else None,
            "tokenizer": token_hash.hexdigest()[:16] if tokenizer else None}


def cached_snapshot(repo_id: str, revision: str | None = None) -> tuple[str | None, Path | None]:
    """``(commit, snapshot folder)`` of a hub model's ``revision`` in the local Hugging Face cache
    (``$HF_HUB_CACHE/models--org--name/{refs/<revision>, snapshots/<commit>}``); ``(None, None)`` if not cached.
    Never contacts the hub."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    revision = revision or "main"
    ref = repo / "refs" / revision
    commit = revision if _COMMIT.match(revision) else (ref.read_text().strip() if ref.is_file() else None)
    snapshot = repo / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        return None, None
    return commit, snapshot


def _entry(name: str, size: int) -> bytes:
    """A length-prefixed record for a hash stream (no two sequences of entries hash the same bytes)."""
    raw = name.encode()
    return len(raw).to_bytes(4, "little") + raw + size.to_bytes(8, "little")


def _sample(path: Path, handle: BinaryIO) -> Iterator[bytes]:
    """The sampled bytes of one weight file (see the module docstring)."""
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        header = _safetensors_header(handle, size)
        if header is not None:
            raw, tensors = header
            yield raw
            base = 8 + len(raw)
            for start, end in sorted(info["data_offsets"] for name, info in tensors.items() if name != "__metadata__"):
                handle.seek(base + start)
                yield handle.read(min(TENSOR_BYTES, end - start))
            handle.seek(max(size - EDGE_BYTES, base))
            yield handle.read()
            return
    if size <= 2 * EDGE_BYTES + SPREAD_SAMPLES * SPREAD_BYTES:
        handle.seek(0)
        yield handle.read()
        return
    offsets = [0] + [size * (i + 1) // (SPREAD_SAMPLES + 1) for i in range(SPREAD_SAMPLES)] + [size - EDGE_BYTES]
    for i, offset in enumerate(offsets):
        handle.seek(offset)
        yield handle.read(EDGE_BYTES if i in (0, len(offsets) - 1) else SPREAD_BYTES)


def _safetensors_header(handle: BinaryIO, size: int) -> tuple[bytes, dict] | None:
    """The raw and parsed JSON header of a safetensors file (its first 8 bytes: the header length, little-endian);
    None if the file is not one."""
    handle.seek(0)
    length = int.from_bytes(handle.read(8), "little")
    if not 2 <= length <= min(size - 8, _MAX_HEADER):
        return None
    raw = handle.read(length)
    try:
        tensors = json.loads(raw)
    except ValueError:
        return None
    return (raw, tensors) if isinstance(tensors, dict) else None
