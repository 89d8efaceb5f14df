"""One small adapter per architecture family: embed tokens, run the model from embeddings (or ids) on a
batch of right-padded rows, and return logits only at the scored positions.

Rows are right-padded. A causal decoder never lets a position see a later one, so padding at the end
of a row cannot change the values at real positions: decoder rows need no attention mask, which keeps
the fast causal attention kernels in play. Encoder inputs of different lengths do need a mask.

Shapes: ``B`` rows, ``S`` source (encoder) length, ``L`` decoder length, ``d`` hidden size, ``V``
vocabulary, ``K`` number of scored positions in the batch.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RowInputs:
    """The model inputs of a batch of rows; exactly one of ``*_embeds`` / ``*_ids`` is set per side.

    ``target_*`` are the decoder inputs ``[B, L(, d)]``; ``source_*`` the encoder inputs ``[B, S(, d)]``
    (encoder-decoder only) with ``source_mask`` ``[B, S]``. ``past`` (decoder-only) is the KV cache of ``P``
    earlier positions (:meth:`DecoderOnlyAdapter.prefix_cache`): the rows then hold positions ``P .. P+L-1``.
    """

    target_embeds: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    source_embeds: torch.Tensor | None = None
    source_ids: torch.Tensor | None = None
    source_mask: torch.Tensor | None = None
    past: object | None = None


def _embed_scale(module: nn.Module) -> float:
    scale = getattr(module, "embed_scale", 1.0)
    return float(scale) if not isinstance(scale, torch.Tensor) else float(scale.item())


def input_device(model: nn.Module) -> torch.device:
    """Where token ids and input embeddings go: the device the model's input embedding computes on.

    Under an accelerate device map that is the embedding's hook ``execution_device``: an offloaded embedding
    (``"disk"``, or ``"cpu"`` next to a GPU) keeps its weight on ``meta`` and computes on the main device.
    Outputs come back wherever the model returns them; methods move their scores to the CPU.
    """
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):  # accelerate's SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return embedding.weight.device


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward can project only selected positions onto the vocabulary."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _cache_argument(model: nn.Module) -> str | None:
    """The name under which the model's forward takes a KV cache (``cache`` from transformers 5.2x,
    ``past_key_values`` before), or None."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


@dataclass(frozen=True)
class DecoderOnlyAdapter:
    """A causal LM (``AutoModelForCausalLM``): the attributed sequence is prompt + generation.

    ``cache_argument`` names the forward's KV-cache argument when rows may start after a cached prefix
    (:meth:`prefix_cache`); None where they may not (remote Petals blocks).
    """

    model: nn.Module
    embed_scale: float
    keeps_logits: bool
    cache_argument: str | None = None
    is_encoder_decoder: bool = False

    @classmethod
    def wrap(cls, model: nn.Module, prefix_cache: bool = True) -> DecoderOnlyAdapter:
        return cls(model=model, embed_scale=_embed_scale(model), keeps_logits=_keeps_logits(model),
                   cache_argument=_cache_argument(model) if prefix_cache else None)

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def input_device(self) -> torch.device:
        return input_device(self.model)

    @property
    def caches_prefixes(self) -> bool:
        """Whether rows may start after a cached prefix (:attr:`RowInputs.past`)."""
        return self.cache_argument is not None

    def embed(self, ids: torch.Tensor, side: str = "target") -> torch.Tensor:
        """``ids [..., L]`` -> ``[..., L, d]`` in the space gradients are taken in (scaled embeddings)."""
        return self.embedding(ids.to(self.input_device)) * self.embed_scale

    def forward(self, rows: RowInputs, scored: torch.Tensor, **kwargs):
        """Run the model; ``output.logits`` holds ``[K, V]`` logits at the True positions of ``scored [B, L]``."""
        inputs = {"inputs_embeds": rows.target_embeds} if rows.target_embeds is not None else {
            "input_ids": rows.target_ids}
        if rows.past is not None:
            inputs[self.cache_argument] = rows.past
        return _forward_scored(self.model, self.keeps_logits, scored, use_cache=False, **inputs, **kwargs)

    def prefix_cache(self, embeds: torch.Tensor):
        """The KV cache of a no-grad forward over ``embeds [U, P, d]`` (scaled input embeddings)."""
        if self.cache_argument is None:
            raise ValueError("This model cannot continue rows from a cached prefix")
        with torch.no_grad():
            out = self.model.get_decoder()(inputs_embeds=embeds, use_cache=True)
        return out.get("cache", out.get("past_key_values"))

    def forward_cached(self, rows: RowInputs, scored: torch.Tensor, **kwargs):
        """:meth:`forward` that also keeps the KV cache of the rows: ``(output, cache)``, the cache for
        :meth:`take_prefix` (rows continued after a prefix of these rows, e.g. patching restorations)."""
        if self.cache_argument is None:
            raise ValueError("This model cannot continue rows from a cached prefix")
        inputs = {"inputs_embeds": rows.target_embeds} if rows.target_embeds is not None else {
            "input_ids": rows.target_ids}
        out = _forward_scored(self.model, self.keeps_logits, scored, use_cache=True, **inputs, **kwargs)
        return out, out["cache"] if "cache" in out else out.get("past_key_values")

    @staticmethod
    def take_prefix(cache, length: int, rows: torch.Tensor):
        """A copy of ``cache``'s first ``length`` positions, its batch expanded to ``rows [B]`` (indices into
        the cached batch), for :attr:`RowInputs.past` (the model extends the cache it is given)."""
        taken = copy.deepcopy(cache)
        taken.crop(length - taken.get_seq_length())
        taken.batch_select_indices(rows)
        return taken


