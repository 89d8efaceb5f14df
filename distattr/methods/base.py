"""What every attribution method receives and returns.

An example is a token sequence whose target positions ``start <= t < end`` are explained. Target
position ``t`` is predicted from the logits at position ``t - 1``, which depend on tokens ``0 .. t-1``
(decoder side) and, for encoder-decoder models, on the whole source.

Token-level results are matrices ``[n_tokens, n_steps(, *extra)]``: column ``t - start`` holds the scores
of step ``t``; on the target side rows ``>= t`` are NaN (future tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.adapters import Adapter, id_rows


@dataclass(frozen=True)
class Example:
    """One sequence to explain; tensors are 1-D ``long`` on the model's input device.

    Attributes:
        target_ids: ``[N]`` decoder tokens: prompt + generation (decoder-only) or start token + target.
        target_baseline: ``[N]`` baseline ids (UNK except EOS; the decoder-start token is kept).
        start, end: the attributed target positions ``[start, end)``.
        source_ids, source_baseline: ``[S]`` encoder tokens (encoder-decoder only).
        contrast_target_ids: ``[end - start]`` contrast token for each step, when the attributed function
            is contrastive.
        contrast_logits: ``[end - start, V]`` logits of the contrastive forward, only with
            ``contrast_force_inputs`` (otherwise the contrast token is scored on the original forward).
        contrast_ids: ``[M]`` the whole contrastive decoder sequence (``contrast_targets``: contrastive prompt +
            target), whenever one is given, whatever the attributed function; activation patching runs it as
            the corrupted input.
    """

    target_ids: torch.Tensor
    target_baseline: torch.Tensor
    start: int
    end: int
    source_ids: torch.Tensor | None = None
    source_baseline: torch.Tensor | None = None
    contrast_target_ids: torch.Tensor | None = None
    contrast_logits: torch.Tensor | None = None
    contrast_ids: torch.Tensor | None = None

    @property
    def n_steps(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Picks:
    """Per scored position (``K``): the target token and, for contrastive targets, the contrast token
    and (with ``contrast_force_inputs``) the contrastive forward's logits ``[K, V]``."""

    target_ids: torch.Tensor
    contrast_ids: torch.Tensor | None = None
    contrast_logits: torch.Tensor | None = None

    @staticmethod
    def gather(entries: list[tuple[Example, int]]) -> Picks:
        """Picks for ``(example, target position)`` pairs, in order."""
        targets = torch.stack([ex.target_ids[t] for ex, t in entries])
        ex0 = entries[0][0]
        contrast = logits = None
        if ex0.contrast_target_ids is not None:
            contrast = torch.stack([ex.contrast_target_ids[t - ex.start] for ex, t in entries])
        if ex0.contrast_logits is not None:
            logits = torch.stack([ex.contrast_logits[t - ex.start] for ex, t in entries])
        return Picks(targets, contrast, logits)


# A forward kept for backward saves ~16 hidden-size vectors per token and layer (models/memory.py); one without
# gradients holds about two at a time, for one layer, but also the scored logits ([K, V], the vocabulary).
NO_GRAD_BUDGET_FACTOR = 4

# f(logits [K, V], picks, rerun) -> [K]; rerun() recomputes the logits with dropout on
TargetFn = Callable[[torch.Tensor, Picks, "Callable | None"], torch.Tensor]


@dataclass(frozen=True)
class Request:
    """Everything a method needs besides its own arguments.

    Attributes:
        attribute_target: also attribute the decoder prefix (the engine sets it True for decoder-only models).
        hidden_reduction: how a per-dimension score becomes a token score: ``"vnorm"`` (L2, Inseq's
            default) or ``"sum"`` (signed; IG completeness holds for it).
        token_budget: most tokens (rows x padded length) in one forward/backward batch.
        steps_per_row: attribution steps sharing one forward (None: chosen by the cost model).
        recompute: gradient methods: ``"always"``/``"never"`` recompute the transformer blocks in the backward
            (:mod:`distattr.models.recompute`), or ``"auto"``: when a row does not fit the token budget.
        special_ids: the tokenizer's special token ids (discretized IG keeps their paths constant).
    """

    adapter: Adapter
    examples: list[Example]
    target_fn: TargetFn
    attribute_target: bool
    hidden_reduction: str = "vnorm"
    token_budget: int = 256
    steps_per_row: int | None = None
    recompute: str = "never"
    on_progress: Callable[[int, int], None] | None = None
    special_ids: frozenset[int] = frozenset()

    @property
    def inference_token_budget(self) -> int:
        """Tokens per batch for forwards without gradients (perturbation methods): they keep no activations
        for a backward, only one layer's transients at a time, so they take ``NO_GRAD_BUDGET_FACTOR`` times
        the rows of ``token_budget``."""
        return self.token_budget * NO_GRAD_BUDGET_FACTOR


