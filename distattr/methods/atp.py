r"""Attribution patching (AtP) and AtP*: first-order estimates of activation patching, every component at once.

Same runs, components, windows and result contract as :mod:`distattr.methods.patching` (``target [N, T, L]``,
``extra_dims=("layer",)``, ``deltas`` = total effects); ``a_l`` is the component at layer ``l`` (``[n, c]``),
``a~_l^k`` its value in corrupted run ``k``, ``m_t`` the attributed function at step ``t``.

**AtP** (Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale"; Kramár, Lieberum, Shah &
Nanda 2024, arXiv 2403.00745, eq. 4) linearises the effect of restoring ``a_l`` at position ``p`` into the corrupted
run around the corrupted run::

    AtP_t(l, p) = 1/K sum_k sum_c (a_l[p, c] - a~_l^k[p, c]) * d m_t / d a~_l^k[p, c]

summed over the component's channels (the hidden size), averaged over the ``K`` noise draws like activation
patching's metric. A window restores several layers: its estimate is the sum of theirs (the linearisation is
additive). Cost: one clean forward, one forward of the ``K`` corrupted rows with gradients, and one backward per
step (several steps per batched ``vmap`` backward) for every layer and position at once.

**AtP*** (Kramár et al. 2024, section 3) adds two fixes.

*QK fix* (components ``"query"`` and ``"key"``; ``qk_fix=True``). A query or key feeds the attention softmax, whose
linearisation fails when the pattern saturates. The change of the attention probabilities ``A`` (``[H, n, n]`` per
layer, all heads) is computed exactly and only the rest is linearised, with ``G = d m_t / d A`` at the corrupted run
(every head ``h``; ``q~, k~`` the corrupted run's queries and keys after any rotary embedding, ``q, k`` the clean ones,
``s`` the softmax scale)::

    query at p:  sum_h sum_j (A'_{h,p,j} - A_{h,p,j}) G_{h,p,j},   A'_{h,p,.} = softmax_j(s q_{h,p} . k~_{h,j} + mask)
    key at p:    sum_h sum_{i >= p} sum_j (A'^{(p)}_{h,i,j} - A_{h,i,j}) G_{h,i,j}

where ``A'^{(p)}_{h,i,.}`` is row ``i`` recomputed with the score of key ``p`` set to ``s q~_{h,i} . k_{h,p}`` (the
key's clean value; every other score unchanged); the sum over query rows ``i >= p`` is the paper's eq. 10. Both are
computed as written, softmax and all (a closed form through the partition function loses every digit when a row
saturates on the patched key), in float64, ``O(K H n^3)`` per layer for keys. Grouped-query heads
share their key/value head. The version here is per layer (all heads of the layer, one node per position), like
every other component of these methods; per-head nodes are left out. ``"attn"`` (the attention *output*) has no QK
fix: its own change is exact already, and the softmax it came through is not linearised.

*GradDrop* (``grad_drop=True``, eq. 11). Cancelling paths can make the gradient vanish where the patch does not.
For each layer ``l``, ``AtP_{t,l}`` is AtP with the gradient through block ``l``'s contribution to the residual
stream dropped: in the backward, block ``l``'s output passes its gradient straight to its input (the residual skip)
and nothing into the block, so the components inside block ``l`` get 0. The estimate is::

    AtP*_t(n) = 1/(L - 1) sum_{l=0}^{L-1} | AtP_{t,l}(n) |        (AtP_{t,l} with the QK fix where it applies)

(``L - 1``: a node inside block ``l`` gets 0 from ``l``.) With noise draws the absolute value is taken of the draws'
mean (the estimate of the mean indirect effect); GradDrop estimates are magnitudes (``>= 0``). ``grad_drop=False``
keeps the sign (QK fix only). Cost per step: one backward to every block's output, then for each ``l`` one
backward from block ``l``'s input with the gradient at its output (above ``l`` nothing changes): about ``L / 2``
full backwards instead of one.

Decoder-only models; memory holds every layer's component for the clean and the ``K`` corrupted rows, and for the QK
fix every layer's ``[K, H, n, n]`` attention probabilities and their gradient.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.adapters import RowInputs, block_part
from .base import MethodOutput, Request, check_differentiable, repeat_picks
from .patching import (
    PatchingArgs,
    Site,
    capture,
    check_decoder_only,
    component_site,
    corrupt,
    finish,
    layer_labels,
    noise_std,
    scored_mask,
    step_picks,
    windows,
)

# Step slots per batched backward: at most this many times the token budget in (slots x rows x positions).
VJP_TOKEN_FACTOR = 8
QK_FIX_COMPONENTS = ("query", "key")
QK_CHUNK_ELEMENTS = 1 << 24  # patched attention patterns computed at once by the QK fix (keys x rows x heads x n x n)


@dataclass(frozen=True)
class AtPStarArgs(PatchingArgs):
    """Arguments of ``atp_star``: those of ``attribution_patching`` plus ``qk_fix`` (exact attention pattern for
    ``component="query"``/``"key"``) and ``grad_drop`` (mean of ``|AtP|`` with each layer's gradient path dropped;
    False keeps the sign)."""

    qk_fix: bool = True
    grad_drop: bool = True


def attribution_patching(req: Request, args: PatchingArgs) -> list[MethodOutput]:
    """AtP over ``req.examples`` (module docstring): ``target [N, T, L]`` estimates, ``deltas [T]`` total effects."""
    check_decoder_only(req, "attribution_patching")
    return _run(req, args, qk_fix=False, grad_drop=False)


def atp_star(req: Request, args: AtPStarArgs) -> list[MethodOutput]:
    """AtP* over ``req.examples`` (module docstring): QK fix for query/key components, GradDrop."""
    check_decoder_only(req, "atp_star")
    return _run(req, args, qk_fix=args.qk_fix and args.component in QK_FIX_COMPONENTS, grad_drop=args.grad_drop)


def _run(req: Request, args: PatchingArgs, qk_fix: bool, grad_drop: bool) -> list[MethodOutput]:
    site = component_site(req.adapter.model, args.component)
    sigma = noise_std(req.adapter, args)
    outputs = []
    for ex in req.examples:
        outputs.append(_example(req, site, args, sigma, ex, qk_fix, grad_drop))
        if req.on_progress is not None:
            req.on_progress(ex.n_steps, (ex.end - 1) * site.n_layers)
    return outputs


# ---------------------------------------------------------------- attention recording (QK fix)


@dataclass
class AttentionRecord:
    """One attention call: queries ``[B, H, n, hd]`` and keys ``[B, KV, n, hd]`` (after rotary embeddings), the
    additive mask (``[B or 1, 1, n, n]`` or None), the softmax scale and the probabilities ``[B, H, n, n]`` (the
    tensor the values are multiplied with, so gradients can be taken with respect to it)."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    probs: torch.Tensor


