"""Attention weights: one eager-attention forward over each full sequence gives every step's column.

``A[l, h, q, j] = softmax_j(q_q . k_j / sqrt(d_h) + mask)``. Step ``t`` reads query position ``t - 1``:
the decoder self-attention over tokens ``0 .. t-1`` (target side) and, for encoder-decoder models, the
cross-attention over the source. Results keep every layer and head: ``[n_tokens, n_steps, layers, heads]``
(Inseq's display averages heads, then layers).

Streaming. The weights are taken layer by layer, never for all layers at once on the device: a forward hook on
each attention module of the decoder blocks (:func:`attention_sites`) reads that module's ``[B, heads, Lq, Lk]``
weights from its output as the layer produces them, keeps only each row's query rows (``steps - 1``) and key
columns, moves them to the CPU as float32 into the example's result ``[tokens, steps, layers, heads]``, and
replaces the weights in the module's output by ``None``: the block (and anything after it) never holds them, so
at most one layer's full attention is alive on the device (the one being computed).

The model is called with ``output_attentions=False``. transformers (5.x) records attention weights into the model
output only when asked (its output-capturing hooks are off otherwise), while eager attention modules always return
their weights: asking would accumulate every layer's ``[B, heads, L, L]`` (and the encoder's) on the device until
the forward ends. Which modules produce the weights, and where in their output, comes from the decoder's own
``_can_record_outputs`` (what ``output_attentions=True`` would have collected: ``attentions`` and
``cross_attentions``), so the values are exactly the model's ``attentions`` / ``cross_attentions``; models without
it fall back to the block's ``self_attn`` / ``attn`` / ... module (:data:`~distattr.models.adapters.ATTENTION_NAMES`)
and ``encoder_attn`` / ``crossattention``, weights second in the output. Modules that return their weights only
when asked (older transformers) get a second forward with ``output_attentions=True``; the hooks, run ahead of the
model's own, still drop the weights, so only ``None`` is accumulated.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapters import ATTENTION_NAMES, RowInputs, block_stack
from ..models.memory import activation_bytes_per_token
from .base import NO_GRAD_BUDGET_FACTOR, MethodOutput, Request
from .gradient import _pad_stack

CROSS_ATTENTION_NAMES = ("encoder_attn", "crossattention", "EncDecAttention")  # fallback names (no recorder specs)
# Bytes per attention entry while one layer's eager attention is computed: the scores and the probabilities
# coexist (float32 softmax; a half-precision model also keeps its cast copy: 2 + 4 + 2).
ATTENTION_ENTRY_BYTES = 8


@contextmanager
def eager_attention(model):
    """Temporarily switch a model to the eager attention implementation (the only one returning weights)."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous == "eager" or previous is None:
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# ---------------------------------------------------------------- where the weights come from


@dataclass(frozen=True)
class AttentionSite:
    """A module producing one layer's attention weights: ``layer`` (index in the decoder's block stack),
    ``cross`` (cross-attention over the source, else decoder self-attention), ``module`` and ``index``, the
    position of the ``[B, heads, Lq, Lk]`` weights in the module's output tuple."""

    layer: int
    cross: bool
    module: nn.Module
    index: int


