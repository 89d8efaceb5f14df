"""Load a model and tokenizer from whatever the user names: the embedded default, a Hugging Face id or
local folder, a ``.gguf`` file, or objects already in memory.

What a name points to is :mod:`.sources`' answer, the result is a :class:`.loaded.LoadedModel`, and a
``petals://`` spec is handed to :mod:`.petals`; ``LoadedModel``, ``ObjectState`` and ``resolve_folder`` are also
importable from here."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..logs import quiet_transformers
from . import embedded, sources
from .loaded import LoadedModel, ObjectState, fill_special_tokens
from .petals_spec import is_petals_spec
from .quantization import describe_quantization, guard_4bit_gradients, quantization_config, quiet_int8_casts
from .sources import resolve_folder  # noqa: F401 (importable from here, as before the split)

logger = logging.getLogger(__name__)


def _autoclass(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _model_kwargs(dtype, extra: dict | None) -> dict:
    kwargs = dict(extra or {})
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    else:
        kwargs.setdefault("dtype", torch.float32)
    return kwargs


# ---------------------------------------------------------------- device maps and quantization

PLACEMENT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's device_map strings


def available_devices() -> list[str]:
    """Devices a device map or ``max_memory`` may name on this machine (``disk`` = offload to files)."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        devices += [f"xpu:{i}" for i in range(torch.xpu.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return [*devices, "disk"]


def _device_name(value, what: str) -> str:
    """A device of a device map or ``max_memory`` as ``available_devices`` spells it; unknown ones raise."""
    available = available_devices()
    if isinstance(value, bool) or not isinstance(value, int | str | torch.device):
        raise ValueError(f"{what}: {value!r} is not a device; available here: {', '.join(available)}")
    if isinstance(value, int):  # accelerate: an integer is an accelerator index
        name = f"xpu:{value}" if any(d.startswith("xpu") for d in available) and not torch.cuda.is_available() \
            else f"cuda:{value}"
    elif value == "disk":
        name = "disk"
    else:
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError(f"{what}: {value!r} is not a device; available here: {', '.join(available)}") from None
        index = device.index
        if index is None and device.type in ("cuda", "xpu"):
            index = 0
        name = device.type if index is None or device.type == "mps" else f"{device.type}:{index}"
    if name not in available:
        raise ValueError(f"{what} names device {name!r}, which does not exist on this machine; available: "
                         f"{', '.join(available)}")
    return name


def _module_device(device_map: dict, name: str):
    """The entry of ``device_map`` that places module ``name`` (the longest matching prefix), or None."""
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(keys, key=len)] if keys else None


def check_device_map(device_map, config=None) -> None:
    """Validate a ``device_map`` before loading: a placement strategy, one device, or ``{module: device}``.

    Every device must exist here (``disk`` always does). With the model's ``config``, a dict's module names are
    checked against the model (built on the ``meta`` device, no weights), and tied input/output embeddings must
    not be split between ``disk`` and another device (accelerate cannot load the tied weight then).
    """
    if isinstance(device_map, str) and device_map in PLACEMENT_STRATEGIES:
        return
    if not isinstance(device_map, dict):
        _device_name(device_map, "device_map")
        return
    if not device_map:
        raise ValueError("device_map is an empty dict")
    for module, device in device_map.items():
        if not isinstance(module, str):
            raise ValueError(f"device_map keys are module names, not {module!r}")
        _device_name(device, f"device_map[{module!r}]")
    if config is None:
        return
    from accelerate import init_empty_weights

    with init_empty_weights():
        meta = _autoclass(config).from_config(config)
    names = {name: m for name, m in meta.named_modules()}
    unknown = [k for k in device_map if k not in names]
    if unknown:
        top = [n for n in names if n and n.count(".") <= 1][:8]
        raise ValueError(f"device_map names module(s) {', '.join(map(repr, unknown))} that {type(meta).__name__} "
                         f"does not have; module names look like {', '.join(top)}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head = meta.get_output_embeddings()
    if getattr(text, "tie_word_embeddings", False) and head is not None:
        where = {id(m): n for n, m in names.items()}
        embed_name, head_name = where[id(meta.get_input_embeddings())], where[id(head)]
        a, b = _module_device(device_map, embed_name), _module_device(device_map, head_name)
        if a != b and "disk" in (a, b):
            raise ValueError(f"{head_name} shares its weight with {embed_name} (tied embeddings), so the device map "
                             f"must put both on the same device, not {a!r} and {b!r}")


def check_max_memory(max_memory: dict) -> dict:
    """Validate ``max_memory`` (``{device: size}``, e.g. ``{0: "20GiB", "cpu": "60GiB"}``) and return it with
    ``cuda:N`` keys written as accelerate wants them (``N``)."""
    from accelerate.utils import convert_file_size_to_int

    if not isinstance(max_memory, dict) or not max_memory:
        raise ValueError(f"max_memory must be a non-empty dict {{device: size}}, not {max_memory!r}")
    out = {}
    for key, size in max_memory.items():
        name = _device_name(key, "max_memory")
        try:
            if isinstance(size, bool) or convert_file_size_to_int(size) < 0:
                raise ValueError
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"max_memory[{key!r}] = {size!r} is not a size (e.g. '20GiB', '500MB' or bytes)") from None
        out[int(name.split(":")[1]) if name.startswith(("cuda:", "xpu:")) else name] = size
    return out


