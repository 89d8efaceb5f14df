"""Memory planner for models that do not fit here: device map, weights per device, batch size and passes.

``plan(model, devices, quantization, method, max_length, generated)`` builds the model from its config on the
``meta`` device (accelerate's ``init_empty_weights``: no weights, no memory), sizes every tensor the way it
will be loaded, and finds the largest batch of ``max_length``-token rows for which accelerate's
``infer_auto_device_map`` (decoder blocks never split, devices filled in order) can place every decoder block
together with its activations for that batch. The resulting ``device_map`` is meant for
``load_model(..., device_map=plan.device_map)``: accelerate's balanced placement of the weights alone
(``device_map="auto"``) gives the busiest of 4 x 80 GiB GPUs 23 of Llama-3-70B's 80 blocks (NF4), and the
activations of each row then need 23 blocks' worth of room there, against 21 with this placement.

Weights. Unquantized tensors take their dtype's size. With bitsandbytes quantization transformers replaces
exactly the modules of type ``nn.Linear`` (and GPT-2's ``Conv1D``) except the output embeddings, tied weights
and the model's last module (``get_keys_to_not_convert``), so embeddings, the LM head, norms, and fused
tensors such as transformers 5's mixture-of-experts weights (``MixtralExperts.gate_up_proj``, a 3-D
parameter) stay in the compute dtype. A quantized ``[out, in]`` weight of ``n = out * in`` values takes
(bitsandbytes 0.50, counted on the CPU):

* NF4/FP4: ``n / 2`` bytes of packed codes, one absmax per block of 64 values (float32; with double
  quantisation uint8, plus one float32 absmax per 256 blocks), and per layer a 16-entry code table (double
  quantisation: also a 256-entry table and an offset) -- 4.5 bits per value, 4.127 with double quantisation;
* int8 (LLM.int8()): ``n`` bytes plus one float32 scale per output row.

Activations. ``distattr.models.memory`` gives the bytes one token of a row keeps per decoder layer for a
backward (the measured peak, see its docstring); a device holding ``k`` decoder blocks needs
``rows x length x k`` of them, the device of the LM head also the scored logits (``[K, V]`` plus float32
probabilities and their gradient). Forward-only methods keep no activations: like the engine, they get
``NO_GRAD_BUDGET_FACTOR`` times the rows. Accelerators keep ``reserve`` bytes free (CUDA context, allocator
slack; accelerate's guide: 1-2 GB).

Rows and passes come from the engine's own cost model (:mod:`distattr.methods.rows`): the steps of an example
are grouped into units (:func:`~distattr.methods.rows.choose_width`), a unit becomes one row per path point,
rows are packed under the token budget (:func:`~distattr.methods.rows.pack`) and the step backwards of a batch
run in groups bounded by the kernel's :class:`~distattr.methods.gradient.Memory`, as in
:mod:`distattr.methods.gradient`.

Recomputation. When not even one row fits with every block's activations (or when asked), the plan is that of
the gradient kernel's block-wise recomputation (:mod:`distattr.models.recompute`): a block keeps the hidden state
entering it (``length x hidden`` per row) and each device the activations of the one block being recomputed plus
the batched step backwards through it. Each backward pass then costs one more forward through the blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import methods as method_registry
from .configs import SHIPPED_CONFIGS, config_path
from .methods import build_args
from .methods.base import NO_GRAD_BUDGET_FACTOR, Example
from .methods.gradient import Memory
from .methods.rows import RowModel, Unit, choose_width, pack, plan_units
from .models.loading import context_length
from .models.memory import (
    activation_bytes_per_layer_token,
    decoder_layer_count,
    default_token_budget,
    hidden_size,
    recompute_kept_share,
)
from .options import RECOMPUTE_CHOICES

GIB = 2**30
GB = 10**9
ACCELERATOR_RESERVE = 2 * GIB  # per accelerator: CUDA context and allocator slack (accelerate's guide: 1-2 GB)

BLOCK_4BIT = 64  # values per absmax (bitsandbytes' default blocksize)
BLOCK_NESTED = 256  # first-level absmax values per float32 absmax under double quantisation
CODE_4BIT_BYTES = 16 * 4  # the NF4/FP4 code table of a layer's quant state (float32)
CODE_NESTED_BYTES = 256 * 4 + 4  # double quantisation: the 8-bit code table and the float32 offset
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
# Recomputation's working room per device, in units of one block's activations for the batch (the activation
# model of distattr.models.memory), measured on SmolLM2-135M (float32, CPU, live tensors: benchmarks/
# bench_long_context.py): the recomputed block and its backward take RECOMPUTE_BLOCK, each step slot of a
# batched backward RECOMPUTE_SLOT more, and the peak is never below RECOMPUTE_PEAK_FLOOR (the recomputation's
# forward). 1,024 tokens: 2.43 for 1 or 2 slots, 5.9 for 7.
RECOMPUTE_BLOCK = 1.5
RECOMPUTE_SLOT = 0.635
RECOMPUTE_PEAK_FLOOR = 2.43
_ACTIVATIONS = "_planned_activations"  # name of the placeholder buffers that carry activations during placement

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlanError(ValueError):
    """The run cannot be planned as asked: bad input, or the memory is too small (the message says by how much)."""


# ---------------------------------------------------------------- devices


@dataclass(frozen=True)
class Device:
    """One device of the plan: ``key`` is accelerate's ``max_memory`` key (an accelerator index, or ``"cpu"``)."""

    key: int | str
    memory: int  # bytes

    @property
    def name(self) -> str:
        return "cpu" if self.key == "cpu" else f"cuda:{self.key}"