@dataclass(frozen=True)
class EncoderDecoderAdapter:
    """A sequence-to-sequence LM (``AutoModelForSeq2SeqLM``): source -> target with a decoder-start token."""

    model: nn.Module
    embed_scale: float
    keeps_logits: bool
    decoder_divisor: float = 1.0
    is_encoder_decoder: bool = True
    caches_prefixes: bool = False  # rows always hold the whole decoder sequence

    @classmethod
    def wrap(cls, model: nn.Module) -> EncoderDecoderAdapter:
        encoder, decoder = model.get_encoder(), model.get_decoder()
        scale = _embed_scale(encoder)
        if _embed_scale(decoder) != scale:
            raise ValueError("Encoder and decoder use different embedding scales; this is not supported.")
        adapter = cls(model=model, embed_scale=scale, keeps_logits=_keeps_logits(model))
        if scale != 1.0 and _decoder_scales_given_embeds(adapter):
            adapter = cls(model=model, embed_scale=scale, keeps_logits=adapter.keeps_logits, decoder_divisor=scale)
        return adapter

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def input_device(self) -> torch.device:
        return input_device(self.model)

    def embed(self, ids: torch.Tensor, side: str = "source") -> torch.Tensor:
        """``ids [..., L]`` -> scaled embeddings ``[..., L, d]`` (same table for both sides)."""
        return self.embedding(ids.to(self.input_device)) * self.embed_scale

    def forward(self, rows: RowInputs, scored: torch.Tensor, **kwargs):
        inputs = {"attention_mask": rows.source_mask}
        if rows.source_embeds is not None:
            inputs["inputs_embeds"] = rows.source_embeds
        else:
            inputs["input_ids"] = rows.source_ids
        if rows.target_embeds is not None:
            inputs["decoder_inputs_embeds"] = rows.target_embeds / self.decoder_divisor
        else:
            inputs["decoder_input_ids"] = rows.target_ids
        return _forward_scored(self.model, self.keeps_logits, scored, use_cache=False, **inputs, **kwargs)


def _decoder_scales_given_embeds(adapter: EncoderDecoderAdapter) -> bool:
    """Whether the decoder multiplies *given* embeddings by its scale again (Marian in transformers 5).

    Gradients are always taken w.r.t. the scaled embeddings (Inseq's convention); such a decoder is fed
    ``scaled / scale`` so that the model computes exactly what it computes from token ids.
    """
    device = input_device(adapter.model)
    ids = torch.tensor([[3, 4, 5]], device=device)
    mask = torch.ones_like(ids)
    scored = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        reference = adapter.forward(RowInputs(source_ids=ids, target_ids=ids, source_mask=mask), scored).logits
        as_given = adapter.forward(RowInputs(source_ids=ids, target_embeds=adapter.embed(ids), source_mask=mask),
                                   scored).logits
    return not torch.allclose(reference, as_given, rtol=1e-4, atol=1e-5)


def _forward_scored(model: nn.Module, keeps_logits: bool, scored: torch.Tensor, **inputs):
    """Forward with the LM head applied only at ``scored`` positions (the model's own head code runs). The logits
    come back on the input device (under a device map the head may sit on another device), like the token ids
    that step functions compare them with."""
    device = input_device(model)
    if keeps_logits:
        out = model(logits_to_keep=scored.to(device), **inputs)
    else:
        out = model(**inputs)
        out.logits = out.logits[scored.to(out.logits.device)]
    out.logits = out.logits.to(device)
    return out


Adapter = DecoderOnlyAdapter | EncoderDecoderAdapter

# Eager attention saves each layer's [heads, L, L] attention weights for the backward; the rest of a layer
# saves about 16 hidden-size vectors per token (models/memory.py). Short rows switch to eager attention while
# that stays below this fraction of the rest.
EAGER_EXTRA_MEMORY = 0.25


@contextmanager
def batched_backward_attention(model: nn.Module, length: int) -> Iterator[bool]:
    """Within the block, a CPU model using SDPA attention runs eager attention instead when its rows are at
    most ``length`` tokens long and that costs little memory; yields whether it switched.

    The gradient kernel batches its step backwards with ``vmap`` (methods/gradient.py). PyTorch has no
    batching rule for the CPU SDPA kernel's backward, so ``vmap`` runs it once per step slot; eager
    attention (matrix products and a softmax) batches. Measured on SmolLM2-135M (2-core CPU): saliency and
    sequential IG about 13% faster, same values.
    """
    config = model.config
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    switch = (getattr(config, "_attn_implementation", None) == "sdpa" and input_device(model).type == "cpu"
              and hasattr(model, "set_attn_implementation")  # transformers >= 4.5x
              and heads is not None and hidden is not None
              and heads * length <= EAGER_EXTRA_MEMORY * 16 * hidden)
    if not switch:
        yield False
        return
    model.set_attn_implementation("eager")
    try:
        yield True
    finally:
        model.set_attn_implementation("sdpa")