@dataclass
class AttentionRecorder:
    """Records every layer's :class:`AttentionRecord` while :func:`recording_attention` is active."""

    layer_of: dict[int, int]
    records: dict[int, AttentionRecord] = field(default_factory=dict)


_RECORDER: ContextVar[AttentionRecorder | None] = ContextVar("distattr_attention_recorder", default=None)
RECORDING = "distattr_recording"  # the attention implementation's name in transformers' AttentionInterface


def _recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention that records its inputs and probabilities (transformers ``AttentionInterface`` signature)."""
    for name in ("softcap", "sinks", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"atp_star's QK fix does not model attention with {name} (this model uses it)")
    groups = query.shape[1] // key.shape[1]
    keys, values = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
    if attention_mask is not None:
        scores = scores + attention_mask[..., : keys.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    recorder = _RECORDER.get()
    if recorder is not None and id(module) in recorder.layer_of:
        recorder.records[recorder.layer_of[id(module)]] = AttentionRecord(
            query.detach(), key.detach(), None if attention_mask is None else attention_mask.detach(), scale, probs)
    return torch.matmul(probs, values).transpose(1, 2).contiguous(), probs


@contextmanager
def recording_attention(model: nn.Module, recorder: AttentionRecorder | None):
    """Within the block, ``model`` runs :func:`_recording_attention` (eager) and fills ``recorder`` (None: nothing)."""
    if recorder is None:
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(RECORDING, _recording_attention)
    AttentionMaskInterface.register(RECORDING, eager_mask)
    previous = getattr(model.config, "_attn_implementation", None) or "eager"
    token = _RECORDER.set(recorder)
    model.set_attn_implementation(RECORDING)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _RECORDER.reset(token)


def _qk_fixed(component: str, corrupted: AttentionRecord, clean: AttentionRecord, grad: torch.Tensor) -> torch.Tensor:
    """The QK-fixed estimate of every position's query or key node of one layer (module docstring), ``[S, K, n]``
    for ``grad = dm/dA`` ``[S, K, H, n, n]`` (``S`` step slots, ``K`` corrupted rows)."""
    q, k = corrupted.query.double(), corrupted.key.double()  # [K, H, n, hd], [K, KV, n, hd]
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    q_clean = clean.query.double()
    k_clean = clean.key.double().repeat_interleave(groups, dim=1)
    n = q.shape[-2]
    if corrupted.mask is None:  # causal
        visible = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    elif corrupted.mask.dtype == torch.bool:
        visible = corrupted.mask[..., :n]
    else:  # additive: -inf or the dtype's lowest value where masked
        visible = corrupted.mask[..., :n] > torch.finfo(corrupted.mask.dtype).min / 2
    mask = torch.zeros(visible.shape, dtype=torch.float64, device=q.device).masked_fill(~visible, float("-inf"))
    if corrupted.mask is not None and corrupted.mask.dtype != torch.bool:
        mask = torch.where(visible, corrupted.mask[..., :n].double(), mask)  # keep additive biases
    scores = q @ k.transpose(-1, -2) * corrupted.scaling + mask  # [K, H, n, n]
    probs = scores.softmax(-1)
    g = grad.double()
    if component == "query":  # row p recomputed with the clean query at p
        patched = (q_clean @ k.transpose(-1, -2) * corrupted.scaling + mask).softmax(-1)
        return ((patched - probs)[None] * g).sum(dim=(2, 4))  # sum over heads and keys -> [S, K, n]
    # key at p: every row recomputed with the score of key p replaced (rows i < p do not see it: no change)
    cross = q @ k_clean.transpose(-1, -2) * corrupted.scaling + mask  # [K, H, n(i), n(p)]
    out = g.new_zeros((g.shape[0], g.shape[1], n))
    chunk = max(1, QK_CHUNK_ELEMENTS // max(scores.numel(), 1))
    for first in range(0, n, chunk):
        keys = range(first, min(n, first + chunk))
        patched = scores[None].repeat(len(keys), *[1] * scores.dim())  # [c, K, H, n, n]
        for c, p in enumerate(keys):
            patched[c, ..., p] = cross[..., p]
        change = patched.softmax(-1) - probs[None]
        out[..., first : first + len(keys)] = torch.einsum("ckhij,skhij->skc", change, g)
    return out


# ---------------------------------------------------------------- hooks


def _leaf_hook(layer: int, site: Site, leaves: list, acts: list):
    """A component forward hook adding a zero leaf to the output (its gradient is the component's) and recording the
    component's value."""

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple | list) else output
        acts[layer] = site.select(h).detach()
        z = torch.zeros_like(h, requires_grad=True)
        leaves[layer] = z
        return (h + z, *output[1:]) if isinstance(output, tuple | list) else h + z

    return hook