def parse_size(text: str | int) -> int:
    """``"80GiB"`` -> bytes. Units: B, KB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB (powers of 2)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise PlanError(f"a memory size must be positive, not {text}")
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise PlanError(f"{text!r} is not a memory size; write e.g. 80GiB, 24GB or 512MiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise PlanError(f"a memory size must be positive, not {text!r}")
    return size


def parse_devices(spec: str | Mapping | list[Device] | tuple[Device, ...]) -> tuple[Device, ...]:
    """Devices from ``"4x80GiB"``, ``"80GiB,80GiB"``, ``"cpu=64GiB"``, ``"2x40GiB,cpu=64GiB"`` (accelerators are
    numbered in order), a ``{0: "80GiB", "cpu": "64GiB"}`` mapping, or :class:`Device` objects."""
    if isinstance(spec, list | tuple) and all(isinstance(d, Device) for d in spec):
        devices = tuple(spec)
    elif isinstance(spec, Mapping):
        devices = tuple(Device(k if k == "cpu" else _index(k), parse_size(v)) for k, v in spec.items())
    elif isinstance(spec, str):
        devices, index = [], 0
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                raise PlanError(f"empty entry in the device list {spec!r}")
            if item.lower().startswith("cpu="):
                devices.append(Device("cpu", parse_size(item[4:])))
                continue
            count, times, size = item.partition("x") if re.match(r"^\d+\s*x", item) else ("1", "", item)
            for _ in range(int(count)):
                devices.append(Device(index, parse_size(size)))
                index += 1
        devices = tuple(devices)
    else:
        raise PlanError(f"devices must be a string like '4x80GiB', a mapping or Device objects, not {spec!r}")
    keys = [d.key for d in devices]
    if not devices:
        raise PlanError("no devices given; write e.g. --devices 4x80GiB or --devices cpu=64GiB")
    if len(set(keys)) != len(keys):
        raise PlanError(f"a device is listed twice in {spec!r}")
    return devices


def _index(key) -> int:
    text = str(key).removeprefix("cuda:")
    if not text.isdigit():
        raise PlanError(f"{key!r} is not a device; use accelerator indices (0, 1, ... or cuda:N) or 'cpu'")
    return int(text)


# ---------------------------------------------------------------- weights


def quantized_linear_bytes(out_features: int, in_features: int, quantization: str, double_quant: bool = True) -> int:
    """Bytes of one bitsandbytes-quantized ``[out, in]`` linear weight (bias excluded: it keeps its dtype)."""
    n = out_features * in_features
    if quantization in ("nf4", "fp4"):
        blocks = math.ceil(n / BLOCK_4BIT)
        nested = blocks + 4 * math.ceil(blocks / BLOCK_NESTED) + CODE_NESTED_BYTES  # uint8 absmax + float32 ones
        scales = nested if double_quant else 4 * blocks
        return math.ceil(n / 2) + scales + CODE_4BIT_BYTES
    if quantization == "int8":
        return n + 4 * out_features
    raise PlanError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")


@dataclass(frozen=True)
class WeightGroup:
    """Parameters of one kind: ``linear layers`` (the ``nn.Linear`` weights bitsandbytes quantizes, quantized or
    not), ``embeddings + head``, ``other`` (norms, biases, fused expert weights...): count and bytes."""

    params: int
    bytes: int


def load_config(model):
    """The transformers config of ``model``: a shipped name (``llama-3-70b``...), a ``config.json`` file, a model
    folder or hub id, a ``PretrainedConfig``, or a loaded model. Returns ``(config, display name)``."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model, getattr(model, "name_or_path", "") or type(model).__name__
    if isinstance(model, nn.Module):
        return model.config, getattr(model.config, "name_or_path", "") or type(model).__name__
    if not isinstance(model, str) or not model.strip():
        raise PlanError(f"model must be a name, a config.json path, a folder or a config object, not {model!r}")
    source = config_path(model) if model in SHIPPED_CONFIGS else model
    if str(source).endswith(".json") and not Path(source).is_file():
        raise PlanError(f"config file not found: {model}")
    try:
        return AutoConfig.from_pretrained(str(source)), model
    except (OSError, ValueError) as err:
        raise PlanError(f"cannot read the config of {model!r} ({' '.join(str(err).split())[:300]}); shipped "
                        f"configs: {', '.join(SHIPPED_CONFIGS)}") from None