@dataclass(frozen=True)
class MethodOutput:
    """Token-level results of one example (float32, CPU).

    ``source`` ``[S, T(, *extra)]`` or None; ``target`` ``[N, T(, *extra)]`` or None; ``deltas`` ``[T]``
    IG convergence deltas or None; ``extra_dims`` names the trailing dims (e.g. ``("layer", "head")``).
    """

    source: torch.Tensor | None
    target: torch.Tensor | None
    deltas: torch.Tensor | None = None
    extra_dims: tuple[str, ...] = ()
    extra_labels: tuple[tuple[str, ...], ...] = ()


def check_differentiable(f: torch.Tensor) -> torch.Tensor:
    """Refuse a piecewise-constant attributed function (e.g. ``top_p_size``): its gradient is zero."""
    if not f.requires_grad:
        raise ValueError(
            "The attributed function does not depend differentiably on the inputs (its gradient is zero "
            "everywhere); use it as a step score, or with a method that does not differentiate it."
        )
    return f


def reduce_hidden(scores: torch.Tensor, how: str) -> torch.Tensor:
    """``[..., d]`` -> ``[...]``: ``vnorm`` = L2 norm, ``sum`` = signed sum."""
    if how == "vnorm":
        return torch.linalg.vector_norm(scores, ord=2, dim=-1)
    if how == "sum":
        return scores.sum(-1)
    raise ValueError(f"Unknown hidden_reduction {how!r}; use 'vnorm' or 'sum'")


def attributed_sides(req: Request) -> frozenset[str]:
    """The input sides a method attributes: the decoder prefix (``"target"``, always for decoder-only
    models) and, for encoder-decoder models, the encoder input (``"source"``)."""
    sides = {"target"} if req.attribute_target else set()
    if req.adapter.is_encoder_decoder:
        sides.add("source")
    return frozenset(sides)


def empty_outputs(example: Example, sides, extra: tuple[int, ...] = ()):
    """NaN-filled ``(source, target)`` matrices of an example, None for a side not in ``sides``."""
    steps = example.n_steps
    source = torch.full((len(example.source_ids), steps, *extra), float("nan")) if "source" in sides else None
    target = torch.full((len(example.target_ids), steps, *extra), float("nan")) if "target" in sides else None
    return source, target


Row = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]  # decoder ids [L], encoder ids [S] or None, positions


def repeat_picks(picks: Picks, times: int) -> Picks:
    """``picks`` for ``times`` rows scoring the same positions."""
    return Picks(*(None if v is None else v.repeat(times, *[1] * (v.dim() - 1))
                   for v in (picks.target_ids, picks.contrast_ids, picks.contrast_logits)))


def forward_rows(req: Request, rows: list[Row], reduce: Callable[[torch.Tensor, list[int]], torch.Tensor]
                 ) -> torch.Tensor:
    """Run id rows ``(decoder ids, encoder ids or None, scored positions)`` in batches of at most
    ``req.inference_token_budget`` padded tokens (rows sorted by length); ``reduce(logits [K, V], chunk)`` turns
    the scored logits of the rows ``chunk`` (indices into ``rows``) into ``[K]`` values. Returns the
    values of all rows' scored positions, in row order (positions ascending within a row)."""
    enc_dec = req.adapter.is_encoder_decoder
    sizes = [len(t) + (len(s) if enc_dec else 0) for t, s, _ in rows]
    order = sorted(range(len(rows)), key=sizes.__getitem__)
    values: list[torch.Tensor | None] = [None] * len(rows)
    first = 0
    with torch.no_grad():
        while first < len(order):
            last = first + 1
            while last < len(order) and (last - first + 1) * sizes[order[last]] <= req.inference_token_budget:
                last += 1
            chunk = order[first:last]
            model_rows, scored = id_rows(req.adapter, [rows[r] for r in chunk])
            out = reduce(req.adapter.forward(model_rows, scored).logits, chunk)
            for r, v in zip(chunk, out.split([len(rows[r][2]) for r in chunk]), strict=True):
                values[r] = v
            first = last
    return torch.cat(values)
