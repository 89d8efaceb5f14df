"""Value zeroing (Mohebbi, Zuidema, Chrupała & Alishahi, EACL 2023, "Quantifying Context Mixing in Transformers").

Definition (as Inseq 0.7.1 computes it, ``inseq/attr/feat/ops/value_zeroing.py``). Let ``h^l`` be the input of
block ``l`` in the clean forward and ``y^l = B_l(h^l)`` its output (for the last block, after the stack's final
norm: Inseq compares ``hidden_states[-1]``). Zeroing the value vector of token ``j`` in every head of block
``l``'s attention (attention weights unchanged) and re-running block ``l`` on the *clean* input gives
``ỹ^{l,¬j}``; each layer is measured on its own. Then, for query position ``i``::

    D^l[i, j] = 1 - cos(y^l_i, ỹ^{l,¬j}_i)            (``similarity_metric="cosine"``, the default)
    D^l[i, j] = 0                      if D^l[i, j] < threshold (1e-5)
    V^l[i, j] = D^l[i, j] / sum_k D^l[i, k]              (rows normalised; an all-zero row stays zero)

Decoder self-attention is causal: only ``j <= i`` exist (the others are NaN, excluded from the row sum). Step
``t`` (the token at target position ``t``, predicted at query position ``t - 1``) reads row ``t - 1``:
``target[j, t - start, l] = V^l[t - 1, j]`` for ``j < t``, NaN for ``j >= t``. Results are
``[tokens, steps, layers]`` (``extra_dims=("layer",)``), like ``attention``'s ``[tokens, steps, layers, heads]``:
the views average the layers.

``similarity_metric="euclidean"`` uses ``D = ||y_i - ỹ_i||_2`` instead. (Inseq's ``euclidean`` computes
``1 - cdist(...)``, a ``[L, L]`` matrix stored into an ``[L]`` slot, which fails: see the tests.)

``rollout=True`` composes the layers as attention rollout does (Abnar & Zuidema 2020), like Mohebbi et al.'s
``compute_joint_attention(V, res=False)`` (no identity added: value zeroing already measures the residual
path)::

    R^0 = V^0,    R^l = V^l R^{l-1}     (matrix product over the token axis; NaN entries count as 0)

and layer ``l`` of the result holds ``R^l`` (rows still sum to 1; ``R^{last}`` is the whole-model mixing).
Rollout is defined for decoder-only models only: encoder-decoder models mix the target prefix and the source
in two separately normalised matrices (decoder self- and cross-attention), so no single stochastic matrix
exists to compose.

Encoder-decoder models (T5, BART, Marian, ...), as Inseq: the source attributions are the *cross-attention*
scores: zero encoder token ``j``'s value in block ``l``'s cross-attention and compare decoder block outputs at
every target position ``i`` (no causal mask; rows normalised over the source); the target attributions (with
``attribute_target``) are the decoder self-attention scores above. Inseq also computes encoder self-attention
scores (``sequence_scores["encoder_self_scores"]``, one full forward per source token); distattr's results have
no slot for them and skip that work.

Module names. Each architecture needs the path, inside one block of the block stack, of the value projection
(the values are zeroed at its output, which is the same as zeroing them after the head split: the reshape is
per position), and, for the fast path, of the attention's output projection (its parent is the attention
module). :data:`ARCHITECTURES` maps ``config.model_type`` to them. Models not covered take overrides:

* ``value_module``: e.g. ``"self_attn.v_proj"``; a fused projection takes a channel selector: ``"attn.c_attn[2/3]"``
  (part 2 of 3 equal parts of the output, 0-based: GPT-2's ``c_attn`` is ``[q | k | v]``) or
  ``"self_attn.qkv_proj[3072:4096]"`` (output channels ``3072..4095``; negative bounds count from the end).
  Layouts that interleave q/k/v per head (GPT-NeoX, Bloom, Falcon) cannot be selected this way.
* ``output_module``: e.g. ``"self_attn.o_proj"`` (enables the fast path for decoder-only models).
* ``cross_value_module``: the decoder's cross-attention value projection, e.g. ``"encoder_attn.v_proj"``.
* ``layers``: the block stack from the model root (default: the first ``nn.ModuleList`` of the decoder, as Inseq).
* ``final_norm``: the module applied after the last block (default: found among the stack owner's ``ln_f``,
  ``norm``, ``final_layer_norm``, ... and checked against the model's last hidden state).

Two exact formulations (``strategy``):

* ``"rerun"`` (any architecture): one forward caches every block's inputs (and call arguments); then, per block,
  the block alone is re-run on a batch of rows, row ``r`` with token ``j_r``'s value zeroed by a hook on the value
  projection (rows x length under ``token_budget``).
* ``"pairs"`` (decoder-only; the default when its checks pass): the attention output is linear in the values,
  ``x_i = sum_k A_h[i, k] v_{k, h}`` per head (``x`` = the output projection's input), so zeroing ``v_j`` gives
  ``x_i - A_h[i, j] v_{j, h}``, and everything in the block after the attention is position-wise. The clean
  forward also records each block's ``A`` (eager weights, query rows ``>= T0`` only), ``v`` and ``x`` (up to
  :data:`RECORD_BYTES` of such internals; later blocks are re-run once to get them); then only the reported pairs
  ``(i >= T0, j <= i)`` go through the output projection and the rest of the block (norms, MLP), with the
  attention module's forward replaced by the corrupted outputs, as one sequence of ``P`` positions (chunks of
  ``token_budget``). ``T0`` is the first reported query row (``start - 1``; 0 with rollout). Every block is
  checked: ``A v`` reproduces ``x`` (head layout, grouped-query heads) and the output projection of ``x`` the
  attention output; the first block also shows that the rest of the block is position-wise (reversed rows plus a
  repeated one give the same outputs). On a failure ``"auto"`` falls back to ``"rerun"`` (``"pairs"`` raises).

Cost per example (``L`` = positions run = prompt + generation - 1, ``S`` source length, ``n`` blocks, ``T``
steps; ``F(L)`` = a full forward over ``L`` tokens):

* Inseq: 1 forward with hidden states, then one full forward (all ``n`` blocks, the LM head on all positions,
  ``output_hidden_states``, a ``.cpu()`` copy of every block's output, ``sys.settrace`` hooks) per zeroed token,
  at batch size 1: ``L`` x F(L) for decoder-only; ``1 + S + L + S`` x F for encoder-decoder (encoder self, decoder
  self, cross) with ``L`` the target prefix.
* distattr ``rerun``: 1 x F(L) without LM head + ``n`` x [L rows x L tokens] single-block runs, batched: the
  same block work as ``L`` forwards, no LM head, no hidden-state copies, large batches. Encoder-decoder:
  1 x F + ``n`` x [(S + L with ``attribute_target``) rows x L] decoder-block runs (no encoder re-runs).
* distattr ``pairs``: 1 x F(L) without LM head + ``n`` x [the post-attention part of the block (output
  projection, norms, MLP) on ``P = sum_{i >= T0} (i + 1)`` positions]: at most ``L (L + 1) / 2`` MLP
  evaluations per block instead of Inseq's ``L^2`` full block evaluations, no q/k/v projections or attention
  for the corrupted rows. SmolLM2-135M, 10-token prompt + 8 generated tokens (``L = 17``): Inseq 18 full
  forwards of 17 tokens (with the LM head); distattr 1 forward + 108 post-attention positions per block (about
  5 more forwards' worth of block work: the post-attention part is ~84% of this model's block).

Device memory (long contexts): per-layer results never pile up on the accelerator. Distances go to the host as
each batch of a layer is done (float64 ``[layers, L, L]`` on the CPU); the model is run with
``output_attentions=False``, so its attention weights are freed with each block (``attention`` streams them the
same way: :mod:`distattr.methods.internals`); the fast path keeps a block's internals from the clean forward only
while all kept ones fit :data:`RECORD_BYTES` (counting the storage they hold), and drops the others when their
block returns; and each block's recorded input and internals are released once its layer is scored. What stays
for all blocks until their turn is the clean forward's block inputs (``[1, L, d]`` each, the residual stream).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapters import RowInputs
from .base import MethodOutput, Request
from .internals import eager_attention

logger = logging.getLogger(__name__)

SIMILARITY_METRICS = ("cosine", "euclidean")
STRATEGIES = ("auto", "pairs", "rerun")
# attention internals (weights, values, output-projection inputs and outputs) kept on the device from the clean
# forward, all blocks together (beyond: re-run the block to get them, one block at a time)
RECORD_BYTES = 256 << 20
FINAL_NORM_NAMES = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "layer_norm", "norm_f", "ln_out")


@dataclass(frozen=True)
class ValueZeroingArgs:
    """Arguments of ``value_zeroing`` (see :mod:`distattr.methods.value_zeroing` for the definitions).

    ``similarity_metric``: ``"cosine"`` (``1 - cos``, Inseq's default) or ``"euclidean"`` (L2 distance);
    ``rollout``: compose the per-layer matrices (decoder-only); ``threshold``: distances below it count as 0
    (Inseq: 1e-5); ``strategy``: ``"auto"``, ``"pairs"`` (fast, decoder-only) or ``"rerun"`` (generic);
    ``value_module`` / ``output_module`` / ``cross_value_module`` / ``layers`` / ``final_norm``: module names for
    architectures not in ``ARCHITECTURES`` (e.g. ``value_module="attn.c_attn[2/3]"``).
    """

    similarity_metric: str = "cosine"
    rollout: bool = False
    threshold: float = 1e-5
    strategy: str = "auto"
    value_module: str | None = None
    output_module: str | None = None
    cross_value_module: str | None = None
    layers: str | None = None
    final_norm: str | None = None

    def __post_init__(self):
        if self.similarity_metric not in SIMILARITY_METRICS:
            raise ValueError(f"similarity_metric must be one of {SIMILARITY_METRICS}, not {self.similarity_metric!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {self.strategy!r}")
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, not {self.threshold!r}")
        for name in ("value_module", "output_module", "cross_value_module"):
            spec = getattr(self, name)
            if spec is not None:
                parse_module_spec(spec)


@dataclass(frozen=True)
class ModuleNames:
    """Paths inside one block: the value projection (``path[k/n]`` / ``path[a:b]`` select output channels of a
    fused projection), the attention output projection (fast path; its parent is the attention module) and, for
    encoder-decoder models, the cross-attention value projection."""

    value: str
    output: str | None = None
    cross_value: str | None = None


_LLAMA_LIKE = ModuleNames("self_attn.v_proj", "self_attn.o_proj")
_OPT_LIKE = ModuleNames("self_attn.v_proj", "self_attn.out_proj")
_T5_LIKE = ModuleNames("layer.0.SelfAttention.v", "layer.0.SelfAttention.o", "layer.1.EncDecAttention.v")
_BART_LIKE = ModuleNames("self_attn.v_proj", "self_attn.out_proj", "encoder_attn.v_proj")

# config.model_type -> module names (checked against each architecture's modules in the tests)
ARCHITECTURES: dict[str, ModuleNames] = {
    "gpt2": ModuleNames("attn.c_attn[2/3]", "attn.c_proj"),
    "gpt_neo": ModuleNames("attn.attention.v_proj", "attn.attention.out_proj"),
    "gptj": ModuleNames("attn.v_proj", "attn.out_proj"),
    "phi": ModuleNames("self_attn.v_proj", "self_attn.dense"),
    **dict.fromkeys(("opt", "xglm", "biogpt"), _OPT_LIKE),
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3_text", "olmo", "olmo2", "granite", "starcoder2", "cohere", "stablelm", "smollm3"),
                    _LLAMA_LIKE),
    **dict.fromkeys(("t5", "mt5", "umt5"), _T5_LIKE),
    **dict.fromkeys(("bart", "mbart", "marian", "pegasus", "m2m_100", "blenderbot", "blenderbot-small"), _BART_LIKE),
}


# ---------------------------------------------------------------- module names


_SPEC = re.compile(r"^([A-Za-z_][\w.]*?)(?:\[(?:(\d+)/(\d+)|(-?\d*):(-?\d*))\])?$")


def parse_module_spec(spec: str) -> tuple[str, Callable[[int], slice]]:
    """``"path"``, ``"path[k/n]"`` or ``"path[a:b]"`` -> ``(path, width -> channel slice)``."""
    match = _SPEC.match(spec.strip())
    if match is None:
        raise ValueError(f"Cannot read module name {spec!r}: expected 'path', 'path[k/n]' or 'path[a:b]' "
                         "(e.g. 'self_attn.v_proj', 'attn.c_attn[2/3]', 'self_attn.qkv_proj[3072:4096]')")
    path, part, parts, lo, hi = match.groups()
    if part is not None:
        k, n = int(part), int(parts)
        if not 0 <= k < n:
            raise ValueError(f"{spec!r}: part {k} of {n} does not exist (parts are 0-based)")

        def select(width: int) -> slice:
            if width % n:
                raise ValueError(f"{spec!r}: output width {width} does not split into {n} equal parts")
            return slice(k * width // n, (k + 1) * width // n)

        return path, select
    if lo is not None:
        bounds = slice(int(lo) if lo else None, int(hi) if hi else None)
        return path, lambda width: slice(*bounds.indices(width)[:2])
    return path, lambda width: slice(0, width)


@dataclass(frozen=True)
class _Plan:
    """Resolved modules: the block stack, its owner (for the final norm) and the per-block names."""

    blocks: nn.ModuleList
    owner: nn.Module
    value: str
    value_select: Callable[[int], slice]
    output: str | None
    cross_value: str | None
    cross_select: Callable[[int], slice] | None
    final_norm: str | None


def _find_stack(root: nn.Module) -> tuple[nn.ModuleList, nn.Module] | None:
    """The first ``nn.ModuleList`` under ``root`` (pre-order, as Inseq's ``find_block_stack``) and its owner."""
    for _, parent in root.named_modules():
        for child in parent.children():
            if isinstance(child, nn.ModuleList):
                return child, parent
    return None


def resolve_plan(model: nn.Module, args: ValueZeroingArgs) -> _Plan:
    """Module names from the arguments, else from :data:`ARCHITECTURES`; a clear error when neither has them."""
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    model_type = getattr(model.config, "model_type", None)
    known = ARCHITECTURES.get(model_type)
    value = args.value_module or (known.value if known else None)
    cross = args.cross_value_module or (known.cross_value if known else None)
    output = args.output_module or (known.output if known else None)
    if args.layers is not None:
        try:
            blocks = model.get_submodule(args.layers)
        except AttributeError:
            raise ValueError(f"layers={args.layers!r} is not a module of the model") from None
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"layers={args.layers!r} is a {type(blocks).__name__}, not an nn.ModuleList of blocks")
        parent = args.layers.rpartition(".")[0]
        owner = model.get_submodule(parent) if parent else model
    else:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        found = _find_stack(decoder if decoder is not None else model)
        if found is None:
            raise ValueError("No block stack (nn.ModuleList) found in the model; pass layers='...'")
        blocks, owner = found
    block_names = sorted({name for name, _ in blocks[0].named_modules() if name})
    if value is None or (enc_dec and cross is None):
        missing = "value_module" + (" and cross_value_module" if enc_dec and cross is None else "")
        raise ValueError(
            f"value_zeroing does not know the module names of model_type {model_type!r} (known: "
            f"{', '.join(sorted(ARCHITECTURES))}). Pass {missing}: the path inside each block of the value "
            "projection, e.g. value_module='self_attn.v_proj', or 'attn.c_attn[2/3]' for a fused [q|k|v] "
            "projection ('path[a:b]' selects output channels); cross_value_module='encoder_attn.v_proj' for the "
            "cross-attention of an encoder-decoder; optionally output_module='self_attn.o_proj' (the attention "
            f"output projection) for the faster path. Modules of block 0: {', '.join(block_names)}")
    value_path, value_select = parse_module_spec(value)
    cross_path, cross_select = parse_module_spec(cross) if (enc_dec and cross) else (None, None)
    for label, path in (("value_module", value_path), ("output_module", output), ("cross_value_module", cross_path)):
        if path is not None and path not in block_names:
            raise ValueError(f"{label}: block 0 has no module {path!r}. Its modules: {', '.join(block_names)}")
    return _Plan(blocks=blocks, owner=owner, value=value_path, value_select=value_select, output=output,
                 cross_value=cross_path, cross_select=cross_select, final_norm=args.final_norm)


# ---------------------------------------------------------------- the method


def value_zeroing_attribution(req: Request, args: ValueZeroingArgs) -> list[MethodOutput]:
    adapter = req.adapter
    enc_dec = adapter.is_encoder_decoder
    if args.rollout and enc_dec:
        raise ValueError("rollout is defined for decoder-only models: an encoder-decoder's decoder self- and "
                         "cross-attention scores are normalised separately, so there is no single matrix to compose")
    if args.strategy == "pairs" and enc_dec:
        raise ValueError("strategy='pairs' is for decoder-only models; use 'auto' or 'rerun'")
    plan = resolve_plan(adapter.model, args)
    if args.strategy != "rerun" and not enc_dec and plan.output is None:
        if args.strategy == "pairs":
            raise ValueError("strategy='pairs' needs output_module (the attention output projection)")
        logger.info("value_zeroing: no output_module for this model; using the generic rerun strategy")
    outputs = []
    with eager_attention(adapter.model), torch.no_grad():
        for ex in req.examples:
            outputs.append(_example(req, plan, args, ex))
            if req.on_progress is not None:
                req.on_progress(ex.n_steps, (ex.end - 1) ** 2 * len(plan.blocks))
    return outputs


@dataclass
class _Call:
    """One block's call in the clean forward: its positional and keyword arguments and its output."""

    args: tuple
    kwargs: dict
    output: torch.Tensor | None = None

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]


