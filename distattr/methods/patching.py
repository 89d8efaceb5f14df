r"""Activation patching (causal tracing), batched as rows; attribution patching is in :mod:`distattr.methods.atp`.

Definitions (Meng, Bau, Andonian & Belinkov, NeurIPS 2022, "Locating and Editing Factual Associations in GPT",
``kmeng01/rome`` ``experiments/causal_trace.py``; Vig et al. 2020; Heimersheim & Nanda 2024). Three runs of the
example's sequence ``x`` (positions ``0 .. end-2``, the ones the attributed steps read):

* the **clean** run on ``x``;
* the **corrupted** run on ``x~``: either the example's contrastive sequence (``contrast_targets``, same token
  length, ``corruption="contrast"``) or ROME's noise: the input embeddings of the positions ``corrupt_span =
  (a, b)`` plus ``eps ~ N(0, sigma^2)``, ``sigma = noise_scale * std(E)`` (``E`` the scaled input-embedding table,
  the std over all its entries; ``noise_scale = 3`` as ROME), ``noise_samples`` draws ``k`` from a generator
  seeded with ``seed`` (the same draws for every example of the same length: results do not depend on batching,
  workers or example order);
* the **restored** run ``(l, p)``: the corrupted run with the output of ``component`` at position ``p`` of the layers
  ``W(l) = [max(0, l - window // 2), min(L, l - (-window // 2)))`` (ROME's window, centred; ``window=1``: layer
  ``l`` only) replaced by its clean value.

With ``m_t`` the attributed function at step ``t`` (default: the probability of the target token; any step
function via ``attributed_fn``), the score of position ``p``, step ``t``, layer ``l`` is ROME's *indirect effect*::

    target[p, t, l] = 1/K sum_k [ m_t(restored_k(l, p)) - m_t(corrupted_k) ]

(``K`` = ``noise_samples``, 1 for a contrast: the mean of the metric over the noise draws, as ROME averages the
probability). ``deltas[t] = m_t(clean) - 1/K sum_k m_t(corrupted_k)`` is the *total effect*; the clean metric is the
step score of the same function (``step_scores=["probability"]``), the corrupted one ``clean - deltas``, and
``corrupted + target`` the restored metric ROME plots.

Components (:data:`COMPONENTS`): ``"residual"`` (the block's output, the residual stream after layer ``l``),
``"mlp"`` / ``"attn"`` (what the block's MLP / attention adds to the residual stream), ``"query"`` / ``"key"`` /
``"value"`` (the attention's projections at position ``p``, all heads; for :mod:`atp`'s QK fix).

Result: ``target [N, T, L]`` (``extra_dims=("layer",)``, labels ``"0" .. "L-1"``, the window's centre ``l``).
Positions ``p >= t`` cannot change step ``t`` (causal decoder): NaN, as every method's future tokens. Positions
before the first corrupted one (``a`` for noise, the first token where the contrast differs) have the same clean
and corrupted values: their restorations change nothing and are not run; their score is 0. Decoder-only models.

Rows (DESIGN.md, "Patching is rows too"). Restoring ``(l, p)`` changes nothing below layer ``min W(l)`` nor
before position ``p``. The corrupted run keeps every block's input ``[K, n, d]`` and its KV cache; a restoration row
starts at block ``s = min W(l)`` (the residual stream: ``s + 1``, its input being the corrupted block output with
position ``p`` restored) from a copy of the cached corrupted hidden states, and computes only positions ``p .. n-1``
after the corrupted KV cache of the positions before ``p``: ``(L - s)(n - p)`` of a full forward's ``L n``
token-layers, no lower layer re-run, the LM head only where a step is read. The rows of one position (every layer x
noise draw, up to ``inference_token_budget`` tokens per batch) run block by block: at block ``m`` the rows whose
start is ``<= m`` go through it together, a row joining at its start block, so no row computes a block or a position
it does not need. (Blocks are called with the arguments the model itself passed them in a one-row forward of the
same positions, the KV cache replaced by the rows' cached keys and values; the final norm and LM head are checked
against the model's logits. A model where that does not hold runs the same rows through its own forward instead,
grouped by start block, blocks below skipped: exact too, with more padding.) Per sample, ROME's loop costs ``L n``
full forwards of ``n`` positions; these rows cost about ``L^2 n^2 / 4`` token-layers, ``4x`` fewer, before the
positions ahead of the corruption (skipped) and the LM head (one position).

Choosing the subject span: ``corrupt_span`` counts tokens of the full sequence (BOS included). ROME corrupts the
subject's tokens; :func:`subject_span` finds them from the character offsets of a fast tokenizer
(``subject_span(tokenizer, prompt, "Vinson Massif") -> (1, 4)``). ``corrupt_span=None`` corrupts the whole prompt
(positions ``0 .. start-1``). One call has one span: for per-example spans use :func:`trace` per example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..models.adapters import RowInputs, attention_projection, block_part, block_stack
from .base import Example, MethodOutput, Picks, Request, repeat_picks

COMPONENTS = ("residual", "mlp", "attn", "query", "key", "value")
CORRUPTIONS = ("auto", "noise", "contrast")


@dataclass(frozen=True)
class PatchingArgs:
    """Arguments of ``activation_patching`` and ``attribution_patching`` (definitions in
    :mod:`distattr.methods.patching`).

    ``component``: ``"residual"`` (block output), ``"mlp"``, ``"attn"`` (their outputs), ``"query"``, ``"key"``,
    ``"value"`` (attention projections); ``window``: layers restored together, centred (ROME: 10 for mlp/attn);
    ``corruption``: ``"noise"`` (Gaussian noise on ``corrupt_span``), ``"contrast"`` (run ``contrast_targets``,
    same token length) or ``"auto"`` (contrast when the example has one, else noise); ``corrupt_span``:
    ``(start, end)`` token positions noised (None: the whole prompt); ``noise_scale``: noise std in units of the
    embedding table's std (ROME: 3); ``noise_samples``: noise draws averaged (ROME: 10); ``seed``: of the draws.
    """

    component: str = "residual"
    window: int = 1
    corruption: str = "auto"
    corrupt_span: tuple[int, ...] | None = None
    noise_scale: float = 3.0
    noise_samples: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.component not in COMPONENTS:
            raise ValueError(f"component must be one of {', '.join(COMPONENTS)}, not {self.component!r}")
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {', '.join(CORRUPTIONS)}, not {self.corruption!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive integer (layers restored together), not {self.window!r}")
        if self.corrupt_span is not None:
            span = tuple(self.corrupt_span)
            if len(span) != 2 or not 0 <= span[0] < span[1]:
                raise ValueError(f"corrupt_span must be two token positions (start, end) with 0 <= start < end, not "
                                 f"{self.corrupt_span!r}")
        if not self.noise_scale >= 0:
            raise ValueError(f"noise_scale must be >= 0, not {self.noise_scale!r}")
        if not isinstance(self.noise_samples, int) or self.noise_samples < 1:
            raise ValueError(f"noise_samples must be a positive integer, not {self.noise_samples!r}")


# ---------------------------------------------------------------- where components live


@dataclass(frozen=True)
class Site:
    """Where ``component`` is read and restored: ``modules[l]`` (block ``l`` itself for the residual stream),
    whose output (first element of a tuple) holds it in ``channels`` of its last dimension (None: all)."""

    component: str
    blocks: nn.ModuleList
    modules: tuple[nn.Module, ...]
    channels: slice | None

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.channels is None else x[..., self.channels]


def component_site(model: nn.Module, component: str) -> Site:
    """The modules holding ``component`` in every block of ``model`` (see :class:`Site`)."""
    blocks = block_stack(model)
    if component == "residual":
        return Site(component, blocks, tuple(blocks), None)
    if component in ("mlp", "attn"):
        return Site(component, blocks, tuple(block_part(b, component) for b in blocks), None)
    found = [attention_projection(b, component) for b in blocks]
    return Site(component, blocks, tuple(m for m, _ in found), found[0][1])


def windows(n_layers: int, window: int) -> list[tuple[int, int]]:
    """ROME's layer windows: ``[max(0, l - window // 2), min(L, l - (-window // 2)))`` for each centre ``l``."""
    return [(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))) for layer in range(n_layers)]