def _placement_kwargs(config, dtype, device, device_map, max_memory, quantization) -> dict:
    """``from_pretrained`` keyword arguments for quantization and big-model placement, validated."""
    kwargs: dict = {}
    if max_memory is not None:
        kwargs["max_memory"] = check_max_memory(max_memory)
        device_map = "auto" if device_map is None else device_map
    if quantization is not None:
        compute = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
        kwargs["quantization_config"] = quantization_config(quantization, compute)
        if device_map is None and device is not None:  # quantized weights cannot be moved after loading
            device_map = {"": device}
    if device_map is not None:
        check_device_map(device_map, config)
        kwargs["device_map"] = device_map
    return kwargs


def context_length(config) -> int | None:
    """The most positions ``config``'s model takes (tokens per sequence; for an encoder-decoder, per side):
    ``max_position_embeddings``, ``n_positions``, ``n_ctx`` or ``max_sequence_length`` of its text config; None for
    a model without a fixed limit (T5's relative positions)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def load(
    model: str | torch.nn.Module,
    tokenizer: Any = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    quantization: str | Any = None,
    revision: str | None = None,
    model_kwargs: dict | None = None,
    tokenizer_kwargs: dict | None = None,
) -> LoadedModel:
    """Load and freeze a model.

    Args:
        model: ``"smollm2-135m"`` (embedded), a hub id, a local folder, a ``.gguf`` file, a ``petals://`` spec
            (see :mod:`.petals`), or a ``PreTrainedModel`` (then ``tokenizer`` must be given or loadable from its
            name).
        tokenizer: a tokenizer object or name; defaults to the model's.
        dtype: e.g. ``"float32"`` (default) or ``"bfloat16"``.
        device: where to put the model (ignored when ``device_map`` is given).
        device_map: accelerate big-model placement, passed to ``from_pretrained``: ``"auto"`` (or another
            strategy of :data:`PLACEMENT_STRATEGIES`), one device, or ``{module name: device}`` with devices such
            as ``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``; validated first (see :func:`check_device_map`).
        max_memory: ``{device: size}`` for the placement, e.g. ``{0: "20GiB", "cpu": "60GiB"}`` (implies
            ``device_map="auto"`` when no map is given).
        quantization: ``"nf4"``, ``"int8"`` or a ``BitsAndBytesConfig`` (see :mod:`.quantization`), also in its
            JSON form ``{"bitsandbytes": config.to_dict()}`` (see :func:`portable_load_args`); needs bitsandbytes
            (``pip install 'distattr[quant]'``).
        revision: the hub revision (branch, tag or commit) of the model, its config and its own tokenizer; the
            same as ``model_kwargs={"revision": ...}``. Recorded in the result's metadata.
        model_kwargs: more keywords of the model's ``from_pretrained``; those that say where the files are
            (``token``, ``cache_dir``...) and ``trust_remote_code`` also reach the config, and the former the
            model's own tokenizer (see :mod:`.sources` for the keys).
        tokenizer_kwargs: keywords of ``AutoTokenizer.from_pretrained``; they win over those taken from
            ``model_kwargs``.

    A model object passed in is changed in place (see :class:`ObjectState`, which records how it was):
    ``eval()``, ``requires_grad_(False)``, the tokenizer's pad token and ``config.pad_token_id`` filled from EOS
    when unset, bitsandbytes 4-bit layers' CPU repacking switched off, and moved to ``device`` when given.
    transformers' warnings and progress bars are quiet while loading (see :func:`distattr.logs.quiet_transformers`).
    """
    quantization = quantization_from_json(quantization)
    if is_petals_spec(model):  # "petals://...": the decoder blocks run in a Petals swarm (models/petals.py)
        from .petals import load_remote

        return load_remote(model, tokenizer, dtype=dtype, device=device, model_kwargs=model_kwargs,
                           tokenizer_kwargs=tokenizer_kwargs, device_map=device_map, max_memory=max_memory,
                           quantization=quantization, revision=revision)
    revision, model_kwargs = _with_revision(revision, model_kwargs)
    placement = {"device": device, "device_map": device_map, "max_memory": max_memory, "quantization": quantization}
    with quiet_transformers():
        if isinstance(model, str):
            hf_model, name, source = _load_named(model, dtype, placement, model_kwargs)
            own_tokenizer = tokenizer is None
            tokenizer = source["path"] if own_tokenizer else tokenizer
        else:
            hf_model, name, source = _given_model(model, placement)
            own_tokenizer = False
            tokenizer = tokenizer if tokenizer is not None else _tokenizer_folder(name)
        if isinstance(tokenizer, str):
            kwargs = sources.own_tokenizer_kwargs(model_kwargs, tokenizer_kwargs) if own_tokenizer else tokenizer_kwargs
            tokenizer = _load_tokenizer(tokenizer, kwargs)
    given = ObjectState.capture(hf_model, tokenizer) if source["kind"] == "object" else None
    hf_model = _prepare(hf_model, tokenizer, placement)
    return LoadedModel(model=hf_model, tokenizer=tokenizer, name=name, revision=revision, source=source, given=given)


def _with_revision(revision: str | None, model_kwargs: dict | None) -> tuple[str | None, dict]:
    """``revision`` (from the argument or ``model_kwargs``, which must not disagree) and ``model_kwargs``
    holding it, so that the model, its config and its tokenizer read the same revision."""
    kwargs = dict(model_kwargs or {})
    if revision is not None and kwargs.get("revision", revision) != revision:
        raise ValueError(f"revision={revision!r} and model_kwargs['revision']={kwargs['revision']!r} differ; "
                         "give one")
    revision = revision if revision is not None else kwargs.get("revision")
    if revision is not None:
        kwargs["revision"] = revision
    return revision, kwargs


def _load_named(spec: str, dtype, placement: dict, model_kwargs: dict) -> tuple[torch.nn.Module, str, dict]:
    """(model, display name, source) of a model spec string loaded with transformers."""
    from transformers import AutoConfig

    if not spec.strip():
        raise ValueError("Empty model name")
    folder, name = sources.resolve_folder(spec)
    logger.info("loading model %s from %s", name, folder)
    try:
        config = AutoConfig.from_pretrained(folder, **sources.config_kwargs(model_kwargs))
    except OSError as err:
        raise FileNotFoundError(f"Cannot load model {spec!r}: {err}") from err
    kwargs = _model_kwargs(dtype, model_kwargs)
    kwargs.update(_placement_kwargs(config, dtype, **placement))
    hf_model = _autoclass(config).from_pretrained(folder, **kwargs)
    return hf_model, name, {"kind": "embedded" if spec in embedded.EMBEDDED_MODELS else "pretrained", "path": folder}


def _given_model(model: Any, placement: dict) -> tuple[torch.nn.Module, str, dict]:
    """(model, display name, source) of a model object passed in; loading options other than ``device`` are
    refused (they apply when distattr loads the model)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a name, a path or a PreTrainedModel, not {type(model).__name__}")
    loading_only = [k for k in ("device_map", "max_memory", "quantization") if placement[k] is not None]
    if loading_only:
        raise ValueError(f"{', '.join(loading_only)} apply when distattr loads the model from its name or folder; "
                         "this model object is loaded already (pass quantization_config= / device_map= to its "
                         "from_pretrained)")
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    return model, name, {"kind": "object", "class": type(model).__name__}


