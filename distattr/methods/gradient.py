r"""Gradient methods on shared-forward rows (see :mod:`distattr.methods.rows`).

All of them are one formula over a *path* of points between a baseline ``b`` and the input ``x``
(scaled input embeddings, or a layer's output activations for the layer methods):

.. math::  A_i = |\,\cdot\,|^{abs}\Big( \sum_k w_k \; m_{k,i} \odot \frac{\partial f}{\partial z_i}(z^{(k)}) \Big)

=============================  =======================  ==============  ========================
method                         points ``z^(k)``          weights ``w``    multiplier ``m``
=============================  =======================  ==============  ========================
saliency                       ``x``                     1               1, then ``|.|``
input_x_gradient               ``x``                     1               ``x``
integrated_gradients           ``b + a_k (x - b)``       quadrature       ``x - b``
gradient_shap                  ``b + a_k (x + e_k - b)``  ``1/n``          ``x + e_k - b``
layer_gradient_x_activation    layer output ``h(x)``     1               ``h(x)``
layer_integrated_gradients     ``h(b) + a_k (h(x)-h(b))``  quadrature     ``h(x) - h(b)``
=============================  =======================  ==============  ========================

with ``a_k ~ U(0,1)`` and ``e_k ~ N(0, stdevs^2)`` for GradientSHAP. Every per-dimension result is
reduced to one score per token on the device (``vnorm`` = L2 over the hidden size, as Inseq shows it,
or ``sum``) before anything leaves it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapters import RowInputs, batched_backward_attention, dropout_rerun, id_rows
from ..models.memory import decoder_layer_count, recompute_kept_share, release_freed_host_memory
from ..models.recompute import recomputed_blocks
from .base import (
    Example,
    MethodOutput,
    Picks,
    Request,
    attributed_sides,
    check_differentiable,
    empty_outputs,
    reduce_hidden,
)
from .rows import Piece, Unit, pack, pack_suffixes, plan_units

# Step slots per batched backward: at most this many times the token budget in (slots x batch tokens), which
# bounds the backward's transient gradient memory (activations saved by the forward are not duplicated).
VJP_TOKEN_FACTOR = 8


@dataclass(frozen=True)
class Memory:
    """How a gradient run fills its token budget ``B``: the tokens whose activations, kept in every block for a
    backward, fit the memory given to the run.

    Without recomputation a batch holds at most ``B`` tokens, and one backward call batches
    ``VJP_TOKEN_FACTOR * B / T`` step slots of a ``T``-token batch. With recomputation a token keeps
    ``kept_share`` of its activations (:func:`~distattr.models.memory.recompute_kept_share`); a batch holds at
    most ``B / (2 kept_share)`` tokens, and the vmapped backward of ``G`` slots through one recomputed block,
    about ``G T`` tokens of one block's activations, ``G T / layers`` budget tokens, takes what the batch leaves
    of the budget. Every backward call recomputes each block once, so the more slots per call the cheaper.
    """

    token_budget: int
    recompute: bool = False
    kept_share: float = 1.0
    layers: int = 1

    @property
    def batch_tokens(self) -> int:
        """Most padded tokens in one forward batch."""
        if not self.recompute:
            return self.token_budget
        return max(1, int(self.token_budget / (2 * self.kept_share)))

    def slots_per_backward(self, tokens: int) -> int:
        """Step slots batched into one backward call over a ``tokens``-token batch (at least 1)."""
        if not self.recompute:
            return max(1, VJP_TOKEN_FACTOR * self.token_budget // max(tokens, 1))
        left = self.token_budget - tokens * self.kept_share
        return max(1, int(left * self.layers / max(tokens, 1)))


def kernel_memory(model, token_budget: int, longest_row: int, mode: str) -> Memory:
    """The :class:`Memory` of a run whose longest row has ``longest_row`` tokens: recomputation ``"always"``,
    ``"never"``, or ``"auto"``: when one row alone holds more tokens than the budget."""
    recompute = mode == "always" or (mode == "auto" and longest_row > token_budget)
    if not recompute:
        return Memory(token_budget)
    return Memory(token_budget, True, recompute_kept_share(model.config), decoder_layer_count(model.config))


@dataclass(frozen=True)
class Path:
    """Points, weights and multiplier of a gradient method (one set per unit; see module doc).

    ``alphas``/``weights`` are ``[P]``; with ``random_alphas`` fresh alphas are drawn per unit from
    ``generator`` (GradientSHAP). ``multiply`` is ``"none"``, ``"input"`` or ``"delta"``. With
    ``per_position`` (sequential IG) every attributed token gets its own path: only that token moves from
    its baseline to its input, the others stay at the input, and only its own gradient is kept. ``points``
    (discretized IG) gives explicit path points instead of ``b + a (x - b)``: ``(ids, baseline ids) [U, L] ->
    [U, P, L, d]``, with ``multiply="step"`` (the next point minus this one; zero after the last).
    """

    alphas: torch.Tensor
    weights: torch.Tensor
    multiply: str
    absolute: bool = False
    noise_std: float = 0.0
    random_alphas: bool = False
    generator: torch.Generator | None = None
    per_position: bool = False
    points: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @property
    def n_points(self) -> int:
        return len(self.alphas)


@dataclass(frozen=True)
class LayerTarget:
    """Attribute to the outputs of ``modules`` instead of the input embeddings.

    ``interpolate`` replaces the output by ``h(b) + a (h(x) - h(b))`` (one module only); otherwise a zero
    tensor is added to each output so that gradients reach every module along all paths.
    ``sides[i]`` is ``"source"`` for encoder modules, else ``"target"``.
    """

    modules: tuple[nn.Module, ...]
    sides: tuple[str, ...]
    names: tuple[str, ...]
    interpolate: bool = False


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


@dataclass
class _Accumulator:
    """Per-unit running sums of ``w * m * grad``: one dict per step, keyed by leaf (``"target"``, ``"source"``
    or ``"<side>:<layer index>"``), kept until all of the unit's points have run."""

    remaining: int
    steps: list[dict[str, torch.Tensor]]