def _clean_forward(req: Request, plan: _Plan, ex, first_row: int | None = None
                   ) -> tuple[list[_Call], torch.Tensor, list[_Internals | None]]:
    """Run the model once on the example, recording every block's call; returns them, the last hidden state and
    (with ``first_row``, for the fast path) each block's attention internals while they fit :data:`RECORD_BYTES`
    (None for the blocks after that: they are re-run one by one). A block's internals are settled when the block
    returns: kept if they fit, else dropped there, so the blocks beyond the cap never hold theirs on the device
    beyond their own call, and no attention weights are collected by the model (``output_attentions=False``)."""
    adapter = req.adapter
    device = adapter.input_device
    ids = ex.target_ids[: ex.end - 1].view(1, -1).to(device)
    inputs = {"target_ids": ids}
    if adapter.is_encoder_decoder:
        src = ex.source_ids.view(1, -1).to(device)
        inputs.update(source_ids=src, source_mask=torch.ones_like(src))
    calls: list[_Call] = []
    records: list[dict] = [{} for _ in plan.blocks]
    room = {"bytes": RECORD_BYTES, "full": False}

    def pre_hook(module, args, kwargs):
        calls.append(_Call(args, kwargs))

    def post_hook(module, args, kwargs, output):
        calls[-1].output = output[0] if isinstance(output, tuple | list) else output
        if first_row is not None:
            settle(len(calls) - 1)

    def settle(layer: int):
        """Keep block ``layer``'s internals if they fit the remaining room (counting the storage they keep alive:
        ``x``, ``value`` and ``attn_out`` are views), else drop them and stop recording."""
        record = records[layer]
        storages = {(v.device, v.untyped_storage().data_ptr()): v.untyped_storage().nbytes()
                    for v in record.values() if isinstance(v, torch.Tensor)}
        size = sum(storages.values())
        if record.get("weights") is None or room["full"] or size > room["bytes"]:
            record.clear()
            room["full"] = room["full"] or size > room["bytes"]
        else:
            room["bytes"] -= size

    def recorder(layer: int):
        def store(key: str, value):
            if not room["full"]:
                records[layer][key] = value

        return store

    handles = []
    for layer, block in enumerate(plan.blocks):
        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook, with_kwargs=True))
        if first_row is not None:
            handles += _internals_hooks(block, plan, first_row, recorder(layer))
    try:
        scored = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        out = adapter.forward(RowInputs(**inputs), scored, output_hidden_states=True, output_attentions=False)
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len(plan.blocks):
        raise RuntimeError(f"value_zeroing: expected one call per block ({len(plan.blocks)}), saw {len(calls)}")
    hidden = out.decoder_hidden_states if adapter.is_encoder_decoder else out.hidden_states
    internals = [_Internals(**{k: r.get(k) for k in ("weights", "value", "x", "attn_out", "n_outputs")})
                 if r.get("weights") is not None else None for r in records]
    return calls, hidden[-1], internals