def _backward(output: torch.Tensor, cotangents: torch.Tensor, inputs: list[torch.Tensor]) -> list:
    """Gradients of ``output`` for each step slot (``cotangents [S, *output.shape]``) with respect to ``inputs``:
    ``[S, *input.shape]`` each (None: unused); the graph is kept. One slot: a plain backward (vmap's batching rules
    cost more than they save there); several: one batched (``vmap``) backward."""
    if len(cotangents) == 1:
        grads = torch.autograd.grad(output, inputs, grad_outputs=cotangents[0], retain_graph=True, allow_unused=True)
        return [None if g is None else g[None] for g in grads]
    with warnings.catch_warnings():  # ops without a batching rule loop over slots: still exact
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        return list(torch.autograd.grad(output, inputs, grad_outputs=cotangents, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True))


# ---------------------------------------------------------------- one example


def _example(req: Request, site: Site, args: PatchingArgs, sigma: float, ex, qk_fix: bool,
             grad_drop: bool) -> MethodOutput:
    adapter = req.adapter
    model = adapter.model
    n, n_layers, steps = ex.end - 1, site.n_layers, ex.n_steps
    device = adapter.input_device
    corrupted = corrupt(adapter, ex, args, sigma)
    k = len(corrupted.embeds)
    picks, positions = step_picks(ex)
    layer_of = {id(block_part(b, "attn")): layer for layer, b in enumerate(site.blocks)} if qk_fix else {}
    clean_rec = AttentionRecorder(layer_of) if qk_fix else None
    with torch.no_grad(), recording_attention(model, clean_rec), capture(site.modules, site.select) as clean_acts:
        logits = adapter.forward(RowInputs(target_embeds=adapter.embed(ex.target_ids[None, :n])),
                                 scored_mask(1, n, positions, device)).logits
        clean_metric = req.target_fn(logits, picks, None).float()

    leaves: list[torch.Tensor | None] = [None] * n_layers
    acts: list[torch.Tensor | None] = [None] * n_layers
    outs: list[torch.Tensor | None] = [None] * n_layers  # what each block hands on (after a residual leaf)
    corrupted_rec = AttentionRecorder(layer_of) if qk_fix else None
    handles = [m.register_forward_hook(_leaf_hook(layer, site, leaves, acts)) for layer, m in enumerate(site.modules)]
    if grad_drop:  # after the leaf hooks: a residual leaf is part of what its block hands on
        handles += [b.register_forward_hook(lambda mod, a, o, layer=layer: outs.__setitem__(
            layer, o[0] if isinstance(o, tuple | list) else o)) for layer, b in enumerate(site.blocks)]
    try:
        with torch.enable_grad(), recording_attention(model, corrupted_rec):
            logits = adapter.forward(RowInputs(target_embeds=corrupted.embeds), scored_mask(k, n, positions, device)
                                     ).logits
            f = check_differentiable(req.target_fn(logits, repeat_picks(picks, k), None))  # [k * T], row-major
        del logits
    finally:
        for h in handles:
            h.remove()
    corrupted_metric = f.detach().float().view(k, steps)
    diffs = [clean_acts[m][0][None] - acts[m] for m in range(n_layers)]  # [k, n, c]
    probs = [corrupted_rec.records[m].probs for m in range(n_layers)] if qk_fix else []

    def estimate(m: int, grad: torch.Tensor | None, slots: int) -> torch.Tensor:
        """``[slots, k, n]`` estimates of layer ``m`` from the gradient of its leaf (or, QK fix, its probabilities)."""
        if grad is None:
            return torch.zeros(slots, k, n, dtype=torch.float64)
        if qk_fix:
            return _qk_fixed(args.component, corrupted_rec.records[m], clean_rec.records[m], grad).cpu()
        return (diffs[m].double()[None] * site.select(grad).double()).sum(-1).cpu()

    bounds = torch.tensor(windows(n_layers, args.window))

    def windowed(estimates: list[torch.Tensor]) -> torch.Tensor:
        """Per-layer estimates ``[slots, k, n]`` -> ``[slots, n, L]``: mean over rows, summed over each window."""
        per_layer = torch.stack(estimates, dim=-1).mean(1)
        cumulative = torch.cat([torch.zeros_like(per_layer[..., :1]), per_layer.cumsum(-1)], dim=-1)
        return cumulative[..., bounds[:, 1]] - cumulative[..., bounds[:, 0]]

    group = max(1, min(steps, VJP_TOKEN_FACTOR * req.token_budget // max(k * n, 1)))
    total = torch.zeros(steps, n, n_layers, dtype=torch.float64)
    for first in range(0, steps, group):
        slots = list(range(first, min(steps, first + group)))
        cotangents = f.new_zeros((len(slots), len(f)))
        for i, t in enumerate(slots):
            cotangents[i, torch.arange(k) * steps + t] = 1.0
        nodes = probs if qk_fix else leaves
        grads = _backward(f, cotangents, nodes + (outs if grad_drop else []))
        plain = [estimate(m, grads[m], len(slots)) for m in range(n_layers)]
        if not grad_drop:
            total[slots] = windowed(plain)
            continue
        # GradDrop: dropping block l leaves the gradients above it as they are, zeroes those inside it, and sends the
        # gradient at its output straight to its input, from where one backward reaches the blocks below
        at_output = grads[n_layers:]
        for layer in range(n_layers):
            estimates = list(plain)
            if args.component != "residual":  # the block's own components (the residual stream is its output)
                estimates[layer] = torch.zeros_like(plain[layer])
            if layer > 0:
                below = _backward(outs[layer - 1], at_output[layer], nodes[:layer])
                estimates[:layer] = [estimate(m, below[m], len(slots)) for m in range(layer)]
            total[slots] += windowed(estimates).abs()
    if grad_drop:
        total /= max(n_layers - 1, 1)
    deltas = clean_metric.cpu() - corrupted_metric.mean(0).cpu()
    return MethodOutput(source=None, target=finish(ex, corrupted.first, total.permute(1, 0, 2), n_layers),
                        deltas=deltas.float(), extra_dims=("layer",), extra_labels=layer_labels(site))


__all__ = ["AtPStarArgs", "atp_star", "attribution_patching"]