def _tokenizer_folder(name: str) -> str:
    """The folder of a model object's tokenizer, found by the model's name (its ``name_or_path``)."""
    if not name or not Path(name).exists():
        raise ValueError("Pass tokenizer= with a model object whose tokenizer cannot be found by name.")
    return name


def _load_tokenizer(name: str, kwargs: dict | None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, **(kwargs or {}))


def _prepare(hf_model: torch.nn.Module, tokenizer: Any, placement: dict) -> torch.nn.Module:
    """The model moved to ``device`` (unless placed or quantized while loading), in eval mode with frozen
    parameters, guarded for 4-bit gradients, with its pad tokens filled (see :func:`.loaded.fill_special_tokens`)."""
    placed = placement["device_map"] is not None or getattr(hf_model, "hf_device_map", None) is not None
    if placement["device"] is not None and not placed and placement["quantization"] is None:
        hf_model = hf_model.to(placement["device"])
    hf_model.eval()
    hf_model.requires_grad_(False)
    guard_4bit_gradients(hf_model)  # before any forward: see models/quantization.py
    if getattr(hf_model, "is_loaded_in_8bit", False):
        quiet_int8_casts()
    fill_special_tokens(hf_model, tokenizer)
    return hf_model


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
        **_placement_info(loaded.model),
    }