def _final_transform(model: nn.Module, plan: _Plan, raw: torch.Tensor, final: torch.Tensor):
    """The module mapping the last block's output onto the model's last hidden state (None: identity)."""

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)

    if plan.final_norm is not None:
        module = model.get_submodule(plan.final_norm)
        if not same(module(raw), final):
            raise ValueError(f"final_norm={plan.final_norm!r} does not map the last block's output onto the "
                             "model's last hidden state")
        return module
    if same(raw, final):
        return None
    for name in FINAL_NORM_NAMES:
        module = getattr(plan.owner, name, None)
        if isinstance(module, nn.Module) and same(module(raw), final):
            return module
    raise ValueError("value_zeroing cannot tell which module follows the last block (the model's last hidden state "
                     f"is neither the block output nor one of {FINAL_NORM_NAMES} of {type(plan.owner).__name__}); "
                     "pass final_norm='<module path from the model root>'")


def _distance(clean: torch.Tensor, corrupted: torch.Tensor, metric: str) -> torch.Tensor:
    """``[..., d]`` x ``[..., d]`` -> ``[...]`` in float64: ``1 - cos`` or the L2 distance."""
    a, b = clean.double(), corrupted.double()
    if metric == "euclidean":
        return torch.linalg.vector_norm(a - b, dim=-1)
    norms = (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)).clamp_min(1e-8)
    return 1.0 - (a * b).sum(-1) / norms