def gradient_attribution(req: Request, path: Path, layer: LayerTarget | None = None,
                         convergence_delta: bool = False) -> list[MethodOutput]:
    """Run a gradient method over all examples of ``req``; returns one :class:`MethodOutput` each."""
    adapter, examples = req.adapter, req.examples
    enc_dec = adapter.is_encoder_decoder
    n_layers = len(layer.modules) if layer else 0
    extra = (n_layers,) if n_layers > 1 else ()
    sides = set(layer.sides) if layer is not None else attributed_sides(req)
    outputs = [list(empty_outputs(ex, sides, extra)) for ex in examples]
    sums = [torch.zeros(ex.n_steps) for ex in examples]  # signed totals, for convergence deltas

    units = plan_units(examples, req.steps_per_row)
    source_lens = [len(examples[u.example].source_ids) if enc_dec else 0 for u in units]
    counts = [path.n_points * len(_moved_tokens(req, unit)) if path.per_position else path.n_points
              for unit in units]
    if _reuses_prefixes(req, path, layer):  # each row starts at its moved token, after a cached clean prefix
        def first_position(u: int, q: int) -> int:
            return _moved_tokens(req, units[u])[q // path.n_points][1]

        memory = Memory(req.token_budget)  # rows that extend a KV cache are not recomputed
        batches = pack_suffixes(units, counts, req.token_budget, first_position)
    else:
        longest = max((u.length + s for u, s in zip(units, source_lens, strict=True)), default=0)
        memory = kernel_memory(req.adapter.model, req.token_budget, longest, req.recompute)
        batches = pack(units, counts, memory.batch_tokens, source_lens)
    accumulators: dict[int, _Accumulator] = {}
    clean_caches: dict[tuple[int, ...], object] = {}  # the KV cache of the current batch's units, kept across batches
    for batch in batches:
        _run_batch(req, path, layer, units, counts, batch, accumulators, outputs, sums, clean_caches, memory)
        if req.on_progress is not None:
            finished = {p.unit for p in batch} - set(accumulators)
            req.on_progress(sum(len(units[u].steps) for u in finished),
                            sum(units[p.unit].length * len(p.points) for p in batch))

    deltas = _convergence_deltas(req, sums) if convergence_delta else [None] * len(examples)
    return [
        MethodOutput(source=s, target=t, deltas=d, extra_dims=("layer",) if extra else (),
                     extra_labels=(layer.names,) if extra else ())
        for (s, t), d in zip(outputs, deltas, strict=True)
    ]


def _reuses_prefixes(req: Request, path: Path, layer: LayerTarget | None) -> bool:
    """Sequential IG on a causal decoder: a row that moves token ``j`` equals the input before ``j``, so it
    runs from ``j`` on, after the KV cache of the clean prefix (no gradient flows to earlier positions, and
    only the moved token's gradient is kept): about half the tokens forward and backward."""
    return path.per_position and layer is None and req.adapter.caches_prefixes


def _moved_tokens(req: Request, unit: Unit) -> list[tuple[str, int]]:
    """Sequential IG: the ``(side, position)`` tokens of ``unit`` that get a path of their own, in point order
    (point ``q`` moves token ``q // n_points`` at path point ``q % n_points``)."""
    ex = req.examples[unit.example]
    sides = attributed_sides(req)
    moved = [("source", j) for j in range(len(ex.source_ids))] if "source" in sides else []
    return moved + ([("target", j) for j in range(unit.length)] if "target" in sides else [])


def _alphas(path: Path, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if path.random_alphas:
        alphas = torch.rand(n, generator=path.generator)
        return alphas.to(device), path.weights.to(device)
    return path.alphas.to(device), path.weights.to(device)


def _pad_stack(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """Right-pad ``[L_r, ...]`` tensors with zeros to ``[R, length, ...]``."""
    out = rows[0].new_zeros((len(rows), length, *rows[0].shape[1:]))
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


@dataclass(frozen=True)
class _Rows:
    """The rows of one batch, each one path point of one unit.

    ``unit[r]`` is the unit of row ``r`` and ``local[r]`` its index in ``units`` (the batch's distinct
    units, sorted); ``alpha`` and ``weight`` are ``[R]``.
    """

    unit: list[int]
    local: torch.Tensor
    units: list[int]
    alpha: torch.Tensor
    weight: torch.Tensor
    point: torch.Tensor
    moved: list[tuple[str, int]] | None = None


def _expand(req: Request, all_units: list[Unit], batch: list[Piece], path: Path, device) -> _Rows:
    unit, alphas, weights, moved, points = [], [], [], [], []
    for piece in batch:
        a, w = _alphas(path, len(piece.points), device)
        index = [q % path.n_points for q in piece.points]
        points += index
        alphas.append(a if path.random_alphas else a[index])
        weights.append(w[index])  # sliced for random paths too: a unit's samples may span batches
        unit += [piece.unit] * len(piece.points)
        if path.per_position:
            tokens = _moved_tokens(req, all_units[piece.unit])
            moved += [tokens[q // path.n_points] for q in piece.points]
    units = sorted(set(unit))
    position = {u: i for i, u in enumerate(units)}
    local = torch.tensor([position[u] for u in unit], device=device)
    return _Rows(unit=unit, local=local, units=units, alpha=torch.cat(alphas), weight=torch.cat(weights),
                 point=torch.tensor(points, device=device), moved=moved if path.per_position else None)


def _unit_ids(req: Request, units: list[Unit], rows: _Rows, side: str):
    """Right-padded ``[U, L]`` ids and baseline ids of the batch's units on ``side``, and their lengths."""
    examples = [req.examples[units[u].example] for u in rows.units]
    if side == "target":
        ids = [ex.target_ids[: units[u].length] for ex, u in zip(examples, rows.units, strict=True)]
        base = [ex.target_baseline[: units[u].length] for ex, u in zip(examples, rows.units, strict=True)]
    else:
        ids, base = [ex.source_ids for ex in examples], [ex.source_baseline for ex in examples]
    width = max(len(i) for i in ids)
    return _pad_stack(ids, width), _pad_stack(base, width), [len(i) for i in ids]


def _run_batch(req: Request, path: Path, layer: LayerTarget | None, units: list[Unit], counts: list[int],
               batch: list[Piece], accumulators: dict[int, _Accumulator], outputs: list,
               sums: list[torch.Tensor], clean_caches: dict, memory: Memory) -> None:
    """One forward over the batch's rows, then the backward of every step slot, several slots per batched
    (``vmap``) backward, the blocks recomputed in each backward when ``memory`` says so; results go to the
    units. ``clean_caches`` holds the KV cache of the last batch's units (sequential IG with cached prefixes:
    consecutive batches of one unit share it)."""
    adapter = req.adapter
    device = adapter.input_device
    rows = _expand(req, units, batch, path, device)
    # Positions before `prefix` are the same clean input in every row: they come from a KV cache.
    prefix = min(position for _, position in rows.moved) if _reuses_prefixes(req, path, layer) else 0
    clean_prefix = None
    sides = ["target", "source"] if adapter.is_encoder_decoder else ["target"]
    ids = {side: _unit_ids(req, units, rows, side) for side in sides}  # per unit, expanded to rows below
    inputs, leaves, multipliers, hooks = {}, {}, {}, []
    if adapter.is_encoder_decoder:
        width = ids["source"][0].shape[1]
        lengths = torch.tensor(ids["source"][2], device=device)
        inputs["source_mask"] = (torch.arange(width, device=device)[None] < lengths[:, None]).long()[rows.local]
    if layer is None:
        attributed = attributed_sides(req)
        for side in sides:
            x = adapter.embed(ids[side][0], side)[rows.local]
            if side not in attributed:
                inputs[f"{side}_embeds"] = x
                continue
            b = adapter.embed(ids[side][1], side)[rows.local]
            if path.noise_std > 0:
                x = x + torch.randn(x.shape, generator=path.generator).to(x) * path.noise_std
            if path.points is None:
                z = b + rows.alpha.view(-1, 1, 1).to(x.dtype) * (x - b)
                multipliers[side] = {"none": None, "input": x, "delta": x - b}[path.multiply]
            else:
                points = path.points(ids[side][0], ids[side][1]).to(x)  # [U, P, L, d], per unit of the batch
                following = (rows.point + 1).clamp(max=path.n_points - 1)
                z = points[rows.local, rows.point]
                multipliers[side] = points[rows.local, following] - z
            if rows.moved is not None:  # sequential IG: each row moves one token; only its gradient counts
                mask = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
                for r, (moved_side, position) in enumerate(rows.moved):
                    if moved_side == side:
                        mask[r, position] = 1.0
                z = x + mask[..., None] * (z - x)
                multipliers[side] = mask[..., None] * (x - b if multipliers[side] is None else multipliers[side])
            if prefix:
                key = tuple(rows.units)
                if key not in clean_caches:
                    clean_caches.clear()
                    clean_caches[key] = adapter.prefix_cache(adapter.embed(ids[side][0]))
                inputs["past"] = adapter.take_prefix(clean_caches[key], prefix, rows.local)
                clean_prefix = x[:, :prefix].detach()
                z = z[:, prefix:]
            inputs[f"{side}_embeds"] = leaves[side] = z.detach().requires_grad_(True)
    else:
        for side in sides:
            inputs[f"{side}_ids"] = ids[side][0][rows.local]
        acts = None
        if layer.interpolate:
            baseline_inputs = {**inputs, **{f"{side}_ids": ids[side][1][rows.local] for side in sides}}
            acts = _layer_activations(adapter, layer.modules[0], inputs, baseline_inputs)
        for i, (module, side) in enumerate(zip(layer.modules, layer.sides, strict=True)):
            hook = _layer_hook(i, side, leaves, multipliers, rows.alpha, path, acts)
            hooks.append(module.register_forward_hook(hook))

    scored = torch.zeros(len(rows.unit), max(units[u].length for u in rows.units), dtype=torch.bool, device=device)
    slot_of, entries = [], []
    for r, u in enumerate(rows.unit):
        ex = req.examples[units[u].example]
        for k, t in enumerate(units[u].steps):
            if t - 1 < prefix:  # the row's moved token comes after this step's position: zero gradient
                continue
            scored[r, t - 1] = True
            slot_of.append(k)
            entries.append((ex, t))
    model_rows = RowInputs(**inputs)
    whole_rows = model_rows  # MC dropout reruns whole rows
    if prefix:
        whole_rows = RowInputs(target_embeds=torch.cat([clean_prefix, leaves["target"]], dim=1))
    longest = max(scored.shape[1], inputs["source_mask"].shape[1] if "source_mask" in inputs else 0)
    try:
        # the backwards recompute the blocks with the attention implementation of the forward
        with torch.enable_grad(), batched_backward_attention(adapter.model, longest):
            with _recorded_head_inputs(adapter) as head_inputs, recomputed_blocks(adapter.model, memory.recompute):
                logits = adapter.forward(model_rows, scored[:, prefix:]).logits
                rerun = dropout_rerun(adapter, whole_rows, scored)
                f = check_differentiable(req.target_fn(logits, Picks.gather(entries), rerun))
            del logits
            output, entry_rows, entry_cotangents = _backward_start(f, head_inputs, scored[:, prefix:])
            del f
            if memory.recompute:  # the forward's freed transients, before the backwards allocate theirs
                release_freed_host_memory(output.device)
            slot = torch.tensor(slot_of, device=output.device)
            tokens = scored[:, prefix:].numel() + (inputs["source_mask"].numel() if "source_mask" in inputs else 0)
            names = list(leaves)  # layer methods create theirs in the forward
            for k, grads in _slot_gradients(output, entry_rows, entry_cotangents, slot, list(leaves.values()),
                                            memory.slots_per_backward(tokens)):
                if memory.recompute and k == 0:
                    release_freed_host_memory(output.device)
                step_grads = {n: None if g is None else _left_pad(g, prefix) for n, g in zip(names, grads, strict=True)}
                _accumulate(req, path, units, counts, batch, rows, k, step_grads, multipliers, accumulators, outputs,
                            sums)
    finally:
        for h in hooks:
            h.remove()
    for u in rows.units:
        if accumulators[u].remaining == 0:
            del accumulators[u]


def _slot_gradients(output: torch.Tensor, entry_rows: torch.Tensor, entry_cotangents: torch.Tensor,
                    slot: torch.Tensor, leaves: list[torch.Tensor], group: int):
    """Yield ``(slot k, [gradient of each leaf])`` for every step slot in ``slot [K]`` (the slot of each
    entry), ``group`` slots per batched (``vmap``) backward from ``output`` (see :func:`_backward_start`)."""
    first_slot, n_slots = int(slot.min()), int(slot.max()) + 1
    group = max(1, min(n_slots - first_slot, group))
    for first in range(first_slot, n_slots, group):
        slots = range(first, min(n_slots, first + group))
        cotangents = output.new_zeros((len(slots), *output.shape))
        chosen = (slot >= first) & (slot < first + len(slots))
        cotangents[slot[chosen] - first, entry_rows[chosen]] = entry_cotangents[chosen].to(output.dtype)
        with warnings.catch_warnings():  # ops without a batching rule loop over slots: still exact
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            grads = torch.autograd.grad(output, leaves, grad_outputs=cotangents,
                                        retain_graph=slots[-1] < n_slots - 1, allow_unused=True,
                                        is_grads_batched=True)
        for i, k in enumerate(slots):
            yield k, [None if g is None else g[i] for g in grads]


def _left_pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x [B, L, ...]`` with ``n`` zero positions prepended along dimension 1."""
    if not n:
        return x
    return torch.cat([x.new_zeros((x.shape[0], n, *x.shape[2:])), x], dim=1)


@contextmanager
def _recorded_head_inputs(adapter):
    """Record every input of the model's LM head (output embeddings) during the block."""
    head = adapter.model.get_output_embeddings()
    recorded: list[torch.Tensor] = []
    if head is None:
        yield recorded
        return
    handle = head.register_forward_pre_hook(lambda module, args: recorded.append(args[0]))
    try:
        yield recorded
    finally:
        handle.remove()


def _backward_start(f: torch.Tensor, head_inputs: list[torch.Tensor], scored: torch.Tensor):
    """Where the per-step backwards start: ``(output [M, *r], entry_rows [K], entry_cotangents [K, *r])``.

    Entry ``i`` of ``f [K]`` (one scored position) back-propagates ``entry_cotangents[i]`` from row
    ``entry_rows[i]`` of ``output``. When the LM head ran once, ``f_i`` depends on row ``i`` of the head's input
    only (an attributed function maps each position's logits to that position's score), so one cheap backward
    through the head gives every ``df_i/dh_i`` and the batched step backwards start from the hidden states:
    their cotangents are ``[M, d]`` instead of ``[K, V]`` over the vocabulary. Otherwise (MC dropout reruns the
    model) they start from ``f`` itself with one-hot cotangents.
    """
    if len(head_inputs) == 1 and head_inputs[0].requires_grad:
        hidden = head_inputs[0]
        positions = hidden.shape[:-1].numel()
        if positions in (len(f), scored.numel()):
            (grad,) = torch.autograd.grad(f.sum(), hidden)  # frees the head's graph, keeps the model's
            output = hidden.reshape(positions, hidden.shape[-1])
            if positions == len(f):
                rows = torch.arange(len(f), device=hidden.device)
            else:  # the model projected every position: the scored ones are the entries, in order
                rows = scored.reshape(-1).nonzero().squeeze(-1).to(hidden.device)
            return output, rows, grad.reshape(positions, -1)[rows]
    return f.reshape(-1, 1), torch.arange(len(f), device=f.device), torch.ones_like(f).reshape(-1, 1)


def _layer_activations(adapter, module: nn.Module, inputs: dict, baseline_inputs: dict):
    """Outputs of ``module`` for the input rows and for the baseline rows, without gradients."""
    captured = []
    hook = module.register_forward_hook(lambda m, i, o: captured.append(_first(o).detach()))
    try:
        with torch.no_grad():
            scored = torch.zeros(inputs["target_ids"].shape, dtype=torch.bool, device=inputs["target_ids"].device)
            adapter.forward(RowInputs(**inputs), scored)
            adapter.forward(RowInputs(**baseline_inputs), scored)
    finally:
        hook.remove()
    return captured[0], captured[1]


def _layer_hook(index: int, side: str, leaves: dict, multipliers: dict, alpha: torch.Tensor, path: Path, acts):
    key = f"{side}:{index}"

    def hook(module, args, output):
        h = _first(output)
        if acts is not None:  # integrated gradients at the layer: replace the output by a path point
            hx, hb = acts
            z = (hb + alpha.view(-1, *[1] * (hb.dim() - 1)).to(hb) * (hx - hb)).requires_grad_(True)
            leaves[key] = z
            multipliers[key] = {"none": None, "input": hx, "delta": hx - hb}[path.multiply]
            return _replace_first(output, z)
        z = torch.zeros_like(h, requires_grad=True)  # d f / d z == d f / d h along every path
        leaves[key] = z
        multipliers[key] = None if path.multiply == "none" else h.detach()
        return _replace_first(output, h + z)

    return hook


def _accumulate(req: Request, path: Path, units: list[Unit], counts: list[int], batch: list[Piece], rows: _Rows,
                slot: int, grads: dict, multipliers: dict, accumulators: dict[int, _Accumulator], outputs: list,
                sums: list[torch.Tensor]) -> None:
    """Fold the gradients of step ``slot`` of every row into its unit; finish units whose points all ran."""
    for u in rows.units:
        if u not in accumulators:
            accumulators[u] = _Accumulator(remaining=counts[u], steps=[{} for _ in units[u].steps])
    for key, grad in grads.items():
        if grad is None:
            continue
        # accumulate in float32 whatever the model dtype: IG sums many small terms
        contrib = grad.float() if multipliers[key] is None else grad.float() * multipliers[key].float()
        contrib = contrib * rows.weight.view(-1, *[1] * (contrib.dim() - 1)).to(contrib)
        summed = contrib.new_zeros((len(rows.units), *contrib.shape[1:]))
        summed.index_add_(0, rows.local.to(contrib.device), contrib)
        for i, u in enumerate(rows.units):
            if slot < len(units[u].steps):
                store = accumulators[u].steps[slot]
                store[key] = summed[i] if key not in store else store[key] + summed[i]

    if slot < max(len(units[u].steps) for u in rows.units) - 1:
        return
    for piece in batch:
        acc = accumulators[piece.unit]
        acc.remaining -= len(piece.points)
        if acc.remaining == 0:
            _finish_unit(req, path, units[piece.unit], acc, outputs, sums)


def _finish_unit(req: Request, path: Path, unit: Unit, acc: _Accumulator, outputs: list,
                 sums: list[torch.Tensor]) -> None:
    """Reduce each finished step to token level: ``[n]`` (or ``[n, layers]`` for several layers)."""
    ex = req.examples[unit.example]
    source_out, target_out = outputs[unit.example]
    for k, t in enumerate(unit.steps):
        for side, out in (("target", target_out), ("source", source_out)):
            keys = sorted((key for key in acc.steps[k] if key.split(":")[0] == side),
                          key=lambda key: int(key.split(":")[1]) if ":" in key else 0)
            if not keys or out is None:
                continue
            n_valid = t if side == "target" else len(ex.source_ids)
            values = [acc.steps[k][key][:n_valid] for key in keys]
            value = values[0] if len(values) == 1 else torch.stack(values, dim=-2)  # [n, (layers,) d]
            if path.absolute:
                value = value.abs()
            out[:n_valid, t - ex.start] = reduce_hidden(value, req.hidden_reduction).float().cpu()
            sums[unit.example][t - ex.start] += float(value.sum())


def _convergence_deltas(req: Request, sums: list[torch.Tensor]) -> list[torch.Tensor]:
    """``sum(attributions) - (f(x) - f(b))`` per step, from one no-grad forward each of input and baseline
    (the decoder input stays ``x`` where the target is not attributed)."""
    interpolated_target = "target" in attributed_sides(req)
    deltas = []
    with torch.no_grad():
        for ex, total in zip(req.examples, sums, strict=True):
            f_x = _score_steps(req, ex, ex.target_ids, ex.source_ids)
            f_b = _score_steps(req, ex, ex.target_baseline if interpolated_target else ex.target_ids,
                               ex.source_baseline)
            deltas.append(total - (f_x - f_b).cpu().float())
    return deltas


def _score_steps(req: Request, ex: Example, target_ids: torch.Tensor, source_ids: torch.Tensor | None):
    """Attributed function at every step of ``ex`` for the given (possibly baseline) token ids."""
    steps = torch.arange(ex.start - 1, ex.end - 1)
    rows, scored = id_rows(req.adapter, [(target_ids[: ex.end - 1], source_ids, steps)])
    logits = req.adapter.forward(rows, scored).logits
    return req.target_fn(logits, Picks.gather([(ex, t) for t in range(ex.start, ex.end)]), None)
