"""Load a model and tokenizer from whatever the user names: the embedded default, a Hugging Face id or
local folder, a ``.gguf`` file, or objects already in memory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import embedded


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for attribution: parameters frozen, eval mode."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    revision: str | None = None
    source: dict = field(default_factory=dict)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _autoclass(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _model_kwargs(dtype, device_map, extra: dict | None) -> dict:
    kwargs = dict(extra or {})
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    else:
        kwargs.setdefault("dtype", torch.float32)
    if device_map is not None:
        kwargs["device_map"] = device_map
    return kwargs


def _gguf_cache(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = embedded.cache_root() / f"gguf-{path.stem}-{key}"
    if not (folder / "complete").is_file():
        try:
            embedded.convert_gguf(path, folder)
        except Exception as err:  # the GGUF reader raises many kinds of errors on a corrupt file
            raise ValueError(f"Could not read GGUF file {path}: {type(err).__name__}: {err}") from err
    return folder


def resolve_folder(spec: str) -> tuple[str, str]:
    """Map a model spec string to (folder or hub id, display name)."""
    if spec in embedded.EMBEDDED_MODELS:
        return str(embedded.converted_dir(spec)), spec
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {spec}")
        return str(_gguf_cache(path)), path.name
    if path.exists() and not path.is_dir():
        raise ValueError(f"{spec} is a file; give a model folder, a .gguf file or a Hugging Face model id")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path and not path.exists():
        raise FileNotFoundError(f"Model folder not found: {spec}")
    return spec, spec


def load(
    model: str | torch.nn.Module,
    tokenizer: Any = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    model_kwargs: dict | None = None,
    tokenizer_kwargs: dict | None = None,
) -> LoadedModel:
    """Load and freeze a model.

    Args:
        model: ``"smollm2-135m"`` (embedded), a hub id, a local folder, a ``.gguf`` file, or a
            ``PreTrainedModel`` (then ``tokenizer`` must be given or loadable from its name).
        tokenizer: a tokenizer object or name; defaults to the model's.
        dtype: e.g. ``"float32"`` (default) or ``"bfloat16"``.
        device: where to put the model (ignored when ``device_map`` is given).
        device_map: passed to ``from_pretrained`` (accelerate big-model placement).
    """
    from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

    _quiet_transformers()
    if isinstance(model, PreTrainedModel):
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
        if tokenizer is None:
            if not name or not Path(name).exists():
                raise ValueError("Pass tokenizer= with a model object whose tokenizer cannot be found by name.")
            tokenizer = name
        hf_model = model
        source = {"kind": "object", "class": type(model).__name__}
    elif isinstance(model, str):
        if not model.strip():
            raise ValueError("Empty model name")
        folder, name = resolve_folder(model)
        kwargs = _model_kwargs(dtype, device_map, model_kwargs)
        if revision is not None:
            kwargs["revision"] = revision
        try:
            config = AutoConfig.from_pretrained(folder, revision=revision)
        except OSError as err:
            raise FileNotFoundError(f"Cannot load model {model!r}: {err}") from err
        hf_model = _autoclass(config).from_pretrained(folder, **kwargs)
        tokenizer = tokenizer if tokenizer is not None else folder
        source = {"kind": "embedded" if model in embedded.EMBEDDED_MODELS else "pretrained", "path": folder}
    else:
        raise TypeError(f"model must be a name, a path or a PreTrainedModel, not {type(model).__name__}")

    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, **(tokenizer_kwargs or {}))
    if device is not None and device_map is None and getattr(hf_model, "hf_device_map", None) is None:
        hf_model = hf_model.to(device)
    hf_model.eval()
    hf_model.requires_grad_(False)
    _fill_special_tokens(hf_model, tokenizer)
    return LoadedModel(model=hf_model, tokenizer=tokenizer, name=name, revision=revision, source=source)


def _fill_special_tokens(model, tokenizer) -> None:
    """Inseq's fallbacks: pad <- eos, unk <- pad, so baselines always have a token to use."""
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if tokenizer.pad_token_id is None:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos
        if pad is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def describe(loaded: LoadedModel) -> dict:
    """Provenance of a loaded model for result metadata."""
    config = loaded.model.config
    return {
        "model_name": loaded.name,
        "model_class": type(loaded.model).__name__,
        "model_revision": loaded.revision,
        "model_config_hash": hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
        .hexdigest()[:16],
        "tokenizer_class": type(loaded.tokenizer).__name__,
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
    }