def _example(req: Request, plan: _Plan, args: ValueZeroingArgs, ex) -> MethodOutput:
    adapter = req.adapter
    enc_dec = adapter.is_encoder_decoder
    length = ex.end - 1
    first_row = 0 if args.rollout else ex.start - 1
    use_pairs = not enc_dec and plan.output is not None and args.strategy in ("auto", "pairs")
    calls, final_hidden, internals = _clean_forward(req, plan, ex, first_row if use_pairs else None)
    final = _final_transform(adapter.model, plan, calls[-1].output, final_hidden)
    n_layers = len(plan.blocks)
    budget = max(1, req.token_budget)
    self_scores = cross_scores = None
    if req.attribute_target or not enc_dec:
        self_scores = torch.full((n_layers, length, length), float("nan"), dtype=torch.float64)
    if enc_dec:
        cross_scores = torch.full((n_layers, length, len(ex.source_ids)), float("nan"), dtype=torch.float64)
    for layer, block in enumerate(plan.blocks):
        # taken out of the lists: a block's recorded input and internals are freed once its layer is scored
        # (its output lives on as the next block's input)
        call, rec = calls[layer], internals[layer]
        calls[layer] = internals[layer] = None
        last = layer == n_layers - 1
        clean = final_hidden if last else call.output
        post = final if last else None
        if self_scores is not None:
            scores = None
            if use_pairs:
                scores = _pairs_layer(block, call, plan, rec, clean, post, first_row, budget, args.similarity_metric,
                                      strict=args.strategy == "pairs", check_layout=layer == 0)
                if scores is None:
                    use_pairs = False  # checks failed: the generic path for the rest of this call
            if scores is None:
                scores = _rerun_layer(block, call, plan.value, plan.value_select, length, clean, post, budget,
                                      args.similarity_metric, causal=True)
            self_scores[layer] = scores
        if cross_scores is not None:
            cross_scores[layer] = _rerun_layer(block, call, plan.cross_value, plan.cross_select,
                                               len(ex.source_ids), clean, post, budget, args.similarity_metric,
                                               causal=False)
    source = target = None
    steps = torch.arange(ex.start, ex.end)
    labels = (tuple(str(x) for x in range(n_layers)),)
    if self_scores is not None:
        matrices = _normalise(self_scores, args.threshold)
        if args.rollout:
            matrices = _rollout(matrices)
        rows = matrices[:, steps - 1, :].permute(2, 1, 0)  # [keys, steps, layers]
        target = torch.full((len(ex.target_ids), len(steps), n_layers), float("nan"), dtype=torch.float64)
        target[:length] = rows
        future = torch.arange(len(ex.target_ids)).view(-1, 1) >= steps.view(1, -1)
        target[future] = float("nan")
        target = target.float()
    if cross_scores is not None:
        source = _normalise(cross_scores, args.threshold)[:, steps - 1, :].permute(2, 1, 0).float().contiguous()
    return MethodOutput(source=source, target=target if req.attribute_target or not enc_dec else None,
                        extra_dims=("layer",), extra_labels=labels)