@contextmanager
def _quiet():
    """Silence accelerate's 'device N is not available' warnings: the planned devices need not exist here."""
    loggers = [logging.getLogger(name) for name in ("accelerate.utils.modeling", "transformers.modeling_utils")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # "... bytes of buffer for offloaded layers": offloading is refused anyway
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def build_meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` on the ``meta`` device, parameters in ``dtype``, tied weights tied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with init_empty_weights(), _quiet():
        model = cls.from_config(config, dtype=dtype)
    model.tie_weights()  # init_empty_weights skips it; from_pretrained ties, and accelerate must count once
    return model


def _not_converted(model: nn.Module) -> list[str]:
    """Module names bitsandbytes leaves alone: transformers' ``get_keys_to_not_convert`` (tied weights, the
    output embeddings, the module of the last parameter) plus ``_keep_in_fp32_modules``."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names = {*tied.keys(), *tied.values(), list(model.named_parameters())[-1][0]}
    head = model.get_output_embeddings()
    names |= {n for n, m in model.named_modules() if head is not None and m is head}
    names |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return [n.removesuffix(".weight") for n in names]


def _converted(name: str, skip: list[str]) -> bool:
    return not any(name == k or name.startswith(k + ".") or name.endswith(k) for k in skip)


def quantize_meta(model: nn.Module, quantization: str, double_quant: bool) -> dict[str, WeightGroup]:
    """Give every linear layer that bitsandbytes quantizes a ``uint8`` meta weight of its quantized size (so that
    accelerate's size accounting sees the loaded bytes); return the weights grouped by kind."""
    from transformers.pytorch_utils import Conv1D

    embeddings = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    embeddings |= {id(m) for m in model.modules() if isinstance(m, nn.Embedding)}
    skip = _not_converted(model)
    groups = {"linear layers": [0, 0], "embeddings + head": [0, 0], "other": [0, 0]}
    linear: set[int] = set()
    for name, module in model.named_modules():
        if (type(module) is nn.Linear or isinstance(module, Conv1D)) and _converted(name, skip):
            if quantization != "none":
                out_f, in_f = (module.weight.shape[1], module.weight.shape[0]) if isinstance(module, Conv1D) \
                    else (module.out_features, module.in_features)
                size = quantized_linear_bytes(out_f, in_f, quantization, double_quant)
                groups["linear layers"][0] += out_f * in_f
                module.weight = nn.Parameter(torch.empty(size, dtype=torch.uint8, device="meta"), requires_grad=False)
            linear.add(id(module.weight))
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:  # a tied weight is one tensor
                continue
            seen.add(id(param))
            kind = "linear layers" if id(param) in linear else "embeddings + head" if id(module) in embeddings \
                else "other"
            if quantization == "none" or kind != "linear layers":
                groups[kind][0] += param.numel()
            groups[kind][1] += param.numel() * param.element_size()
    return {k: WeightGroup(*v) for k, v in groups.items()}


# ---------------------------------------------------------------- placement


def _module_device(device_map: Mapping[str, int | str], name: str):
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(keys, key=len)] if keys else None


@contextmanager
def activation_buffers(model: nn.Module, sizes: Mapping[str, int]):
    """While the block is open, module ``name`` holds a ``uint8`` meta buffer of ``sizes[name]`` bytes (the
    activations of a batch), so that accelerate places each block's weights and activations together."""
    owners = [(model.get_submodule(name), size) for name, size in sizes.items() if size > 0]
    for module, size in owners:
        module.register_buffer(_ACTIVATIONS, torch.empty(size, dtype=torch.uint8, device="meta"), persistent=False)
    try:
        yield
    finally:
        for module, _ in owners:
            delattr(module, _ACTIVATIONS)


def place(model: nn.Module, limits: Mapping[int | str, int]) -> dict[str, int | str]:
    """accelerate's ``infer_auto_device_map`` over ``limits`` (devices filled in order, decoder blocks kept whole;
    what does not fit goes to ``cpu``/``disk``). accelerate keeps the largest remaining layer's size free on its
    main devices for offloaded layers; offloading is not planned, so that room is given back -- unless accelerate
    then fills a device past its limit (it stops reserving when it places the largest layer itself): that device
    is placed again without the give-back."""
    from accelerate.utils import compute_module_sizes, infer_auto_device_map
    from accelerate.utils.modeling import get_max_layer_size

    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    sizes = compute_module_sizes(model)
    top = [*model.named_parameters(recurse=False), *model.named_children(), *model.named_buffers(recurse=False)]
    accelerators = sorted(k for k in limits if k != "cpu")
    main = {accelerators[0], "cpu"} if accelerators else {"cpu"}
    give_back = dict.fromkeys(main, get_max_layer_size(top, sizes, no_split)[0])
    for _ in range(2):
        max_memory = {k: int(v) + give_back.get(k, 0) for k, v in limits.items() if v > 0}
        if not max_memory:
            return {"": "disk"}
        with _quiet():
            device_map = dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split))
        over = {k: sum(sizes[m] for m, d in device_map.items() if d == k) - limits[k] for k in main if k in limits}
        if all(v <= 0 for v in over.values()):
            break
        give_back = {k: 0 if over.get(k, 0) > 0 else v for k, v in give_back.items()}
    return device_map


def decoder_blocks(model: nn.Module) -> list[str]:
    """Names of the model's transformer blocks (instances of its ``_no_split_modules`` classes)."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    return [n for n, m in model.named_modules() if type(m).__name__ in classes]


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class DevicePlan:
    """One device: its memory, what is reserved, the weights and decoder blocks placed on it, the activations of
    the planned batch, and what is left (bytes)."""

    name: str
    memory: int
    reserved: int
    weights: int
    blocks: int
    activations: int
    free: int
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """What a run of ``method`` over examples of ``max_length`` tokens needs (bytes unless stated).

    ``weight_bytes``: parameters and buffers as loaded (``weight_groups``: the parameters by kind).
    ``device_map`` can be passed to ``load_model(..., device_map=plan.device_map)``; ``token_budget`` to
    ``attribute(..., token_budget=plan.token_budget)``. ``rows`` counts rows per example (a row is one forward
    over a unit's prefix; a unit serves ``steps_per_row`` generated tokens); ``forward_passes`` and
    ``backward_passes`` are for ``examples`` examples. ``recompute``: the rows keep only the hidden states between
    decoder blocks and every backward pass recomputes the blocks (``recompute_passes`` extra block forwards, one
    per backward pass).
    """

    model: str
    model_class: str
    dtype: str
    quantization: str
    double_quant: bool
    method: str
    method_args: dict
    max_length: int
    generated: int
    examples: int
    n_params: int
    weight_bytes: int
    weight_groups: dict[str, WeightGroup]
    device_map: dict[str, int | str]
    devices: tuple[DevicePlan, ...]
    activation_bytes_per_token: int
    row_activation_bytes: int
    rows_per_batch: int
    token_budget: int
    steps_per_row: int
    rows: int
    forward_passes: int
    backward_passes: int
    recompute: bool = False
    recompute_passes: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """A readable summary (what ``distattr plan`` prints)."""
        return "\n".join(_table_lines(self))


def plan(
    model,
    devices,
    quantization: str | None = None,
    method: str = "integrated_gradients",
    max_length: int = 512,
    generated: int = 64,
    *,
    dtype: str | torch.dtype = "bfloat16",
    n_steps: int | None = None,
    method_args: Mapping | None = None,
    examples: int = 1,
    double_quant: bool = True,
    steps_per_row: int | None = None,
    reserve: int | str | None = None,
    recompute: str = "auto",
) -> Plan:
    """Plan an attribution run of ``model`` on ``devices`` without loading any weights.

    Args:
        model: a shipped config name (:data:`distattr.configs.SHIPPED_CONFIGS`: ``llama-3-70b``,
            ``llama-3.1-8b``, ``llama-2-70b``, ``mixtral-8x7b``, ``qwen2-72b``, ``smollm2-135m``), a ``config.json``
            file, a model folder or hub id, a config or a model object.
        devices: ``"4x80GiB"``, ``"80GiB,40GiB"``, ``"cpu=64GiB"``... (see :func:`parse_devices`).
        quantization: None/``"none"``, ``"nf4"``, ``"fp4"`` (bitsandbytes 4-bit; ``double_quant`` as
            ``load_model(quantization="nf4")`` does) or ``"int8"``.
        method: attribution method whose registry entry has a ``cost`` (:class:`~distattr.methods.Method`); its
            arguments in ``method_args`` (``n_steps`` is a shortcut for methods that have it).
        max_length: tokens per example, prompt + generated; ``generated``: the attributed (last) tokens.
        dtype: compute dtype of the unquantized tensors and the activations.
        examples: examples planned together (passes count all of them).
        steps_per_row: the engine's ``steps_per_row`` (None: its cost model).
        reserve: bytes kept free on each accelerator (default 2 GiB).
        recompute: ``"always"``, ``"never"`` or ``"auto"`` (when not even one row fits otherwise) plan the
            gradient kernel's block-wise recomputation (``attribute(recompute=...)``): each decoder block keeps the
            hidden state entering it, and each device the activations of the one block being recomputed and the
            batched step backwards through it (see :class:`~distattr.methods.gradient.Memory`).
    Raises:
        PlanError: bad input, weights that do not fit, or not even one row fitting (with the shortfall).
    """
    dtype, quantization = _dtype(dtype), _quantization(quantization)
    row_model, args = _method(method, n_steps, method_args)
    _check_lengths(max_length, generated, examples, steps_per_row)
    devices = parse_devices(devices)
    reserve_bytes = ACCELERATOR_RESERVE if reserve is None else _reserve(reserve)

    config, name = load_config(model)
    context = context_length(config)
    if context is not None and max_length > context:
        raise PlanError(f"--max-length {max_length} is longer than {name}'s context of {context} tokens")
    meta = build_meta_model(config, dtype)
    groups = quantize_meta(meta, quantization, double_quant)
    stand_ins = _examples(max_length, generated, examples)
    # a whole-sequence row scores every attributed token; a unit's row scores its steps
    width = generated if row_model.whole_sequence else row_model.steps_per_row or steps_per_row or \
        choose_width(stand_ins)
    if recompute not in RECOMPUTE_CHOICES:
        raise PlanError(f"recompute must be one of {', '.join(RECOMPUTE_CHOICES)}, not {recompute!r}")
    if recompute == "always" and not row_model.recomputes:
        raise PlanError(f"method {method!r} does not run through the recomputing gradient kernel; use "
                        "--recompute auto or never")
    placer = Placer.build(meta, devices, reserve_bytes, row_model, config, dtype, max_length, width)

    weights_only = placer(0)
    if weights_only.homeless:
        raise PlanError(f"the weights ({_gib(placer.weight_bytes)}) do not fit on the devices given: "
                        f"{_gib(weights_only.homeless)} of them find no room ({_offload_note(weights_only, placer)}); "
                        "give more or larger devices, or quantize (--quantization nf4)")
    # recompute as the engine does: always, or (auto) when not even one row fits with every block's activations
    if row_model.recomputes and (recompute == "always" or (recompute == "auto" and placer(1).homeless)):
        placer = Placer.build(meta, devices, reserve_bytes, row_model, config, dtype, max_length, width,
                              recompute=True)
    if placer(1).homeless:
        raise PlanError(_one_row_message(placer, placer(1), max_length, devices, quantization))
    layers = decoder_layer_count(config) if row_model.per_layer else 1  # activation patching: rows per layer
    rows_needed = _rows_needed(row_model, args, stand_ins, width, layers)
    rows_cap = min(rows_needed, getattr(args, "internal_batch_size", None) or rows_needed)
    rows_fit = _most_rows(placer, rows_cap)
    if rows_fit == rows_cap:  # no more rows to batch: spare memory goes to more step slots per backward
        placer = placer.with_slots(rows_fit)
    placement = placer(rows_fit)
    budget = placer.token_budget(rows_fit * max_length)
    rows, forwards, backwards = _passes(row_model, args, stand_ins, width, rows_fit, placer.memory(budget), layers)
    return Plan(
        model=name, model_class=type(meta).__name__, dtype=str(dtype).removeprefix("torch."),
        quantization=quantization, double_quant=double_quant and quantization in ("nf4", "fp4"), method=method,
        method_args=dataclasses.asdict(args), max_length=max_length, generated=generated, examples=examples,
        n_params=sum(g.params for g in groups.values()), weight_bytes=placer.weight_bytes,
        weight_groups=groups, device_map=placement.device_map,
        devices=tuple(_device_plan(d, placer.limits[d.key], placement, placer.blocks) for d in devices),
        activation_bytes_per_token=activation_bytes_per_layer_token(config, dtype) * decoder_layer_count(config),
        row_activation_bytes=placer.row_bytes, rows_per_batch=rows_fit, token_budget=budget, steps_per_row=width,
        rows=rows // examples, forward_passes=forwards, backward_passes=backwards,
        recompute=placer.recompute is not None, recompute_passes=backwards if placer.recompute is not None else 0,
    )


@dataclass(frozen=True)
class Placement:
    """Weights and the activations of a batch placed on the devices: ``used[key] = (weights, activations)``;
    ``homeless``: bytes that found no room (offloaded, or over a device's limit)."""

    device_map: dict[str, int | str]
    used: dict[int | str, tuple[int, int]]
    homeless: int


@dataclass(frozen=True)
class Placer:
    """Places the meta model plus the activations of ``rows`` rows: ``placer(rows) -> Placement``.

    ``block_row`` / ``head_row``: activations of one ``max_length`` row per decoder block, and at the LM head
    (the scored logits ``[K, V]`` in dtype plus float32 probabilities and, for a backward, their gradient);
    ``limits``: each device's memory minus its reserve. With accelerators, weights put on the CPU would be
    offloaded; under a backward autograd keeps each offloaded weight on the accelerator until the backward, so
    offloading saves little and is not planned.

    With ``recompute`` (the gradient kernel's :class:`~distattr.methods.gradient.Memory` for one row) a block
    keeps only the hidden state entering it (``block_row``), and every device that may hold blocks keeps room for
    :meth:`working_row` per row: the activations of the one block being recomputed plus the batched step
    backwards through it (``slots`` per backward call: the engine's ``Memory.slots_per_backward`` at the budget of
    :meth:`token_budget`, or more when :meth:`with_slots` gives the spare memory to them; at most ``max_slots``,
    the steps of a row). ``layer_row``: one block's activations for one row.
    """

    model: nn.Module
    sizes: dict[str, int]
    limits: dict[int | str, int]
    offloaded: frozenset[str]
    blocks: tuple[str, ...]
    head: str | None
    block_row: int
    head_row: int
    backward: bool = True
    recompute: Memory | None = None
    layer_row: int = 0
    slots: int = 0
    max_slots: int = 0

    @classmethod
    def build(cls, model, devices, reserve: int, row_model: RowModel, config, dtype, max_length: int,
              scored_per_row: int, recompute: bool = False) -> Placer:
        from accelerate.utils import compute_module_sizes

        blocks = tuple(decoder_blocks(model))
        if not blocks:
            raise PlanError(f"{type(model).__name__} declares no decoder block classes (_no_split_modules), so the "
                            "planner cannot tell which devices hold which layers")
        vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
        layer_row = max_length * activation_bytes_per_layer_token(config, dtype) * row_model.copies
        block_row = layer_row
        head_row = scored_per_row * vocab * (dtype.itemsize + (8 if row_model.backward else 4))
        if not row_model.backward:
            block_row //= NO_GRAD_BUDGET_FACTOR
        memory, slots = None, 0
        if recompute:
            share, n_layers = recompute_kept_share(config), decoder_layer_count(config)
            memory = Memory(math.ceil(2 * share * max_length), True, share, n_layers)
            slots = min(scored_per_row, memory.slots_per_backward(max_length))
            block_row = max_length * hidden_size(config) * dtype.itemsize * row_model.copies
        accelerators = any(d.key != "cpu" for d in devices)
        return cls(model=model, sizes=dict(compute_module_sizes(model)),
                   limits={d.key: d.memory - (reserve if d.key != "cpu" else 0) for d in devices},
                   offloaded=frozenset({"disk", "cpu"} if accelerators else {"disk"}), blocks=blocks,
                   head=_head_name(model), block_row=block_row, head_row=head_row, backward=row_model.backward,
                   recompute=memory, layer_row=layer_row, slots=slots, max_slots=scored_per_row)

    def working_row(self) -> int:
        """With recomputation, the working room of one row on a device (bytes) for :attr:`slots` step slots per
        backward; 0 without."""
        if self.recompute is None:
            return 0
        return int(self.layer_row * max(RECOMPUTE_PEAK_FLOOR, RECOMPUTE_BLOCK + RECOMPUTE_SLOT * self.slots))

    def token_budget(self, batch_tokens: int) -> int:
        """The ``token_budget`` with which the engine makes batches of ``batch_tokens`` tokens (and, recomputing,
        backward calls of :attr:`slots` step slots): a forward-only method gets ``NO_GRAD_BUDGET_FACTOR`` times
        its budget; recomputation keeps ``kept_share`` of a token and gives a slot ``1 / layers`` of it."""
        if self.recompute is not None:
            share, layers = self.recompute.kept_share, self.recompute.layers
            return max(math.ceil(2 * share * batch_tokens),
                       math.ceil(batch_tokens * share + self.slots * batch_tokens / layers))
        return batch_tokens if self.backward else math.ceil(batch_tokens / NO_GRAD_BUDGET_FACTOR)

    def with_slots(self, rows: int) -> Placer:
        """Recomputing, when ``rows`` rows are all the run has: the most step slots per backward call (up to a
        row's steps) whose working room still fits, so that fewer backward passes recompute the blocks."""
        if self.recompute is None or self.slots >= self.max_slots:
            return self
        slots = _largest(self.slots, self.max_slots,
                         lambda n: not dataclasses.replace(self, slots=n)(rows).homeless)
        return dataclasses.replace(self, slots=slots)

    def memory(self, token_budget: int) -> Memory:
        """The engine's :class:`~distattr.methods.gradient.Memory` for ``token_budget``."""
        if self.recompute is None:
            return Memory(token_budget)
        return dataclasses.replace(self.recompute, token_budget=token_budget)

    @property
    def weight_bytes(self) -> int:
        return self.sizes[""]

    @property
    def row_bytes(self) -> int:
        """Activations of one ``max_length`` row over all devices (with recomputation, one device's working room)."""
        return len(self.blocks) * self.block_row + (self.head_row if self.head else 0) + self.working_row()

    @property
    def room(self) -> int:
        """What the usable devices have left after the weights."""
        return sum(v for k, v in self.limits.items() if k not in self.offloaded) - self.weight_bytes

    def __call__(self, rows: int) -> Placement:
        acts = {b: rows * self.block_row for b in self.blocks}
        if self.head:
            acts[self.head] = rows * self.head_row
        working = rows * self.working_row()  # on every usable device, which may hold blocks
        limits = {k: v - (working if k not in self.offloaded else 0) for k, v in self.limits.items()}
        with activation_buffers(self.model, acts):
            device_map = place(self.model, {k: max(v, 0) for k, v in limits.items()})
        used = {k: [0, working if k not in self.offloaded else 0] for k in self.limits}
        homeless = 0
        for module, where in device_map.items():
            weight = self.sizes.get(module, 0)  # a tied module (lm_head = embed_tokens) is counted with its owner
            act = sum(size for name, size in acts.items() if module in ("", name) or name.startswith(module + "."))
            if where in self.offloaded:
                homeless += weight + act
            else:
                used[where][0] += weight
                used[where][1] += act
        homeless += sum(max(0, w + a - self.limits[k]) for k, (w, a) in used.items())
        return Placement(device_map, {k: (w, a) for k, (w, a) in used.items()}, homeless)


def _largest(low: int, high: int, fits) -> int:
    """The largest ``n`` in ``[low, high]`` with ``fits(n)``, for a ``fits`` that holds up to some point and not
    after; ``low`` is taken to fit."""
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _most_rows(placer: Placer, cap: int) -> int:
    """The most rows (at most ``cap``) whose weights and activations all find room; at least 1 fits."""
    high = max(1, min(cap, placer.room // max(placer.row_bytes, 1)))
    return _largest(1, high, lambda rows: not placer(rows).homeless)


def _check_lengths(max_length, generated, examples, steps_per_row) -> None:
    if not (isinstance(max_length, int) and max_length >= 2):
        raise PlanError(f"max_length must be an integer >= 2, not {max_length!r}")
    if not (isinstance(generated, int) and 1 <= generated < max_length):
        raise PlanError(f"generated must be between 1 and max_length - 1 = {max_length - 1} (at least one prompt "
                        f"token), not {generated!r}")
    if not (isinstance(examples, int) and examples >= 1):
        raise PlanError(f"examples must be a positive integer, not {examples!r}")
    if steps_per_row is not None and not (isinstance(steps_per_row, int) and steps_per_row >= 1):
        raise PlanError(f"steps_per_row must be a positive integer, not {steps_per_row!r}")


def _dtype(dtype) -> torch.dtype:
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise PlanError(f"dtype must be a floating-point torch dtype (bfloat16, float16, float32), not {dtype!r}")
    return value


def _quantization(quantization) -> str:
    if quantization is None:
        return "none"
    if quantization not in QUANTIZATIONS:
        raise PlanError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    return quantization


def _reserve(reserve) -> int:
    if isinstance(reserve, int) and not isinstance(reserve, bool) and reserve >= 0:
        return reserve
    return parse_size(reserve)


def _method(method: str, n_steps: int | None, method_args: Mapping | None):
    """The method's row model (its registry entry's ``cost``) and its argument dataclass."""
    try:
        spec = method_registry.find_method(method)
    except ValueError as err:  # an entry point that fails to load
        raise PlanError(str(err)) from None
    if spec is None or spec.cost is None:
        planned = sorted(name for name, entry in method_registry.METHODS.items() if entry.cost is not None)
        raise PlanError(f"the planner does not model method {method!r}; it plans: {', '.join(planned)}")
    kwargs = dict(method_args or {})
    if n_steps is not None:
        kwargs["n_steps"] = n_steps
    try:
        args = build_args(method, kwargs)
    except ValueError as err:  # the method's own checks (names, types, ranges) are the planner's input errors
        raise PlanError(str(err)) from None
    for field_name in ("n_steps", "n_samples", "internal_batch_size"):
        value = getattr(args, field_name, None)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise PlanError(f"{field_name} must be a positive integer, not {value!r}")
    return spec.cost, args


def _examples(max_length: int, generated: int, count: int) -> list[Example]:
    """Stand-ins for ``count`` examples of ``max_length`` tokens whose last ``generated`` are attributed (the
    cost model only reads their attributed positions)."""
    ids = torch.zeros(max_length, dtype=torch.long)
    return [Example(ids, ids, start=max_length - generated, end=max_length) for _ in range(count)]


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if head is not None and m is head), None)


def _offload_note(placement: Placement, placer: Placer) -> str:
    where = sorted({str(v) for v in placement.device_map.values() if v in placer.offloaded})
    return "accelerate would offload them to " + " and ".join(where) if where else "a device would overflow"


def _one_row_message(placer: Placer, placement: Placement, max_length: int, devices, quantization: str) -> str:
    usable = [d for d in devices if d.key not in placer.offloaded]
    text = (f"not even one row of {max_length} tokens fits: its activations take {_gib(placer.row_bytes)} "
            f"({_gib(placer.block_row)} per decoder block) and the devices ({_gib(sum(d.memory for d in usable))}) "
            f"have {_gib(max(placer.room, 0))} left after {_gib(placer.weight_bytes)} of weights and the reserve")
    short = placer.row_bytes - placer.room
    if short > 0:
        text += f": short by {_gib(short)} ({short} bytes)"
    else:  # enough in total, but no device has room for a whole decoder block with its activations
        text += f", but not for whole decoder blocks with their activations: {_gib(placement.homeless)} find no place"
    hint = "more or larger devices" + (", or quantization" if quantization == "none" else "")
    return f"{text}; use a shorter --max-length, {hint}"


def _device_plan(device: Device, limit: int, placement: Placement, blocks) -> DevicePlan:
    weights, activations = placement.used[device.key]
    names = tuple(k for k, v in placement.device_map.items() if v == device.key)
    count = sum(1 for b in blocks if _module_device(placement.device_map, b) == device.key)
    return DevicePlan(name=device.name, memory=device.memory, reserved=device.memory - limit, weights=weights,
                      blocks=count, activations=activations, free=limit - weights - activations, modules=names)


def _rows_needed(row_model: RowModel, args, examples: list[Example], width: int, layers: int = 1) -> int:
    """Rows of the whole run: no batch needs more (``layers``: the rows of a ``per_layer`` model are per layer)."""
    if row_model.whole_sequence:
        return row_model.points(args, Unit(0, tuple(range(examples[0].start, examples[0].end)))) * layers
    return sum(row_model.points(args, u) for u in plan_units(examples, width))


def _passes(row_model: RowModel, args, examples: list[Example], width: int, rows_fit: int,
            memory: Memory, layers: int = 1) -> tuple[int, int, int]:
    """``(rows, forward passes, backward passes)`` for ``examples``, batched as the engine batches them with
    ``memory`` (``layers``: the rows of a ``per_layer`` model are per decoder layer)."""
    if row_model.whole_sequence:
        whole = Unit(0, tuple(range(examples[0].start, examples[0].end)))
        per_example = row_model.points(args, whole) * layers
        batches = math.ceil(per_example / rows_fit)
        return per_example * len(examples), batches * len(examples), 0
    units = plan_units(examples, width)
    counts = [row_model.points(args, u) for u in units]
    forwards = backwards = 0
    for batch in pack(units, counts, memory.batch_tokens):
        n_rows = sum(len(p.points) for p in batch)
        n_slots = max(len(units[p.unit].steps) for p in batch)
        batch_tokens = n_rows * max(units[p.unit].length for p in batch)
        group = min(n_slots, memory.slots_per_backward(batch_tokens))
        forwards += 1
        backwards += math.ceil(n_slots / group)
    return sum(counts), forwards, backwards


# ---------------------------------------------------------------- token budgets for loaded models


def token_budget_for(model: nn.Module, memory_bytes: int | None = None, reserve: int = ACCELERATOR_RESERVE) -> int:
    """Tokens per forward/backward batch (``attribute(token_budget=...)``) for a loaded model, from the
    planner's activation model: the most tokens whose saved activations fit in ``memory_bytes`` on every device
    that holds decoder blocks (a device with ``k`` blocks needs ``k`` layers' activations per token).

    ``memory_bytes=None``: on accelerators, the memory free there now minus ``reserve``; on a CPU-only model,
    :func:`distattr.models.memory.default_token_budget` (1/16 of the machine's memory, at most a quarter of
    what is available). Raises :class:`PlanError` when not even one token fits.
    """
    params = list(model.parameters())
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    per_layer = activation_bytes_per_layer_token(model.config, dtype)
    device_map = getattr(model, "hf_device_map", None) or {"": params[0].device}
    devices = {k: torch.device(f"cuda:{v}" if isinstance(v, int) else v) for k, v in device_map.items()
               if v not in ("cpu", "disk")}
    # accelerate runs offloaded (cpu/disk) modules on its main device, the first accelerator of the map
    main = next(iter(devices.values()), torch.device("cpu"))
    counts: dict[torch.device, int] = {}
    for block in decoder_blocks(model) or [""] * decoder_layer_count(model.config):
        key = max((k for k in device_map if k == "" or block == k or block.startswith(k + ".")), key=len)
        device = devices.get(key, main)
        counts[device] = counts.get(device, 0) + 1
    if memory_bytes is None and all(d.type == "cpu" for d in counts):
        return default_token_budget(model)
    budgets = []
    for device, count in counts.items():
        if memory_bytes is None and device.type != "cuda":
            raise PlanError(f"cannot measure the free memory of {device}; pass memory_bytes")
        available = memory_bytes if memory_bytes is not None else torch.cuda.mem_get_info(device)[0] - reserve
        budgets.append(available // (per_layer * count))
    budget = min(budgets)
    if budget < 1:
        raise PlanError(f"not even one token's activations ({_gib(per_layer * max(counts.values()))}) fit in the "
                        f"memory given ({_gib(memory_bytes if memory_bytes is not None else 0)} per device)")
    return int(budget)


# ---------------------------------------------------------------- display


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


def _blocks_summary(names: tuple[str, ...]) -> str:
    """``model.layers.0-19`` style ranges of a device's modules."""
    if names == ("",):
        return "(the whole model)"
    parts: list[str] = []
    run: list[tuple[str, int]] = []
    for name in [*names, None]:
        match = re.match(r"^(.*\.)(\d+)$", name) if name else None
        if match and run and run[-1][0] == match.group(1) and run[-1][1] + 1 == int(match.group(2)):
            run.append((match.group(1), int(match.group(2))))
            continue
        if run:
            parts.append(f"{run[0][0]}{run[0][1]}" + (f"-{run[-1][1]}" if len(run) > 1 else ""))
            run = []
        if match:
            run = [(match.group(1), int(match.group(2)))]
        elif name:
            parts.append(name)
    return ", ".join(parts)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.2f}M"


def _table_lines(p: Plan) -> list[str]:
    quant = p.quantization + (" (double quantisation)" if p.double_quant else "")
    lines = [
        f"model        {p.model} ({p.model_class}, {_count(p.n_params)} parameters)",
        f"weights      {_gb(p.weight_bytes)} ({_gib(p.weight_bytes)}); quantization {quant}, compute dtype {p.dtype}",
    ]
    for kind, group in p.weight_groups.items():
        if group.params:
            bits = 8 * group.bytes / group.params
            lines.append(f"  {kind:<19} {_count(group.params):>8} params  {_gb(group.bytes):>10}  "
                         f"{bits:.3f} bits/param")
    other = p.weight_groups["other"].params
    if p.quantization != "none" and other > 0.01 * p.n_params:
        lines.append(f"  note: {_count(other)} parameters outside nn.Linear layers (e.g. fused mixture-of-experts "
                     f"weights) stay in {p.dtype}, as transformers loads them")
    lines += ["", f"{'device':<8} {'memory':>11} {'reserved':>10} {'weights':>11} {'blocks':>6} {'activations':>12} "
                  f"{'free':>11}  modules"]
    for d in p.devices:
        lines.append(f"{d.name:<8} {_gib(d.memory):>11} {_gib(d.reserved):>10} {_gib(d.weights):>11} {d.blocks:>6} "
                     f"{_gib(d.activations):>12} {_gib(d.free):>11}  {_blocks_summary(d.modules)}")
    args = ", ".join(f"{k}={v}" for k, v in p.method_args.items() if k in ("n_steps", "n_samples"))
    lines += [
        "",
        f"method       {p.method}" + (f" ({args})" if args else ""),
        f"examples     {p.examples} x {p.max_length} tokens ({p.max_length - p.generated} prompt + {p.generated} "
        f"attributed)",
        f"activations  {p.activation_bytes_per_token / 1e6:.2f} MB per token ({p.dtype}); one {p.max_length}-token "
        f"row: {_gib(p.row_activation_bytes)} over all devices",
        f"batch        {p.rows_per_batch} rows of {p.max_length} tokens (token_budget={p.token_budget})",
        f"rows         {p.rows} per example ({p.steps_per_row} attributed tokens per row)",
        f"passes       {p.forward_passes} forward, {p.backward_passes} backward"
        + (f", {p.recompute_passes} block recomputations (one per backward)" if p.recompute else ""),
    ]
    if p.recompute:
        lines.insert(-3, "recompute    yes: each decoder block keeps the hidden state entering it; the backwards "
                         "recompute one block at a time")
    return lines