def id_rows(adapter: Adapter, rows: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]):
    """Right-padded model inputs for rows ``(decoder ids [L], encoder ids [S] or None, scored positions)``;
    returns ``(RowInputs, scored [B, L])``."""
    device = adapter.input_device
    width = max(len(t) for t, _, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    scored = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for r, (t, _, pos) in enumerate(rows):
        ids[r, : len(t)] = t
        scored[r, pos] = True
    if not adapter.is_encoder_decoder:
        return RowInputs(target_ids=ids), scored
    s_width = max(len(s) for _, s, _ in rows)
    src = torch.zeros(len(rows), s_width, dtype=torch.long, device=device)
    mask = torch.zeros_like(src)
    for r, (_, s, _) in enumerate(rows):
        src[r, : len(s)], mask[r, : len(s)] = s, 1
    return RowInputs(target_ids=ids, source_ids=src, source_mask=mask), scored


def dropout_rerun(adapter: Adapter, rows: RowInputs, scored: torch.Tensor):
    """A callable recomputing ``[K, V]`` scored logits of ``rows`` with dropout active (MC dropout); the
    model is back in eval mode afterwards."""

    def rerun() -> torch.Tensor:
        adapter.model.train()
        try:
            return adapter.forward(rows, scored).logits
        finally:
            adapter.model.eval()

    return rerun


def wrap_model(model: nn.Module, prefix_cache: bool = True) -> Adapter:
    """Pick the adapter from the model's config; ``prefix_cache=False`` for models whose blocks cannot take a
    KV cache (Petals)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return EncoderDecoderAdapter.wrap(model)
    return DecoderOnlyAdapter.wrap(model, prefix_cache=prefix_cache)


# ---------------------------------------------------------------- block internals (patching methods)

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")  # a block's attention sub-module
MLP_NAMES = ("mlp", "feed_forward", "ffn")  # a block's MLP sub-module
# query/key/value projections inside the attention module: separate ones (Llama, Mistral, Qwen, OPT, GPT-J, ...)
# or a fused [q | k | v] projection of equal thirds (GPT-2's ``c_attn``)
SEPARATE_QKV = ("q_proj", "k_proj", "v_proj")
FUSED_QKV = ("c_attn",)


def block_stack(model: nn.Module) -> nn.ModuleList:
    """The decoder's transformer blocks in order: the first ``nn.ModuleList`` under ``model.get_decoder()`` (``model``
    itself when it has no decoder), as Inseq's ``find_block_stack``. A block maps the residual stream
    ``[B, L, d]`` (its first argument) to the next one."""
    root = model.get_decoder() if hasattr(model, "get_decoder") else None
    for _, parent in (root if root is not None else model).named_modules():
        for child in parent.children():
            if isinstance(child, nn.ModuleList):
                return child
    raise ValueError(f"No block stack (nn.ModuleList) found in {type(model).__name__}")


def block_part(block: nn.Module, part: str) -> nn.Module:
    """A block's attention (``part="attn"``) or MLP (``"mlp"``) sub-module, by the usual attribute names
    (:data:`ATTENTION_NAMES`, :data:`MLP_NAMES`); its output (first element if a tuple) is ``[B, L, d]``, what the
    block adds to the residual stream."""
    names = {"attn": ATTENTION_NAMES, "mlp": MLP_NAMES}[part]
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    children = ", ".join(name for name, _ in block.named_children())
    raise ValueError(f"{type(block).__name__} has no {part} module named {' or '.join(names)} (its modules: "
                     f"{children})")


def attention_projection(block: nn.Module, which: str) -> tuple[nn.Module, slice | None]:
    """The module whose output holds a block's queries, keys or values (``which`` = ``"query"``, ``"key"``,
    ``"value"``, all heads, before any rotary embedding) and the output channels that are theirs (None: all):
    ``self_attn.q_proj`` for Llama-like models, thirds of GPT-2's fused ``attn.c_attn``."""
    index = ("query", "key", "value").index(which)
    attention = block_part(block, "attn")
    module = getattr(attention, SEPARATE_QKV[index], None)
    if isinstance(module, nn.Module):
        return module, None
    for name in FUSED_QKV:
        fused = getattr(attention, name, None)
        if isinstance(fused, nn.Module):
            width = getattr(fused, "nf", None) or getattr(fused, "out_features", None)
            if width is None or width % 3:
                break
            third = width // 3
            return fused, slice(index * third, (index + 1) * third)
    children = ", ".join(name for name, _ in attention.named_children())
    raise ValueError(f"{type(attention).__name__} has no {which} projection named {SEPARATE_QKV[index]} or a fused "
                     f"{'/'.join(FUSED_QKV)} (its modules: {children})")
