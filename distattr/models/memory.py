"""The activation-memory model (measured on the CPU), used to size row batches and to plan runs.

A forward kept for backward holds, per token and decoder layer, the layer's inputs to every saved op:
about twelve hidden-size vectors (norms, projections, residuals, rotary q/k) and four intermediate-size
vectors (gate, up, activation, product) for a gated MLP. Not all of them are alive at once, nor separate
tensors: the peak of a backward was measured at ``LIVE_SHARE`` of that count, which is what the model gives
(SmolLM2-135M in float32: 0.99 MB per token).
"""

from __future__ import annotations

import os

import torch

# On a CPU the saved activations of a batch may take this share of the machine's memory, and at most
# CPU_SHARE_OF_AVAILABLE of what is available now (a busy machine gets smaller batches, never swaps). Bigger
# batches are faster for methods with many rows per step: integrated gradients on SmolLM2-135M (float32, 2 CPUs)
# ran 3.49 s per token at 64 tokens, 2.75 s at 256 (see docs/benchmarks.md for the current figures). A 24 GiB
# machine gets 1.5 GiB, 1,600 tokens of SmolLM2 in float32.
# The tensors alive at the peak of a backward, measured on SmolLM2-135M in float32 (fresh process, glibc returning
# freed blocks: MALLOC_MMAP_THRESHOLD_=131072, so the resident set follows the live tensors): 0.616 of the saved-op
# inputs above for one row of 512-8,192 tokens (saliency), 0.638 and 0.643 for integrated-gradients batches of 8
# and 32 rows of 58 tokens (benchmarks/bench_long_context.py, tests/test_planner.py).
LIVE_SHARE = 0.63
CPU_SHARE_OF_TOTAL = 1 / 16
CPU_SHARE_OF_AVAILABLE = 1 / 4
GPU_ACTIVATION_SHARE = 0.25  # of the device's total memory


def _text_dims(config) -> tuple[int, int, int, int]:
    """``(hidden, intermediate, decoder layers, experts per token)`` of a (text) config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "d_model", None) or getattr(text, "n_embd", 768)
    inter = getattr(text, "intermediate_size", None) or getattr(text, "d_ff", None) or getattr(text, "n_inner", None)
    inter = inter or 4 * hidden
    layers = (getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None)
              or getattr(text, "n_layer", None) or getattr(text, "decoder_layers", None) or 12)
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 1
    routed = 1
    if isinstance(experts, int) and experts > 1:
        routed = getattr(text, "num_experts_per_tok", None) or 1
    return hidden, inter, layers, routed


def hidden_size(config) -> int:
    """The hidden size of a (text) config: the width of the residual stream between blocks."""
    return _text_dims(config)[0]


def decoder_layer_count(config) -> int:
    """Decoder layers of a (text) config, as the activation model counts them."""
    return _text_dims(config)[2]


def activation_bytes_per_layer_token(config, dtype: torch.dtype) -> int:
    """Bytes of activations per token of a row in one decoder layer at a backward's peak: ``LIVE_SHARE`` of the
    inputs of every saved op (module docstring). A mixture-of-experts layer runs each token through
    ``num_experts_per_tok`` experts, so it keeps that many intermediate-size sets."""
    hidden, inter, _, routed = _text_dims(config)
    return int(LIVE_SHARE * (12 * hidden + 4 * inter * routed) * torch.finfo(dtype).bits // 8)


def activation_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of activations per token of a row at a backward's peak, summed over decoder layers (encoder
    ignored). On SmolLM2-135M (float32) the measured peaks of single rows (512-8,192 tokens) and of
    integrated-gradients batches are within 3% of it (``LIVE_SHARE``); the tensors autograd saves alone come to
    0.9 of it."""
    return decoder_layer_count(config) * activation_bytes_per_layer_token(config, dtype)


def recompute_kept_share(config) -> float:
    """With block-wise recomputation (:mod:`distattr.models.recompute`), the share of a token's activations
    that stays in memory: the hidden state entering each of the ``n`` decoder layers plus one layer's full
    activations (the block being recomputed), ``(n d + a) / (n a)`` with ``a`` the per-layer values of
    :func:`activation_bytes_per_layer_token`. SmolLM2-135M: 0.10; Llama-3-70B: 0.074."""
    hidden, _, layers, _ = _text_dims(config)
    per_layer = activation_bytes_per_layer_token(config, torch.float32) / 4
    return (layers * hidden + per_layer) / (layers * per_layer)


def host_memory() -> tuple[int, int] | None:
    """``(total, available)`` bytes of the machine's memory (Linux ``/proc/meminfo``; ``os.sysconf`` elsewhere);
    None when neither can tell."""
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return fields["MemTotal"], fields.get("MemAvailable", fields["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return None


def default_token_budget(model: torch.nn.Module) -> int:
    """Tokens per batch so that saved activations stay within the device's share: on a CPU,
    ``CPU_SHARE_OF_TOTAL`` of the machine's memory and at most ``CPU_SHARE_OF_AVAILABLE`` of what is available
    (machines that cannot tell: a fifth of the weights' bytes); on a GPU a quarter of the device's memory."""
    param = next(model.parameters())
    if param.device.type == "cuda":
        budget = int(torch.cuda.get_device_properties(param.device).total_memory * GPU_ACTIVATION_SHARE)
    elif (memory := host_memory()) is not None:
        total, available = memory
        budget = int(min(total * CPU_SHARE_OF_TOTAL, available * CPU_SHARE_OF_AVAILABLE))
    else:
        budget = int(sum(p.numel() * p.element_size() for p in model.parameters()) * 0.2)
    per_token = activation_bytes_per_token(model.config, param.dtype if param.is_floating_point() else torch.float32)
    return max(64, min(1 << 16, budget // max(per_token, 1)))


def release_freed_host_memory(device: torch.device) -> None:
    """On a CPU under glibc, give the pages of freed heap memory back to the system (``malloc_trim(0)``).

    glibc serves blocks below its mmap threshold from its heaps, and the threshold rises to the largest block
    freed (up to 32 MiB), so after a long row's forward most activation-sized tensors live in the heaps; freed,
    their pages stay resident, and the backward's different sizes fragment them further. The gradient kernel calls
    this between a forward and its backwards, and between backward calls: the resident set then follows what is
    alive. A no-op elsewhere (GPU tensors, other C libraries)."""
    if device.type != "cpu" or _LIBC is None:
        return
    _LIBC.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()
