"""Occlusion on full sequences: one forward per occluded token serves every later step.

Occlusion (Zeiler & Fergus 2014), as Inseq computes it: for step ``t`` and token ``j < t``,
``A[j, t] = |f_t(x) - f_t(x with token j replaced by its baseline)|`` (the baseline is UNK except EOS, as
for the gradient methods; Inseq takes the absolute value, ``absolute=False`` keeps the sign). Inseq runs
one forward per (step, token) over the step's prefix, ``sum_t (L_t + 1)`` forwards; because replacing token
``j`` only changes positions ``>= j`` of a causal decoder, a single forward of the whole sequence with
token ``j`` replaced gives ``f_t`` for *every* later step: ``N + 1`` forwards per example, batched as rows
under the token budget. For encoder-decoder models each source token is occluded the same way (and the
target prefix with ``attribute_target``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        scores = _score_rows(req, ex, rows)  # [rows, T]
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