def _placement_info(model) -> dict:
    """``quantization`` (see :func:`.quantization.describe_quantization`) and ``device_map`` (module -> device,
    as accelerate placed it) of a quantized or device-mapped model; nothing for a plain one."""
    info = {}
    quantized = describe_quantization(model)
    if quantized is not None:
        info["quantization"] = quantized
    device_map = getattr(model, "hf_device_map", None)
    if device_map is not None:
        info["device_map"] = {k: v if isinstance(v, int) else str(v) for k, v in device_map.items()}
    return info


# ---------------------------------------------------------------- load arguments as JSON

BITSANDBYTES_KEY = "bitsandbytes"
"""``quantization={"bitsandbytes": BitsAndBytesConfig.to_dict()}`` is the JSON form of a ``BitsAndBytesConfig``."""

_HINTS = {
    "dtype": 'a dtype name such as "bfloat16"',
    "quantization": '"nf4", "int8" or a transformers.BitsAndBytesConfig',
    "device": 'a device name such as "cuda:0"',
}


def quantization_from_json(spec: Any) -> Any:
    """The ``BitsAndBytesConfig`` of the JSON form ``{"bitsandbytes": {...}}``; anything else as it is."""
    if isinstance(spec, dict) and set(spec) == {BITSANDBYTES_KEY}:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig.from_dict(dict(spec[BITSANDBYTES_KEY]))
    return spec


def _quantization_to_json(config: Any, where: str) -> dict:
    doc = {BITSANDBYTES_KEY: config.to_dict()}
    if quantization_from_json(json.loads(json.dumps(doc))).to_dict() != doc[BITSANDBYTES_KEY]:
        raise ValueError(f"{where}: this BitsAndBytesConfig does not read back the same from its to_dict(); pass a "
                         'preset name ("nf4" or "int8") instead')
    return doc


def portable_load_args(load_args: dict) -> dict:
    """``load_args`` (:func:`load` keywords) in a JSON form that :func:`load` reads with the same meaning, for a
    dataset job, whose store records them as JSON and whose actors receive them.

    A ``torch.dtype`` becomes its name (``torch.bfloat16`` -> ``"bfloat16"``), a ``torch.device`` its string, a
    tuple a list, and a ``BitsAndBytesConfig`` given as ``quantization`` becomes ``{"bitsandbytes":
    config.to_dict()}``. Anything else that is not a string, finite number, bool, None, list or dict (with string
    or int keys) raises ``ValueError`` naming the argument and what to pass instead.
    """
    from transformers import BitsAndBytesConfig

    def convert(value: Any, where: str, key: str) -> Any:
        if value is None or isinstance(value, str | bool | int):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{where} is {value}, which JSON cannot hold; pass a finite number")
            return value
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        if isinstance(value, torch.device):
            return str(value)
        if isinstance(value, BitsAndBytesConfig):
            if where != "load_args['quantization']":
                raise ValueError(f"{where} is a BitsAndBytesConfig; pass it as load_args['quantization'] instead")
            return _quantization_to_json(value, where)
        if isinstance(value, list | tuple):
            return [convert(v, f"{where}[{i}]", key) for i, v in enumerate(value)]
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str | int) or isinstance(k, bool):
                    raise ValueError(f"{where} has the key {k!r}; JSON keys are strings (or ints)")
                out[k] = convert(v, f"{where}[{k!r}]", key)
            return out
        hint = _HINTS.get(key, "a string, number, bool, None, or a list or dict of these")
        raise ValueError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which the store's job "
                         f"identity (JSON) cannot hold; pass {hint} instead")

    if not isinstance(load_args, dict):
        raise ValueError(f"load_args must be a dict of load_model keywords, not {type(load_args).__name__}")
    return {k: convert(v, f"load_args[{k!r}]", k) for k, v in load_args.items()}