def _normalise(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the distances below ``threshold``, then divide every row by its sum over the existing (non-NaN)
    entries; an all-zero row stays zero (Inseq)."""
    scores = torch.where(scores < threshold, torch.zeros_like(scores), scores)
    total = scores.nansum(dim=-1, keepdim=True)
    total[total == 0] = 1.0
    return scores / total


def _rollout(matrices: torch.Tensor) -> torch.Tensor:
    """``[layers, L, L]`` row-normalised matrices -> their running products ``R^l = V^l R^{l-1}`` (NaN = 0), with
    the causal NaNs put back."""
    future = torch.isnan(matrices[0])
    joint = torch.nan_to_num(matrices, nan=0.0)
    out = [joint[0]]
    for layer in range(1, len(joint)):
        out.append(joint[layer] @ out[-1])
    rolled = torch.stack(out)
    rolled[:, future] = float("nan")
    return rolled


# ---------------------------------------------------------------- block re-runs


def _expand(value, rows: int):
    """Broadcast batch-size-1 tensors (masks, position embeddings, encoder states) of a block call to ``rows``."""
    if isinstance(value, torch.Tensor):
        if rows != 1 and value.dim() >= 2 and value.shape[0] == 1:
            return value.expand(rows, *value.shape[1:])
        return value
    if isinstance(value, tuple | list):
        return type(value)(_expand(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: _expand(v, rows) for k, v in value.items()}
    return value


def _call_block(block: nn.Module, call: _Call, hidden: torch.Tensor) -> torch.Tensor:
    """Run ``block`` as in the clean forward but on ``hidden [R, L', d]``; returns its hidden output."""
    rows = hidden.shape[0]
    if call.args:
        args = (hidden, *(_expand(a, rows) for a in call.args[1:]))
        kwargs = _expand(call.kwargs, rows)
    else:
        args = ()
        kwargs = {**_expand(call.kwargs, rows), "hidden_states": hidden}
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


@contextmanager
def _zeroing(module: nn.Module, select: Callable[[int], slice], positions: torch.Tensor):
    """Zero, in row ``r`` of every call of ``module``, output position ``positions[r]`` (the selected channels)."""

    def hook(mod, inputs, output):
        channels = select(output.shape[-1])
        rows = torch.arange(len(positions), device=output.device)
        output[rows, positions.to(output.device), channels] = 0
        return output

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _rerun_layer(block, call: _Call, value_path: str, select, n_zeroed: int, clean: torch.Tensor, post, budget: int,
                 metric: str, causal: bool) -> torch.Tensor:
    """``[L, n_zeroed]`` distances of block outputs with each position of ``value_path``'s output zeroed, one
    row per zeroed position, batched under ``budget`` tokens (``causal``: only ``j <= i``, NaN elsewhere)."""
    hidden = call.hidden
    length = hidden.shape[1]
    module = block.get_submodule(value_path)
    scores = torch.full((length, n_zeroed), float("nan"), dtype=torch.float64)
    per_batch = max(1, budget // length)
    for lo in range(0, n_zeroed, per_batch):
        positions = torch.arange(lo, min(n_zeroed, lo + per_batch))
        with _zeroing(module, select, positions):
            out = _call_block(block, call, hidden.expand(len(positions), *hidden.shape[1:]).contiguous())
        if post is not None:
            out = post(out)
        dist = _distance(clean, out, metric).T.cpu()  # [L, rows]
        if causal:
            keep = torch.arange(length).view(-1, 1) >= positions.view(1, -1)
            dist = torch.where(keep, dist, torch.full_like(dist, float("nan")))
        scores[:, lo: lo + len(positions)] = dist
    return scores


@contextmanager
def _replaced_forward(module: nn.Module, result):
    """Make ``module`` return ``result`` without computing anything."""
    module.forward = lambda *args, **kwargs: result
    try:
        yield
    finally:
        del module.forward


def _attention_weights(output, length: int) -> torch.Tensor | None:
    """The eager attention probabilities ``[1, H, L, L]`` among the attention module's outputs."""
    if not isinstance(output, tuple | list):
        return None
    for item in output[1:]:
        if isinstance(item, torch.Tensor) and item.dim() == 4 and item.shape[0] == 1 and item.shape[-2:] == (
                length, length):
            return item
    return None


@dataclass(frozen=True)
class _Internals:
    """One block's attention in the clean forward, for the query rows ``first_row ..``: weights ``[H, R, L]``,
    value vectors ``[L, kv_heads * head_dim]`` (the selected channels), the output projection's input
    ``[R, H * head_dim]``, the attention output ``[R, d]`` and the number of the attention module's outputs
    (None: it returns a tensor)."""

    weights: torch.Tensor | None
    value: torch.Tensor | None
    x: torch.Tensor | None
    attn_out: torch.Tensor | None
    n_outputs: int | None


def _modules(block: nn.Module, plan: _Plan) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The attention module (the output projection's parent), its output projection and the value projection."""
    parent = plan.output.rpartition(".")[0]
    return (block.get_submodule(parent) if parent else block, block.get_submodule(plan.output),
            block.get_submodule(plan.value))


def _internals_hooks(block: nn.Module, plan: _Plan, first_row: int, store: Callable[[str, object], None]) -> list:
    """Hooks recording a block's :class:`_Internals` parts into ``store(key, value)``."""
    attention, output_proj, value_proj = _modules(block, plan)

    def on_attention(module, inputs, output):
        first = output[0] if isinstance(output, tuple | list) else output
        weights = _attention_weights(output, first.shape[1])
        store("weights", None if weights is None else weights[0, :, first_row:].clone())
        store("attn_out", first[0, first_row:])
        store("n_outputs", len(output) if isinstance(output, tuple | list) else None)

    def on_value(module, inputs, output):
        store("value", output[0, :, plan.value_select(output.shape[-1])])

    def on_output(module, inputs):
        store("x", inputs[0][0, first_row:])

    return [attention.register_forward_hook(on_attention), value_proj.register_forward_hook(on_value),
            output_proj.register_forward_pre_hook(on_output)]


def _record_block(block: nn.Module, call: _Call, plan: _Plan, first_row: int) -> _Internals:
    """Re-run one block on its clean input to record its attention internals."""
    seen: dict[str, object] = {}
    handles = _internals_hooks(block, plan, first_row, seen.__setitem__)
    try:
        _call_block(block, call, call.hidden.clone())
    finally:
        for h in handles:
            h.remove()
    return _Internals(**{k: seen.get(k) for k in ("weights", "value", "x", "attn_out", "n_outputs")})


def _run_replaced(block, call: _Call, attention: nn.Module, n_outputs: int | None, hidden: torch.Tensor,
                  attn_out: torch.Tensor) -> torch.Tensor:
    """The block on positions ``hidden [P, d]`` (one sequence) with the attention's output replaced by
    ``attn_out [P, d]``."""
    result = attn_out[None] if n_outputs is None else (attn_out[None], *[None] * (n_outputs - 1))
    with _replaced_forward(attention, result):
        return _call_block(block, call, hidden[None])[0]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3) -> bool:
    scale = b.abs().max().item() if b.numel() else 0.0
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=rtol, atol=1e-5 * max(scale, 1.0)))


def _pairs_layer(block, call: _Call, plan: _Plan, rec: _Internals | None, clean: torch.Tensor, post,
                 first_row: int, budget: int, metric: str, strict: bool, check_layout: bool) -> torch.Tensor | None:
    """``[L, L]`` causal distances of one block (rows ``first_row ..``) from its linear attention decomposition
    (module docstring); ``rec``: the block's internals from the clean forward (None: re-run the block to get
    them). None when the block fails the checks (``strict``: raise instead); ``check_layout`` also checks that
    the block after the attention is position-wise."""
    hidden = call.hidden  # [1, L, d]
    length = hidden.shape[1]
    attention, output_proj, _ = _modules(block, plan)
    if rec is None:
        rec = _record_block(block, call, plan, first_row)

    def fail(why: str):
        if strict:
            raise ValueError(f"value_zeroing strategy='pairs' does not apply to this model: {why}")
        logger.warning("value_zeroing: %s; using the generic rerun strategy", why)
        return None

    if rec.weights is None or rec.value is None or rec.x is None:
        return fail("no eager attention weights / value / output-projection input seen in the block")
    weights, value, x = rec.weights, rec.value, rec.x  # [H, R, L], [L, kv * hd], [R, H * hd]
    heads = weights.shape[0]
    if x.shape[-1] % heads or value.shape[-1] % (x.shape[-1] // heads):
        return fail("value / output-projection widths do not match the number of heads")
    head_dim = x.shape[-1] // heads
    kv_heads = value.shape[-1] // head_dim
    if heads % kv_heads:
        return fail("heads are not a multiple of the value heads")
    v = value.reshape(length, kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=1)  # [L, H, hd]
    if not _close(torch.einsum("hij,jhd->ihd", weights, v).reshape(len(x), -1), x):
        return fail("the attention weights times the values do not give the output projection's input")
    if not _close(output_proj(x), rec.attn_out):
        return fail("the attention output is not the output projection of its input")
    if check_layout:  # reversed rows plus a repeated one: another order and another length
        local = torch.cat([torch.arange(len(x) - 1, -1, -1), torch.zeros(1, dtype=torch.long)]).to(hidden.device)
        try:
            permuted = _run_replaced(block, call, attention, rec.n_outputs, hidden[0, first_row + local],
                                     rec.attn_out[local])
        except Exception as err:  # a block whose other parts depend on the sequence layout
            return fail(f"the block does not run on a permuted sequence ({type(err).__name__}: {err})")
        if not _close(permuted, call.output[0, first_row + local]):
            return fail("the block after the attention is not position-wise")

    rows = torch.arange(first_row, length)
    ii = torch.repeat_interleave(rows, rows + 1)  # pairs (i, j <= i), row by row
    starts = torch.cumsum(rows + 1, 0) - (rows + 1)
    jj = torch.arange(len(ii)) - torch.repeat_interleave(starts, rows + 1)
    scores = torch.full((length, length), float("nan"), dtype=torch.float64)
    device = hidden.device
    for lo in range(0, len(ii), max(1, budget)):
        i, j = ii[lo: lo + budget].to(device), jj[lo: lo + budget].to(device)
        r = i - first_row
        removed = (weights[:, r, j].T.unsqueeze(-1) * v[j]).reshape(len(i), -1)  # A_h[i, j] v_{j, h}
        corrupted = output_proj(x[r] - removed)
        out = _run_replaced(block, call, attention, rec.n_outputs, hidden[0, i], corrupted)
        if post is not None:
            out = post(out)
        scores[i.cpu(), j.cpu()] = _distance(clean[0, i], out, metric).cpu()
    return scores


__all__ = ["ARCHITECTURES", "ModuleNames", "ValueZeroingArgs", "parse_module_spec", "value_zeroing_attribution"]
