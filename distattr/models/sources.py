"""Where a model's files come from: the folder or hub id of a model spec, and which loading options reach the
config and the tokenizer as well as the model.

A model spec is what ``load_model`` takes as a name: an embedded model (``smollm2-135m``), a local folder, a
Hugging Face id, a ``.gguf`` file (converted once into a cached folder) or a ``petals://`` spec (its local parts).
Both :mod:`.loading` and :mod:`.petals` load from here; neither imports the other's internals.

``model_kwargs`` go to the model's ``from_pretrained``. The config and the tokenizer come from the same place, so
the keys that say how to reach it go to them too:

=====================  ========================================================================
``AutoConfig``         :data:`HUB_KEYS` and :data:`CONFIG_ONLY_KEYS` (``trust_remote_code``...)
``AutoTokenizer``      :data:`HUB_KEYS` (``revision``...), when the tokenizer is the model's own;
                       ``tokenizer_kwargs`` override them
=====================  ========================================================================

Everything else in ``model_kwargs`` (``attn_implementation``, ``low_cpu_mem_usage``, ``dtype``...) is the
model's alone: ``AutoConfig.from_pretrained`` would store an unknown keyword as a config attribute.
``trust_remote_code`` is not passed to the tokenizer: running a repository's code is a decision per object,
so a tokenizer that needs it takes ``tokenizer_kwargs={"trust_remote_code": True}``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import embedded
from .petals_spec import is_petals_spec, parse_spec

HUB_KEYS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
"""``model_kwargs`` keys that say where and how to fetch the model's files: they reach its config and tokenizer."""

CONFIG_ONLY_KEYS = ("trust_remote_code", "code_revision", "subfolder")
"""``model_kwargs`` keys that reach the config as well as the model, but not the tokenizer."""


def resolve_folder(spec: str) -> tuple[str, str]:
    """Map a model spec string to (folder or hub id, display name).

    A ``petals://`` spec maps to the folder of its local parts (tokenizer, embeddings) and keeps the spec as its
    name; a ``.gguf`` file to its converted folder (converted on first use). Raises ``FileNotFoundError`` for a
    path-like spec or GGUF file that does not exist, ``ValueError`` for a plain file that is not a GGUF file.
    """
    if is_petals_spec(spec):
        return resolve_folder(parse_spec(spec).model)[0], spec
    if spec in embedded.EMBEDDED_MODELS:
        return str(embedded.converted_dir(spec)), spec
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {spec}")
        return str(gguf_folder(path)), path.name
    if path.exists() and not path.is_dir():
        raise ValueError(f"{spec} is a file; give a model folder, a .gguf file or a Hugging Face model id")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path and not path.exists():
        raise FileNotFoundError(f"Model folder not found: {spec}")
    return spec, spec


def gguf_folder(path: Path) -> Path:
    """The cached folder converted from the GGUF file ``path`` (keyed by its path, size and modification time),
    converting it first if needed; an unreadable file raises ``ValueError``."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = embedded.cache_root() / f"gguf-{path.stem}-{key}"
    if not embedded.is_complete(folder):
        try:
            embedded.convert_gguf(path, folder)
        except Exception as err:  # the GGUF reader raises many kinds of errors on a corrupt file
            raise ValueError(f"Could not read GGUF file {path}: {type(err).__name__}: {err}") from err
    return folder


def config_kwargs(model_kwargs: dict | None) -> dict:
    """The keyword arguments of ``AutoConfig.from_pretrained`` taken from ``model_kwargs`` (see the module
    docstring): the hub keys and :data:`CONFIG_ONLY_KEYS`."""
    keys = (*HUB_KEYS, *CONFIG_ONLY_KEYS)
    return {k: v for k, v in (model_kwargs or {}).items() if k in keys}


def own_tokenizer_kwargs(model_kwargs: dict | None, given: dict | None) -> dict:
    """The keyword arguments of ``AutoTokenizer.from_pretrained`` for the model's own tokenizer: the hub keys of
    ``model_kwargs`` (the same revision, token and cache as the weights), overridden by ``given`` (the caller's
    ``tokenizer_kwargs``)."""
    hub = {k: v for k, v in (model_kwargs or {}).items() if k in HUB_KEYS}
    return {**hub, **(given or {})}