def _recorder_specs(model: nn.Module) -> dict[str, list[tuple[type | None, str | None, str | None, int]]]:
    """The decoder's transformers output recorders for ``attentions`` and ``cross_attentions``, each as
    ``(class, class-name suffix, layer name, output index)`` (transformers' own defaults: index 1)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    recorders = getattr(decoder if decoder is not None else model, "_can_record_outputs", None) or {}
    specs: dict[str, list] = {}
    for key in ("attentions", "cross_attentions"):
        found = recorders.get(key)
        entries = [] if found is None else found if isinstance(found, list) else [found]
        for spec in entries:
            if isinstance(spec, type):
                specs.setdefault(key, []).append((spec, None, None, 1))
            elif isinstance(spec, str):
                specs.setdefault(key, []).append((None, spec, None, 1))
            else:  # transformers.utils.output_capturing.OutputRecorder
                cls, class_name, layer_name, index = (getattr(spec, name, None) for name in
                                                      ("target_class", "class_name", "layer_name", "index"))
                specs.setdefault(key, []).append((cls, class_name, layer_name, 1 if index is None else index))
    return specs


def _matches(spec, name: str, module: nn.Module) -> bool:
    """transformers' rule: the class (or a class-name suffix of the module path) and, if given, the layer name as
    a component of the module path."""
    cls, class_name, layer_name, _ = spec
    if not ((cls is not None and isinstance(module, cls)) or (class_name is not None and name.endswith(class_name))):
        return False
    return layer_name is None or f".{layer_name.strip('.')}." in f".{name}."


def attention_sites(model: nn.Module, cross: bool) -> list[AttentionSite]:
    """One :class:`AttentionSite` per decoder block for self-attention, and per block for cross-attention with
    ``cross`` (encoder-decoder models), in block order."""
    blocks = block_stack(model)
    specs = _recorder_specs(model)
    root = model.get_decoder() if hasattr(model, "get_decoder") else None
    paths = {id(module): name for name, module in (root if root is not None else model).named_modules()}
    kinds = [(False, "attentions")] + ([(True, "cross_attentions")] if cross else [])
    sites = []
    for layer, block in enumerate(blocks):
        for is_cross, key in kinds:
            if key in specs:  # module paths from the decoder's root, as transformers matches them
                found = [(module, spec[3]) for name, module in block.named_modules() if name
                         for spec in specs[key] if _matches(spec, paths.get(id(module), name), module)]
            else:
                names = CROSS_ATTENTION_NAMES if is_cross else ATTENTION_NAMES
                found = [(getattr(block, n), 1) for n in names if isinstance(getattr(block, n, None), nn.Module)][:1]
            if len(found) != 1:
                what = "cross-attention" if is_cross else "self-attention"
                modules = ", ".join(name for name, _ in block.named_modules() if name)
                raise ValueError(f"attention: expected one {what} module in block {layer} of "
                                 f"{type(block).__name__}, found {len(found)} (its modules: {modules})")
            sites.append(AttentionSite(layer, is_cross, *found[0]))
    return sites


@contextmanager
def streamed_attention(sites: list[AttentionSite], take: Callable[[AttentionSite, torch.Tensor], None]):
    """While active, every call of a site's module hands its weights ``[B, heads, Lq, Lk]`` to ``take(site,
    weights)`` and returns ``None`` in their place (``take`` keeps what it needs, e.g. on the CPU). The hooks run
    ahead of any other (transformers' output capturing included). Yields the list of sites whose module returned
    no weights (e.g. only returned when ``output_attentions=True``)."""
    missing: list[AttentionSite] = []

    def hook_for(site: AttentionSite):
        def hook(module, args, output):
            if not isinstance(output, tuple | list) or not -len(output) <= site.index < len(output):
                missing.append(site)
                return None
            weights = output[site.index]
            if not isinstance(weights, torch.Tensor):
                missing.append(site)
                return None
            take(site, weights)
            if type(output) not in (tuple, list):  # e.g. a ModelOutput: left as it is
                return None
            dropped = list(output)
            dropped[site.index] = None
            del weights
            return type(output)(dropped)

        return hook

    handles = [site.module.register_forward_hook(hook_for(site), prepend=True) for site in sites]
    try:
        yield missing
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------- the method


def attention_entry_tokens(model: nn.Module) -> float:
    """What one entry of one layer's eager attention ``[heads, Lq, Lk]`` costs in units of
    :attr:`Request.inference_token_budget` (a no-grad forward's token: ``1 / NO_GRAD_BUDGET_FACTOR`` of the
    activation memory :func:`~distattr.models.memory.activation_bytes_per_token` budgets per token), times the
    number of heads."""
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = max((getattr(config, name, None) or 0) for name in
                ("num_attention_heads", "decoder_attention_heads", "encoder_attention_heads")) or 1
    token_bytes = max(1.0, activation_bytes_per_token(model.config, dtype) / NO_GRAD_BUDGET_FACTOR)
    return heads * ATTENTION_ENTRY_BYTES / token_bytes


def attention_attribution(req: Request) -> list[MethodOutput]:
    """``[tokens, steps, layers, heads]`` attention weights of every example (module docstring).

    Batches, longest first: a padded row costs its tokens (``target + source``; a no-grad forward keeps one
    layer's transients) plus one layer's attention ``[heads, side, side]`` (``side``: its longest sequence; only
    one layer's weights live at a time, whatever the number of layers), and the rows of a batch stay within
    ``req.inference_token_budget``; a longer row runs alone.
    """
    adapter, examples = req.adapter, req.examples
    enc_dec = adapter.is_encoder_decoder
    device = adapter.input_device
    sites = attention_sites(adapter.model, cross=enc_dec)
    per_entry = attention_entry_tokens(adapter.model)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].target_ids))
    results: dict[int, MethodOutput] = {}
    batch: list[int] = []

    def flush():
        if batch:
            results.update(_attention_batch(req, batch, device, sites))
            if req.on_progress is not None:
                req.on_progress(sum(examples[i].n_steps for i in batch), sum(len(examples[i].target_ids)
                                                                              for i in batch))
            batch.clear()

    with eager_attention(adapter.model), torch.no_grad():
        for i in order:
            rows = [examples[j] for j in (*batch, i)]
            target = max(len(ex.target_ids) for ex in rows)
            source = max(len(ex.source_ids) for ex in rows) if enc_dec else 0
            cost = len(rows) * (target + source + per_entry * max(target, source) ** 2)
            if batch and cost > req.inference_token_budget:
                flush()
            batch.append(i)
        flush()
    return [results[i] for i in range(len(examples))]


def _attention_batch(req: Request, indices: list[int], device, sites: list[AttentionSite] | None = None
                     ) -> dict[int, MethodOutput]:
    """One padded forward over the examples ``indices``; each attention site's weights go, layer by layer, into
    the examples' CPU results (module docstring)."""
    adapter = req.adapter
    enc_dec = adapter.is_encoder_decoder
    if sites is None:
        sites = attention_sites(adapter.model, cross=enc_dec)
    n_layers = max(site.layer for site in sites) + 1
    exs = [req.examples[i] for i in indices]
    length = max(ex.end - 1 for ex in exs)
    inputs = {"target_ids": _pad_stack([ex.target_ids[: ex.end - 1] for ex in exs], length)}
    src_len = 0
    if enc_dec:
        src_len = max(len(ex.source_ids) for ex in exs)
        inputs["source_ids"] = _pad_stack([ex.source_ids for ex in exs], src_len)
        inputs["source_mask"] = _pad_stack(
            [torch.ones(len(ex.source_ids), dtype=torch.long, device=device) for ex in exs], src_len)
    scored = torch.zeros(len(exs), length, dtype=torch.bool, device=device)
    queries = [torch.arange(ex.start, ex.end) - 1 for ex in exs]  # step t reads query position t - 1
    on_device: dict[torch.device, list[torch.Tensor]] = {}  # queries, on each device weights come from
    target: list[torch.Tensor | None] = [None] * len(exs)  # [tokens, steps, layers, heads], CPU float32
    source: list[torch.Tensor | None] = [None] * len(exs)  # [source tokens, steps, layers, heads]
    taken: set[tuple[int, bool]] = set()
    n_heads = [0]

    def take(site: AttentionSite, weights: torch.Tensor) -> None:
        keys = src_len if site.cross else length
        if weights.dim() != 4 or weights.shape[0] != len(exs) or weights.shape[-2:] != (length, keys):
            raise ValueError(f"attention: layer {site.layer}'s {'cross' if site.cross else 'self'}-attention "
                             f"weights have shape {tuple(weights.shape)}, expected [{len(exs)}, heads, {length}, "
                             f"{keys}]")
        if (site.layer, site.cross) in taken:
            raise ValueError(f"attention: the module of layer {site.layer} ran twice in one forward")
        taken.add((site.layer, site.cross))
        n_heads[0] = weights.shape[1]
        if not site.cross and not req.attribute_target:
            return
        results = source if site.cross else target
        if weights.device not in on_device:
            on_device[weights.device] = [q.to(weights.device) for q in queries]
        for r, ex in enumerate(exs):
            n_keys = len(ex.source_ids) if site.cross else ex.end - 1
            rows = weights[r, :, on_device[weights.device][r], :n_keys]  # [heads, steps, n_keys]
            if results[r] is None:
                size = n_keys if site.cross else len(ex.target_ids)
                results[r] = torch.full((size, len(queries[r]), n_layers, weights.shape[1]), float("nan"))
            results[r][:n_keys, :, site.layer] = rows.cpu().float().permute(2, 1, 0)

    out = None
    for request in (False, True):
        taken.clear()
        with streamed_attention(sites, take) as missing, torch.no_grad():  # no graph keeping the weights
            out = adapter.forward(RowInputs(**inputs), scored, output_attentions=request)
        if not missing:
            break
        if request:
            raise ValueError("attention: the attention modules return no weights (eager attention is required); "
                             f"first without weights: layer {missing[0].layer}, {type(missing[0].module).__name__}")
    del out
    if len(taken) != len(sites):
        raise ValueError(f"attention: {len(sites) - len(taken)} of the {len(sites)} attention modules did not run")
    outputs = {}
    for r, (i, ex) in enumerate(zip(indices, exs, strict=True)):
        steps = torch.arange(ex.start, ex.end)
        if target[r] is not None:
            future = torch.arange(len(ex.target_ids)).view(-1, 1) >= steps.view(1, -1)
            target[r][future] = float("nan")
        labels = (tuple(str(x) for x in range(n_layers)), tuple(str(x) for x in range(n_heads[0])))
        outputs[i] = MethodOutput(source=source[r], target=target[r], extra_dims=("layer", "head"),
                                  extra_labels=labels)
    return outputs
