"""Quantized models: bitsandbytes 4-bit (NF4) and 8-bit (LLM.int8()) linear layers, with gradients to the inputs.

``load_model(..., quantization="nf4" | "int8" | BitsAndBytesConfig(...))`` has transformers quantize the linear
layers while loading (embeddings, norms and usually the LM head stay in ``dtype``). Parameters are frozen;
bitsandbytes' autograd functions back-propagate to a layer's *input* through the dequantized weight
(``MatMul4Bit``: ``grad_A = grad_out @ dequantize_4bit(W)``; ``MatMul8bitLt``: ``grad_A = grad_out @ (CB * SCB /
127)``), so every gradient method reaches the input embeddings. bitsandbytes >= 0.47 has CPU kernels.

The CPU pitfall (bitsandbytes 0.50, ``Linear4bit.forward``): on a CPU with AVX512-BF16, an eval-mode forward whose
input does not require grad (``model.generate``, step scores, any ``no_grad`` pass) converts the layer's weight
*in place* to a CPU-packed layout (``quant_state.packing_format_for_cpu``). From then on ``matmul_4bit`` routes
that layer to ``gemv_4bit``, an op without an autograd kernel: the backward skips the layer's contribution and
input gradients come out silently wrong (measured on SmolLM2-135M after one ``generate``: per-token gradient
norms at cosine 0.14 to the fp32 model's, 300x smaller). The conversion back (``_convert_weight_packed_for_cpu_
inverse``) is lossy: the block scales went through bfloat16. :func:`guard_4bit_gradients` therefore switches the
conversion off on every 4-bit layer (``support_avx512bf16_for_cpu = False``, the flag that forward reads) before
the model runs at all, and refuses a model whose weights are already packed.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

INSTALL_HINT = "pip install 'distattr[quant]'"
MIN_CPU_VERSION = "0.47"  # the first bitsandbytes release with 4-bit and 8-bit CPU kernels


def _nf4(dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _int8(dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


# name -> BitsAndBytesConfig builder (argument: the compute dtype, i.e. the model's dtype)
PRESETS = {"nf4": _nf4, "int8": _int8}


def require_bitsandbytes():
    """Import bitsandbytes, or raise ImportError with the install command; on a machine without CUDA also
    require a version with CPU kernels."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"Quantization needs bitsandbytes, which is not installed: {INSTALL_HINT}") from err
    from packaging.version import Version

    version = getattr(bitsandbytes, "__version__", "0")
    if not torch.cuda.is_available() and Version(version) < Version(MIN_CPU_VERSION):
        raise ImportError(f"bitsandbytes {version} has no CPU kernels and this machine has no CUDA device; "
                          f"bitsandbytes >= {MIN_CPU_VERSION} is needed: {INSTALL_HINT}")
    return bitsandbytes


def quantization_config(spec: Any, dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` for ``spec``: ``"nf4"`` (4-bit NormalFloat, double quantization, computing in
    ``dtype``), ``"int8"`` (LLM.int8()), or a ``BitsAndBytesConfig`` used as given."""
    from transformers import BitsAndBytesConfig

    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"Unknown quantization {spec!r}; use one of {', '.join(PRESETS)} or a BitsAndBytesConfig")
        require_bitsandbytes()
        return PRESETS[spec](dtype)
    if isinstance(spec, BitsAndBytesConfig):
        if not (spec.load_in_4bit or spec.load_in_8bit):
            raise ValueError("The BitsAndBytesConfig quantizes nothing: set load_in_4bit=True or load_in_8bit=True")
        require_bitsandbytes()
        return spec
    raise TypeError(f"quantization must be one of {', '.join(PRESETS)} or a BitsAndBytesConfig, "
                    f"not {type(spec).__name__}")


def _linear4bit_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    bnb = sys.modules.get("bitsandbytes")  # a bitsandbytes layer cannot exist unless bitsandbytes was imported
    if bnb is None:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def packed_4bit_layers(model: torch.nn.Module) -> list[str]:
    """Names of the 4-bit layers whose weights bitsandbytes has repacked for CPU inference (no autograd)."""
    return [name for name, m in _linear4bit_layers(model)
            if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]


def guard_4bit_gradients(model: torch.nn.Module) -> None:
    """Keep gradients flowing through every bitsandbytes 4-bit layer of ``model`` (see the module docstring):
    switch off the CPU repacking of weights that a no-grad forward would do, and raise if some layer has been
    repacked already. Cheap (one pass over the modules); a no-op for models without 4-bit layers."""
    layers = _linear4bit_layers(model)
    for _, module in layers:
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    packed = packed_4bit_layers(model)
    if packed:
        raise RuntimeError(
            f"{len(packed)} of {len(layers)} bitsandbytes 4-bit layers (first: {packed[0]}) hold weights repacked "
            "for CPU inference, which bitsandbytes does during a no-grad forward (e.g. model.generate) on CPUs "
            "with AVX512-BF16; gradients do not flow through such layers, so attributions would be silently "
            "wrong. Pass the model to distattr.load_model before running it, or let distattr load it: "
            "load_model(name, quantization='nf4')."
        )


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights take: parameters and buffers (offloaded ones included: their size is known on
    the ``meta`` device) plus bitsandbytes' quantization statistics (4-bit block scales, int8 row scales), which
    are not parameters."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:  # 4-bit: absmax per block (nested: itself quantized, with its own state)
            total += sum(t.numel() * t.element_size() for t in (getattr(state, "absmax", None),
                                                                 getattr(state, "code", None)) if t is not None)
            state = getattr(state, "state2", None)
        scale = getattr(param, "SCB", None)  # int8: one scale per output row
        if isinstance(scale, torch.Tensor):
            total += scale.numel() * scale.element_size()
    return total


def describe_quantization(model: torch.nn.Module) -> dict | None:
    """``{"method", "type", "compute_dtype", "double_quant", "weight_bytes"}`` of a quantized model, else None."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    values = config if isinstance(config, dict) else config.to_dict()
    method = str(getattr(values.get("quant_method"), "value", values.get("quant_method")))
    info: dict[str, Any] = {"method": method}
    if method == "bitsandbytes":
        four = values.get("load_in_4bit") or values.get("_load_in_4bit")
        info["type"] = values.get("bnb_4bit_quant_type", "nf4") if four else "int8"
        if four:
            info["compute_dtype"] = str(values.get("bnb_4bit_compute_dtype")).replace("torch.", "")
            info["double_quant"] = bool(values.get("bnb_4bit_use_double_quant"))
    info["weight_bytes"] = weight_bytes(model)
    return info


def _not_cast_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_int8_casts() -> None:
    """Drop bitsandbytes' notice that int8 layers cast their inputs to float16, logged on *every* forward of
    every layer (thousands of lines per attribution); other bitsandbytes messages still show."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _not_cast_notice not in logger.filters:
        logger.addFilter(_not_cast_notice)
