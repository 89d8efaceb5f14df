"""Occlusion on full sequences: one forward per occluded token serves every later step.

Occlusion (Zeiler & Fergus 2014), as Inseq computes it: for step ``t`` and token ``j < t``,
``A[j, t] = |f_t(x) - f_t(x with token j replaced by its baseline)|`` (the baseline is UNK except EOS, as
for the gradient methods; Inseq takes the absolute value, ``absolute=False`` keeps the sign). Inseq runs
one forward per (step, token) over the step's prefix, ``sum_t (L_t + 1)`` forwards; because replacing token
``j`` only changes positions ``>= j`` of a causal decoder, a single forward of the whole sequence with
token ``j`` replaced gives ``f_t`` for *every* later step: ``N + 1`` forwards per example, batched as rows
under the token budget. On a causal decoder the row occluding ``j`` equals the clean input before ``j``, so
it runs positions ``j ..`` only, after the KV cache of the clean sequence (one forward per example): about
half the tokens again. For encoder-decoder models each source token is occluded the same way (and the
target prefix with ``attribute_target``), on whole rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.adapters import RowInputs
from .base import MethodOutput, Picks, Request, attributed_sides, empty_outputs, forward_rows, repeat_picks


@dataclass(frozen=True)
class _Occluded:
    """One row: the example's sequence with token ``position`` of ``side`` replaced (None: the clean row)."""

    side: str | None
    position: int


def occlusion_attribution(req: Request, absolute: bool = True) -> list[MethodOutput]:
    adapter = req.adapter
    enc_dec = adapter.is_encoder_decoder
    outputs = []
    for ex in req.examples:
        source, target = empty_outputs(ex, attributed_sides(req))
        rows = [_Occluded(None, -1)]
        if target is not None:  # a token at or after the last step's position influences no attributed step
            rows += [_Occluded("target", j) for j in range(ex.end - 1)
                     if ex.target_baseline[j] != ex.target_ids[j]]
        if enc_dec:
            rows += [_Occluded("source", j) for j in range(len(ex.source_ids))
                     if ex.source_baseline[j] != ex.source_ids[j]]
        score = _score_after_clean_prefix if adapter.caches_prefixes else _score_rows
        scores = score(req, ex, rows)  # [rows, T]
        delta = scores[0:1] - scores[1:]
        if absolute:
            delta = delta.abs()
        steps = torch.arange(ex.start, ex.end)
        if target is not None:
            target[: ex.end - 1] = 0.0  # tokens equal to their baseline cannot change anything
        if source is not None:
            source[:] = 0.0
        for row, values in zip(rows[1:], delta, strict=True):
            out = target if row.side == "target" else source
            out[row.position] = values.float().cpu()
        if target is not None:
            future = torch.arange(len(ex.target_ids)).view(-1, 1) >= steps.view(1, -1)
            target[future] = float("nan")
        outputs.append(MethodOutput(source=source, target=target))
        if req.on_progress is not None:
            req.on_progress(ex.n_steps, len(rows) * (ex.end - 1))
    return outputs


def _occlude(ex, row: _Occluded) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoder ids (up to the last scored position) and encoder ids of ``row``."""
    target, source = ex.target_ids[: ex.end - 1].clone(), ex.source_ids
    if row.side == "target":
        target[row.position] = ex.target_baseline[row.position]
    elif row.side == "source":
        source = source.clone()
        source[row.position] = ex.source_baseline[row.position]
    return target, source


def _score_rows(req: Request, ex, rows: list[_Occluded]) -> torch.Tensor:
    """The attributed function at every step of ``ex`` for each row: ``[len(rows), n_steps]``."""
    picks = Picks.gather([(ex, t) for t in range(ex.start, ex.end)])
    positions = torch.arange(ex.start - 1, ex.end - 1)
    scores = forward_rows(req, [(*_occlude(ex, row), positions) for row in rows],
                          lambda logits, chunk: req.target_fn(logits, repeat_picks(picks, len(chunk)), None))
    return scores.view(len(rows), -1)


def _score_after_clean_prefix(req: Request, ex, rows: list[_Occluded]) -> torch.Tensor:
    """:func:`_score_rows` for a causal decoder: the row occluding token ``j`` runs positions ``j .. end-2``
    after the clean sequence's KV cache, the clean row positions ``start-1 ..``; steps at positions before
    ``j`` (whose token ``j`` is in the future, NaN in the result) get 0."""
    adapter, n = req.adapter, ex.end - 1
    cache = adapter.prefix_cache(adapter.embed(ex.target_ids[None, :n]))
    first = [ex.start - 1 if row.side is None else row.position for row in rows]
    order = sorted(range(len(rows)), key=first.__getitem__)
    scores = torch.zeros(len(rows), ex.n_steps)
    i = 0
    while i < len(order):
        g = first[order[i]]  # the batch's rows start at g or later: positions before g come from the cache
        last = i + 1
        while last < len(order) and (last - i + 1) * (n - g) <= req.inference_token_budget:
            last += 1
        batch = order[i:last]
        ids = ex.target_ids[g:n].repeat(len(batch), 1)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        entries, where = [], []
        for b, r in enumerate(batch):
            if rows[r].side is not None:
                ids[b, rows[r].position - g] = ex.target_baseline[rows[r].position]
            for t in range(max(first[r], ex.start - 1) + 1, ex.end):
                scored[b, t - 1 - g] = True
                entries.append((ex, t))
                where.append((r, t - ex.start))
        rows_index = torch.zeros(len(batch), dtype=torch.long, device=ids.device)
        past = adapter.take_prefix(cache, g, rows_index) if g else None
        with torch.no_grad():
            logits = adapter.forward(RowInputs(target_ids=ids, past=past), scored).logits
            values = req.target_fn(logits, Picks.gather(entries), None).float().cpu()
        for (r, step), v in zip(where, values, strict=True):
            scores[r, step] = v
        i = last
    return scores
