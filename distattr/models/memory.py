"""Rough activation-memory model, used to size row batches when the user gives no token budget.

A forward kept for backward holds, per token and decoder layer, the layer's inputs to every saved op:
about twelve hidden-size vectors (norms, projections, residuals, rotary q/k) and four intermediate-size
vectors (gate, up, activation, product) for a gated MLP. With SmolLM2-135M in float32 that is about
1.6 MB per token; the measured peak-memory growth of a 256-token batch on this model is ~0.3 GB.
"""

from __future__ import annotations

import torch

# On a CPU the saved activations of a batch may take this share of the model's weight memory: an attribution
# then needs little more memory than the model itself (SmolLM2-135M in float32: 108 MB, i.e. 64 tokens; its
# peak stays below Inseq's batch-of-one loop). The step backwards are batched over several steps, so small
# forward batches stay efficient; a larger ``token_budget`` is faster for methods with many rows per step
# (integrated gradients on SmolLM2: 2.75 s per token at 256 tokens against 3.49 s at 64, 1.4 GB peak).
CPU_ACTIVATION_SHARE_OF_WEIGHTS = 0.2
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
    """Bytes of saved activations per token of a row in one decoder layer. A mixture-of-experts layer runs
    each token through ``num_experts_per_tok`` experts, so it keeps that many intermediate-size sets."""
    hidden, inter, _, routed = _text_dims(config)
    return int((12 * hidden + 4 * inter * routed) * torch.finfo(dtype).bits // 8)


def activation_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of saved activations per token of a row, summed over decoder layers (encoder ignored).

    Measured on SmolLM2-135M (float32, integrated gradients, one batch of 348-4176 tokens): the tensors
    autograd saves come to 0.57 of this figure and the process's peak memory growth (saved tensors plus the
    backward's transients) to 0.62-0.88 of it, so it bounds an attribution batch's peak with some margin.
    """
    return decoder_layer_count(config) * activation_bytes_per_layer_token(config, dtype)


def recompute_kept_share(config) -> float:
    """With block-wise recomputation (:mod:`distattr.models.recompute`), the share of a token's activations
    that stays in memory: the hidden state entering each of the ``n`` decoder layers plus one layer's full
    activations (the block being recomputed), ``(n d + a) / (n a)`` with ``a`` the per-layer values of
    :func:`activation_bytes_per_layer_token`. SmolLM2-135M: 0.077; Llama-3-70B: 0.051."""
    hidden, _, layers, _ = _text_dims(config)
    per_layer = activation_bytes_per_layer_token(config, torch.float32) / 4
    return (layers * hidden + per_layer) / (layers * per_layer)


def default_token_budget(model: torch.nn.Module) -> int:
    """Tokens per batch so that saved activations stay within the device's share (CPU: a fifth of the
    weights' bytes; GPU: a quarter of the device's memory)."""
    param = next(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = int(weight_bytes * CPU_ACTIVATION_SHARE_OF_WEIGHTS)
    if param.device.type == "cuda":
        budget = int(torch.cuda.get_device_properties(param.device).total_memory * GPU_ACTIVATION_SHARE)
    per_token = activation_bytes_per_token(model.config, param.dtype if param.is_floating_point() else torch.float32)
    return max(64, min(1 << 16, budget // max(per_token, 1)))