def check_decoder_only(req: Request, method: str) -> None:
    if req.adapter.is_encoder_decoder:
        raise ValueError(f"{method} is implemented for decoder-only models (Llama, GPT-2, ...); this model is an "
                         "encoder-decoder")


def _first(output):
    return output[0] if isinstance(output, tuple | list) else output


def _with_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple | list) else value


@contextmanager
def capture(modules: Sequence[nn.Module], select: Callable[[torch.Tensor], torch.Tensor]
            ) -> Iterator[list[torch.Tensor | None]]:
    """Record (detached) ``select`` of each module's output while the block runs: ``captured[i]``."""
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def hook(index: int):
        def record(module, args, output):
            captured[index] = select(_first(output)).detach()

        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_inputs(blocks: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Record the hidden-state input ``[B, L, d]`` of every block while the block runs."""
    captured: list[torch.Tensor | None] = [None] * len(blocks)

    def hook(index: int):
        def record(module, args, kwargs):
            captured[index] = (args[0] if args else kwargs["hidden_states"]).detach()

        return record

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- corruption


@dataclass(frozen=True)
class Corrupted:
    """The corrupted input of one example: scaled input embeddings ``embeds [K, n, d]`` (``K`` noise draws, 1
    for a contrast) and the first position where they differ from the clean ones (``n``: nowhere)."""

    embeds: torch.Tensor
    first: int
    kind: str


_TABLE_STD: dict[tuple, float] = {}  # (id, data pointer, version, shape) of an embedding table -> its std


def noise_std(adapter, args: PatchingArgs) -> float:
    """``noise_scale`` x the standard deviation of the (scaled) input-embedding table over all its entries."""
    weight = adapter.embedding.weight
    key = (id(weight), weight.data_ptr(), weight._version, tuple(weight.shape))
    if key not in _TABLE_STD:
        if len(_TABLE_STD) > 8:
            _TABLE_STD.clear()
        _TABLE_STD[key] = float(weight.detach().float().std())
    return args.noise_scale * _TABLE_STD[key] * adapter.embed_scale


def corrupt(adapter, ex: Example, args: PatchingArgs, sigma: float) -> Corrupted:
    """The corrupted input of ``ex`` (see the module docstring); one-line errors for a contrast of another length or
    a span outside the sequence."""
    n = ex.end - 1
    ids = ex.target_ids[:n]
    kind = args.corruption
    if kind == "auto":
        kind = "contrast" if ex.contrast_ids is not None else "noise"
    if kind == "contrast":
        if ex.contrast_ids is None:
            raise ValueError("corruption='contrast' needs a contrastive sequence per input (contrast_targets, or "
                             "--contrast-field in dataset jobs)")
        if len(ex.contrast_ids) != len(ex.target_ids):
            raise ValueError(f"activation patching needs a contrast of the same token length: the contrast has "
                             f"{len(ex.contrast_ids)} tokens, the input {len(ex.target_ids)}")
        other = ex.contrast_ids[:n].to(ids.device)
        differs = (other != ids).nonzero()
        first = int(differs[0]) if len(differs) else n
        return Corrupted(adapter.embed(other)[None], first, kind)
    a, b = tuple(args.corrupt_span) if args.corrupt_span is not None else (0, ex.start)
    if b > n:
        raise ValueError(f"corrupt_span ({a}, {b}) ends after the last position the attributed steps read ({n - 1}; "
                         f"the sequence has {len(ex.target_ids)} tokens)")
    clean = adapter.embed(ids)
    embeds = clean[None].repeat(args.noise_samples, 1, 1)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.noise_samples, b - a, clean.shape[-1]), generator=generator) * sigma
    embeds[:, a:b] += noise.to(embeds)
    return Corrupted(embeds, a, kind)


# ---------------------------------------------------------------- clean and corrupted runs


@dataclass(frozen=True)
class Runs:
    """The clean and corrupted runs of one example.

    ``clean_acts[l]``: the component at layer ``l`` in the clean run, ``[n, c]``; ``clean_out[l]``: block ``l``'s
    clean output ``[n, d]``; ``corrupted_in[l]``: block ``l``'s input in the corrupted runs ``[K, n, d]``;
    ``cache``: their KV cache; ``clean_metric [T]``, ``corrupted_metric [K, T]``.
    """

    clean_acts: list[torch.Tensor]
    clean_out: list[torch.Tensor]
    corrupted_in: list[torch.Tensor]
    cache: object
    clean_metric: torch.Tensor
    corrupted_metric: torch.Tensor


def step_picks(ex: Example) -> tuple[Picks, torch.Tensor]:
    """The picks of every attributed step of ``ex`` and the positions ``[T]`` their logits are read at."""
    return Picks.gather([(ex, t) for t in range(ex.start, ex.end)]), torch.arange(ex.start - 1, ex.end - 1)


def scored_mask(rows: int, n: int, positions: torch.Tensor, device) -> torch.Tensor:
    scored = torch.zeros(rows, n, dtype=torch.bool, device=device)
    scored[:, positions.to(device)] = True
    return scored


def clean_and_corrupted(req: Request, site: Site, ex: Example, corrupted: Corrupted) -> Runs:
    """Run the clean sequence (recording the component at every layer and every block's output) and the corrupted
    rows (recording every block's input and the KV cache); no gradients."""
    adapter = req.adapter
    n = ex.end - 1
    picks, positions = step_picks(ex)
    device = adapter.input_device
    with torch.no_grad():
        clean_rows = RowInputs(target_embeds=adapter.embed(ex.target_ids[None, :n]))
        with capture(site.modules, site.select) as acts, capture(site.blocks, lambda x: x) as outs:
            logits = adapter.forward(clean_rows, scored_mask(1, n, positions, device)).logits
        clean_metric = req.target_fn(logits, picks, None).float()
        k = len(corrupted.embeds)
        with capture_inputs(site.blocks) as inputs:
            out, cache = adapter.forward_cached(RowInputs(target_embeds=corrupted.embeds),
                                                scored_mask(k, n, positions, device))
        corrupted_metric = req.target_fn(out.logits, repeat_picks(picks, k), None).float().view(k, -1)
    return Runs([a[0] for a in acts], [o[0] for o in outs], list(inputs), cache, clean_metric, corrupted_metric)


# ---------------------------------------------------------------- activation patching


@dataclass(frozen=True)
class _Restoration:
    """Restore the component at position ``position`` of the layers ``[first, last)`` (window of centre ``layer``)."""

    layer: int
    position: int
    first: int
    last: int


def _start_block(site: Site, r: _Restoration) -> int:
    """The first block a restoration row runs: the window's first layer; for the residual stream the next one (its
    input is the restored output), unless the window's first layer is the last."""
    if site.component == "residual" and r.first + 1 < site.n_layers:
        return r.first + 1
    return r.first


@contextmanager
def start_at(blocks: nn.ModuleList, start: int, hidden: torch.Tensor):
    """Within the block, a model forward skips blocks ``0 .. start-1`` (they hand their input on untouched) and block
    ``start`` takes ``hidden`` as its input: the rows continue from cached hidden states at block ``start``. The
    embeddings, masks and position embeddings are still computed by the model for the rows' positions."""

    def skip(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def feed(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    saved = [b.__dict__.get("forward") for b in blocks[:start]]
    for b in blocks[:start]:
        b.forward = skip
    handle = blocks[start].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for b, forward in zip(blocks[:start], saved, strict=True):
            if forward is None:
                del b.forward
            else:
                b.forward = forward


@contextmanager
def restoring(site: Site, layer_rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Within the block, the output of ``site.modules[l]`` at ``(rows, positions)`` is replaced by ``values [R, c]``
    for ``layer_rows[l] = (rows, positions, values)`` (in ``site.channels``)."""

    def hook(layer: int):
        rows, positions, values = layer_rows[layer]

        def replace(module, args, output):
            h = _first(output).clone()
            where = (rows.to(h.device), positions.to(h.device))
            if site.channels is None:
                h[where] = values.to(h)
            else:
                h[(*where, site.channels)] = values.to(h)
            return _with_first(output, h)

        return replace

    handles = [site.modules[layer].register_forward_hook(hook(layer)) for layer in sorted(layer_rows)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def activation_patching(req: Request, args: PatchingArgs) -> list[MethodOutput]:
    """Run activation patching over ``req.examples`` (see the module docstring for the definitions).

    Returns one :class:`MethodOutput` per example: ``target [N, T, L]`` indirect effects (``extra_dims=("layer",)``),
    ``deltas [T]`` total effects.
    """
    check_decoder_only(req, "activation_patching")
    if not req.adapter.caches_prefixes:
        raise ValueError("activation_patching needs a model that can continue rows after a KV cache (local blocks)")
    site = component_site(req.adapter.model, args.component)
    sigma = noise_std(req.adapter, args)
    outputs = []
    for ex in req.examples:
        outputs.append(_patch_example(req, site, args, sigma, ex))
        if req.on_progress is not None:
            req.on_progress(ex.n_steps, (ex.end - 1) ** 2 * site.n_layers)
    return outputs


def layer_labels(site: Site) -> tuple[tuple[str, ...]]:
    return (tuple(str(layer) for layer in range(site.n_layers)),)


def finish(ex: Example, first: int, values: torch.Tensor, n_layers: int) -> torch.Tensor:
    """``target [N, T, L]`` from scores ``values [n, T, L]`` of positions ``0 .. n-1``: positions before ``first`` 0,
    positions ``>= t`` (future of step ``t``) NaN."""
    target = torch.full((len(ex.target_ids), ex.n_steps, n_layers), float("nan"))
    target[: len(values)] = values.float().cpu()
    target[:first] = 0.0
    steps = torch.arange(ex.start, ex.end)
    future = torch.arange(len(ex.target_ids)).view(-1, 1) >= steps.view(1, -1)
    target[future] = float("nan")
    return target


def _patch_example(req: Request, site: Site, args: PatchingArgs, sigma: float, ex: Example) -> MethodOutput:
    adapter = req.adapter
    n, n_layers = ex.end - 1, site.n_layers
    corrupted = corrupt(adapter, ex, args, sigma)
    runs = clean_and_corrupted(req, site, ex, corrupted)
    k = len(corrupted.embeds)
    sums = torch.zeros(n, ex.n_steps, n_layers, dtype=torch.float64)
    wins = windows(n_layers, args.window)
    if not (LAYER_ROWS and _layer_rows(req, site, ex, runs, wins, k, corrupted.first, sums)):
        sums.zero_()
        _by_start_block(req, site, ex, runs, wins, k, corrupted.first, sums)
    deltas = runs.clean_metric.cpu() - runs.corrupted_metric.mean(0).cpu()
    return MethodOutput(source=None, target=finish(ex, corrupted.first, sums, n_layers), deltas=deltas.float(),
                        extra_dims=("layer",), extra_labels=layer_labels(site))


def _by_start_block(req: Request, site: Site, ex: Example, runs: Runs, wins: list[tuple[int, int]], k: int,
                    first: int, sums: torch.Tensor) -> None:
    """All restorations of ``ex`` through the model's own forward: grouped by start block (the blocks below skipped),
    positions ascending, batches of rows sharing the corrupted KV cache of the batch's first position."""
    n = ex.end - 1
    by_start: dict[int, list[_Restoration]] = {}
    for layer, (a, b) in enumerate(wins):
        for p in range(first, n):
            r = _Restoration(layer, p, a, b)
            by_start.setdefault(_start_block(site, r), []).append(r)
    budget = req.inference_token_budget
    for start, group in sorted(by_start.items()):
        group.sort(key=lambda r: r.position)
        i = 0
        while i < len(group):
            g = group[i].position  # positions before g come from the corrupted KV cache
            last = i + 1
            while last < len(group) and (last - i + 1) * k * (n - g) <= budget:
                last += 1
            _restore_batch(req, site, ex, runs, start, group[i:last], k, sums)
            i = last


def _restore_batch(req: Request, site: Site, ex: Example, runs: Runs, start: int, batch: list[_Restoration],
                   k: int, sums: torch.Tensor) -> None:
    """One forward of ``len(batch) x k`` rows (restoration x noise draw), all starting at block ``start`` and position
    ``g = batch[0].position``; adds their indirect effects / k into ``sums [n, T, L]``."""
    adapter = req.adapter
    device = adapter.input_device
    n, g = ex.end - 1, batch[0].position
    width = n - g
    rows = len(batch) * k
    sample = torch.arange(k, device=device).repeat(len(batch))  # row -> noise draw
    owner = torch.arange(len(batch)).repeat_interleave(k)  # row -> restoration
    hidden = runs.corrupted_in[start][sample.to(runs.corrupted_in[start].device), g:].clone()
    layer_rows: dict[int, tuple[list[int], list[int]]] = {}
    scored = torch.zeros(rows, width, dtype=torch.bool, device=device)
    entries, where = [], []
    for b, r in enumerate(batch):
        first_hooked = r.first
        if start == r.first + 1:  # residual stream: the restored output of the window's first layer is the input
            hidden[b * k : (b + 1) * k, r.position - g] = runs.clean_out[r.first][r.position]
            first_hooked = r.first + 1
        for layer in range(first_hooked, r.last):
            rows_of, positions = layer_rows.setdefault(layer, ([], []))
            rows_of += range(b * k, (b + 1) * k)
            positions += [r.position - g] * k
        for t in range(max(r.position, ex.start - 1) + 1, ex.end):
            scored[b * k : (b + 1) * k, t - 1 - g] = True
    for row in range(rows):  # entries in the order of the scored logits: row-major, positions ascending
        r = batch[int(owner[row])]
        for t in range(max(r.position, ex.start - 1) + 1, ex.end):
            entries.append((ex, t))
            where.append((r.position, t - ex.start, r.layer, int(sample[row])))
    if not entries:
        return
    replace = {}
    for layer, (rows_of, positions) in layer_rows.items():
        rows_t = torch.tensor(rows_of, device=device)
        positions_t = torch.tensor(positions, device=device)
        values = runs.clean_acts[layer][positions_t + g]
        replace[layer] = (rows_t, positions_t, values)
    ids = ex.target_ids[g:n].to(device).repeat(rows, 1)
    past = adapter.take_prefix(runs.cache, g, sample) if g else None
    with torch.no_grad(), start_at(site.blocks, start, hidden), restoring(site, replace):
        logits = adapter.forward(RowInputs(target_ids=ids, past=past), scored).logits
        values = req.target_fn(logits, Picks.gather(entries), None).double().cpu()
    index = torch.tensor(where)
    corrupted = runs.corrupted_metric.double().cpu()[index[:, 3], index[:, 1]]
    sums.index_put_((index[:, 0], index[:, 1], index[:, 2]), (values - corrupted) / k, accumulate=True)


# ---------------------------------------------------------------- layer-synchronous rows (the fast path)

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "ln_out")
LAYER_ROWS = True  # run restorations block by block (False: the model forward per start block; tests compare both)


class PastKV:
    """Stands in for a model's KV cache in one block call: ``update`` (all a decoder attention asks of its cache)
    returns the rows' cached keys and values of the earlier positions followed by the new ones."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return (torch.cat([self.keys.to(key_states), key_states], dim=-2),
                torch.cat([self.values.to(value_states), value_states], dim=-2))


@dataclass(frozen=True)
class BlockCall:
    """A block's call in a model forward: its arguments (the hidden states first, or ``hidden_states=``)."""

    args: tuple
    kwargs: dict


def _for_rows(value, rows: int, past: PastKV | None):
    """A block call argument for ``rows`` rows: batch-size-1 tensors (masks, position embeddings) expanded, the KV
    cache replaced by ``past``."""
    from transformers.cache_utils import Cache

    if isinstance(value, Cache):
        return past
    if isinstance(value, torch.Tensor):
        return value.expand(rows, *value.shape[1:]) if value.dim() >= 2 and value.shape[0] == 1 else value
    if isinstance(value, tuple | list):
        return type(value)(_for_rows(v, rows, past) for v in value)
    if isinstance(value, dict):
        return {k: _for_rows(v, rows, past) for k, v in value.items()}
    return value


def call_block(block: nn.Module, call: BlockCall, hidden: torch.Tensor, past: PastKV | None) -> torch.Tensor:
    """Run ``block`` as in ``call`` on ``hidden [R, w, d]`` after the cached positions ``past``."""
    rows = hidden.shape[0]
    if call.args:
        out = block(hidden, *_for_rows(call.args[1:], rows, past), **_for_rows(call.kwargs, rows, past))
    else:
        out = block(**{**_for_rows(call.kwargs, rows, past), "hidden_states": hidden})
    return _first(out)


def block_calls(adapter, blocks: nn.ModuleList, ids: torch.Tensor, past, scored: torch.Tensor
                ) -> tuple[list[BlockCall], torch.Tensor, torch.Tensor]:
    """One forward of ``ids [1, w]`` after ``past``, recording every block's call: ``(calls, last block output
    [1, w, d], logits at scored [K, V])``."""
    calls: list[BlockCall] = []
    last: list[torch.Tensor] = []

    def record(module, args, kwargs):
        calls.append(BlockCall(args, kwargs))

    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(lambda m, a, o: last.append(_first(o))))
    try:
        with torch.no_grad():
            logits = adapter.forward(RowInputs(target_ids=ids, past=past), scored).logits
    finally:
        for h in handles:
            h.remove()
    return calls, last[0], logits


def find_head(model: nn.Module, blocks: nn.ModuleList, last: torch.Tensor, logits: torch.Tensor
              ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``h [.., d] -> logits`` from the last block's output (final norm, then the LM head), checked against the
    model's own ``logits`` of ``last``; None when no candidate (:data:`FINAL_NORM_NAMES` of the block stack's owner,
    or none) reproduces them (e.g. logit soft-capping or scaling)."""
    head = model.get_output_embeddings()
    owner = next((m for m in model.modules() if any(c is blocks for c in m.children())), None)
    if head is None or owner is None:
        return None
    norms = [None] + [getattr(owner, name) for name in FINAL_NORM_NAMES if isinstance(getattr(owner, name, None),
                                                                                       nn.Module)]
    scale = float(logits.abs().max()) if logits.numel() else 1.0
    for norm in norms:
        def fn(h: torch.Tensor, norm=norm) -> torch.Tensor:
            return head(norm(h) if norm is not None else h)

        with torch.no_grad():
            got = fn(last).to(logits.device)
        if got.shape == logits.shape and torch.allclose(got.float(), logits.float(), rtol=1e-4,
                                                        atol=1e-5 * max(scale, 1.0)):
            return fn
    return None


def _layer_rows(req: Request, site: Site, ex: Example, runs: Runs, wins: list[tuple[int, int]], k: int,
                first: int, sums: torch.Tensor) -> bool:
    """All restorations of ``ex``, position by position: the rows of position ``p`` (every layer x noise draw) run
    block by block from their start block, after the corrupted KV cache of positions ``< p``; a row joins at its
    start block (see the module docstring). Adds indirect effects / k into ``sums``. False (nothing done) when the
    model's blocks or head do not fit this path."""
    adapter = req.adapter
    cache = runs.cache
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") for layer in layers):
        return False
    n, n_layers = ex.end - 1, site.n_layers
    device = adapter.input_device
    order = sorted(range(n_layers), key=lambda layer: _start_block(site, _Restoration(layer, 0, *wins[layer])))
    head = None
    for p in range(first, n):
        steps = [t for t in range(max(p, ex.start - 1) + 1, ex.end)]
        if not steps:
            continue
        w = n - p
        local = torch.tensor([t - 1 - p for t in steps], device=device)
        scored = torch.zeros(1, w, dtype=torch.bool, device=device)
        scored[0, local] = True
        past = adapter.take_prefix(cache, p, torch.zeros(1, dtype=torch.long, device=device)) if p else None
        calls, last, logits = block_calls(adapter, site.blocks, ex.target_ids[None, p:n].to(device), past, scored)
        if len(calls) != n_layers:
            return False
        if head is None:
            head = find_head(adapter.model, site.blocks, last[0, local], logits)
            if head is None:
                return False
        picks = Picks.gather([(ex, t) for t in steps])
        per_chunk = max(1, req.inference_token_budget // (w * k)) * k
        rows = [(layer, j) for layer in order for j in range(k)]
        for c in range(0, len(rows), per_chunk):
            _run_rows(req, site, ex, runs, wins, rows[c: c + per_chunk], p, calls, head, picks, local, k, sums)
    return True


def _run_rows(req: Request, site: Site, ex: Example, runs: Runs, wins: list[tuple[int, int]],
              rows: list[tuple[int, int]], p: int, calls: list[BlockCall], head, picks: Picks, local: torch.Tensor,
              k: int, sums: torch.Tensor) -> None:
    """Rows ``(layer, noise draw)`` restoring position ``p``, sorted by start block, run block by block."""
    n, n_layers = ex.end - 1, site.n_layers
    device = runs.corrupted_in[0].device
    restorations = [_Restoration(layer, p, *wins[layer]) for layer, _ in rows]
    starts = [_start_block(site, r) for r in restorations]
    sample = torch.tensor([j for _, j in rows], device=device)
    hidden = runs.corrupted_in[0].new_empty((len(rows), n - p, runs.corrupted_in[0].shape[-1]))
    layer_keys = [layer.keys for layer in runs.cache.layers]
    layer_values = [layer.values for layer in runs.cache.layers]
    active = 0
    with torch.no_grad():
        for m in range(starts[0], n_layers):
            joined = active
            while active < len(rows) and starts[active] <= m:
                active += 1
            if joined < active:  # rows starting here: the corrupted input of block m (residual: restored at p)
                source = runs.corrupted_in[m]
                hidden[joined:active] = source[sample[joined:active].to(source.device), p:].to(hidden)
                for r in range(joined, active):
                    if starts[r] == restorations[r].first + 1:
                        hidden[r, 0] = runs.clean_out[restorations[r].first][p]
            restored = [r for r in range(active) if restorations[r].first <= m < restorations[r].last
                        and not (m == restorations[r].first and starts[r] == m + 1)]
            replace = {}
            if restored:
                value = runs.clean_acts[m][p]
                replace[m] = (torch.tensor(restored, device=device), torch.zeros(len(restored), dtype=torch.long,
                                                                                 device=device),
                              value.expand(len(restored), *value.shape))
            rows_kv = sample[:active].to(layer_keys[m].device)
            past = PastKV(layer_keys[m][rows_kv, :, :p], layer_values[m][rows_kv, :, :p]) if p else None
            with restoring(site, replace):
                hidden[:active] = call_block(site.blocks[m], calls[m], hidden[:active], past)
        logits = head(hidden[:, local].reshape(-1, hidden.shape[-1]))
        values = req.target_fn(logits, repeat_picks(picks, len(rows)), None).double().cpu().view(len(rows), -1)
    steps = (local + p + 1 - ex.start).cpu()
    corrupted = runs.corrupted_metric.double().cpu()[sample.cpu()][:, steps]  # [rows, steps]
    layer_index = torch.tensor([layer for layer, _ in rows])
    for i, step in enumerate(steps.tolist()):
        sums[p, step].index_add_(0, layer_index, (values[:, i] - corrupted[:, i]) / k)


# ---------------------------------------------------------------- causal tracing helper


def subject_span(tokenizer, prompt: str, subject: str, add_special_tokens: bool = True) -> tuple[int, int]:
    """Token positions ``(start, end)`` of the first occurrence of ``subject`` in ``prompt`` as ``tokenizer`` encodes
    it (special tokens included, as distattr encodes prompts): every token overlapping the subject's characters.
    Needs a fast tokenizer (character offsets)."""
    at = prompt.find(subject)
    if at < 0:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < at + len(subject) and b > at]
    if not inside:
        raise ValueError(f"no token of {prompt!r} covers the subject {subject!r}")
    return inside[0], inside[-1] + 1


@dataclass(frozen=True)
class Trace:
    """One causal trace: ``scores [L, P]`` indirect effects of restoring each (layer, prompt position); ``clean`` and
    ``corrupted``: the metric of the clean and the corrupted run; ``tokens``: the ``P`` prompt tokens; ``target_id``:
    the token measured."""

    scores: np.ndarray
    clean: float
    corrupted: float
    tokens: tuple[str, ...]
    target_id: int

    @property
    def restored(self) -> np.ndarray:
        """The metric of each restored run (what ROME plots): ``corrupted + scores``."""
        return self.corrupted + self.scores


def trace(model, prompt: str, target: str | int, subject_span: tuple[int, int] | None = None, *,
          component: str = "residual", window: int = 1, samples: int = 10, seed: int = 0, noise_scale: float = 3.0,
          contrast: str | None = None, attributed_fn: str = "probability", token_budget: int | None = None) -> Trace:
    """ROME's causal trace of one prompt, computed by ``activation_patching``.

    Args:
        model: a :class:`distattr.AttributionModel` (``distattr.load_model(...)``) of a decoder-only LM.
        prompt: the prompt text.
        target: the answer: a text (its first token is measured, e.g. ``" Paris"``) or a token id.
        subject_span: token positions ``(start, end)`` of the prompt (BOS included) to noise (:func:`subject_span`
            finds a subject's); None: the whole prompt. Not used with ``contrast``.
        component, window: see :class:`PatchingArgs` (ROME: ``"residual"`` with 1, ``"mlp"``/``"attn"`` with 10).
        samples, seed, noise_scale: the noise (ROME: 10 samples, 3 x the embedding std).
        contrast: a contrastive prompt with as many tokens as ``prompt``, run as the corrupted input instead of noise.
        attributed_fn: the metric, a step function (default: probability of the target token).
        token_budget: tokens per batch (None: distattr's default for the model).
    Returns:
        :class:`Trace`: ``scores [layers, prompt positions]``, the clean and corrupted metric, the prompt tokens.
    """
    tokenizer = model.tokenizer
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    answer = [int(target)] if isinstance(target, int) else \
        list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not answer:
        raise ValueError(f"target {target!r} has no tokens")
    method_args = {"component": component, "window": window, "noise_samples": samples, "seed": seed,
                   "noise_scale": noise_scale, "corruption": "noise" if contrast is None else "contrast"}
    kwargs = {"attr_pos_end": len(prompt_ids) + 1}  # the first answer token only
    if contrast is not None:  # the contrastive prompt followed by the same answer tokens, as text
        contrast_ids = list(tokenizer(contrast)["input_ids"])
        kwargs["contrast_targets"] = [tokenizer.decode(contrast_ids + answer, skip_special_tokens=True)]
    elif subject_span is not None:
        method_args["corrupt_span"] = tuple(int(x) for x in subject_span)
    if token_budget is not None:
        kwargs["token_budget"] = token_budget
    out = model.attribute(prompt, [prompt_ids + answer], method="activation_patching", method_args=method_args,
                          attributed_fn=attributed_fn, step_scores=[attributed_fn], show_progress=False, **kwargs)
    seq = out.sequences[0]
    clean = float(seq.step_scores[attributed_fn][0])
    scores = seq.target_attributions[: len(prompt_ids), 0, :].T  # [layer, position]
    return Trace(scores=np.ascontiguousarray(scores, dtype=np.float32), clean=clean,
                 corrupted=clean - float(seq.deltas[0]), tokens=tuple(seq.target_tokens[: len(prompt_ids)]),
                 target_id=answer[0])


__all__ = ["COMPONENTS", "PatchingArgs", "Site", "Trace", "activation_patching", "component_site", "subject_span",
           "trace"]
