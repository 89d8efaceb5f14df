"""Attention weights: one eager-attention forward over each full sequence gives every step's column.

``A[l, h, q, j] = softmax_j(q_q . k_j / sqrt(d_h) + mask)``. Step ``t`` reads query position ``t - 1``:
the decoder self-attention over tokens ``0 .. t-1`` (target side) and, for encoder-decoder models, the
cross-attention over the source. Results keep every layer and head: ``[n_tokens, n_steps, layers, heads]``
(Inseq's display averages heads, then layers).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..models.adapters import RowInputs
from .base import MethodOutput, Request
from .gradient import _pad_stack


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


def attention_attribution(req: Request) -> list[MethodOutput]:
    adapter, examples = req.adapter, req.examples
    enc_dec = adapter.is_encoder_decoder
    device = adapter.input_device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].target_ids))
    results: dict[int, MethodOutput] = {}
    batch: list[int] = []

    def flush():
        if batch:
            results.update(_attention_batch(req, batch, device))
            if req.on_progress is not None:
                req.on_progress(sum(examples[i].n_steps for i in batch), sum(len(examples[i].target_ids)
                                                                              for i in batch))
            batch.clear()

    with eager_attention(adapter.model), torch.no_grad():
        for i in order:
            ex = examples[i]
            length = len(ex.target_ids) + (len(ex.source_ids) if enc_dec else 0)
            width = max([length] + [len(examples[j].target_ids) for j in batch])
            if batch and (len(batch) + 1) * width ** 2 // 64 > req.token_budget:
                flush()
            batch.append(i)
        flush()
    return [results[i] for i in range(len(examples))]


def _attention_batch(req: Request, indices: list[int], device) -> dict[int, MethodOutput]:
    adapter = req.adapter
    enc_dec = adapter.is_encoder_decoder
    exs = [req.examples[i] for i in indices]
    length = max(ex.end - 1 for ex in exs)
    inputs = {"target_ids": _pad_stack([ex.target_ids[: ex.end - 1] for ex in exs], length)}
    if enc_dec:
        src_len = max(len(ex.source_ids) for ex in exs)
        inputs["source_ids"] = _pad_stack([ex.source_ids for ex in exs], src_len)
        inputs["source_mask"] = _pad_stack(
            [torch.ones(len(ex.source_ids), dtype=torch.long, device=device) for ex in exs], src_len)
    scored = torch.zeros(len(exs), length, dtype=torch.bool, device=device)
    out = adapter.forward(RowInputs(**inputs), scored, output_attentions=True)
    self_att = out.decoder_attentions if enc_dec else out.attentions
    self_att = torch.stack([a.float() for a in self_att], dim=1)  # [B, layers, heads, L, L]
    cross = torch.stack([a.float() for a in out.cross_attentions], dim=1) if enc_dec else None
    results = {}
    for r, (i, ex) in enumerate(zip(indices, exs, strict=True)):
        steps = torch.arange(ex.start, ex.end)
        n_layers, n_heads = self_att.shape[1:3]
        target = None
        if req.attribute_target:
            n_keys = ex.end - 1  # rows: key positions; columns: steps (query t - 1)
            att = self_att[r, :, :, steps - 1, :n_keys]  # [layers, heads, T, n_keys]
            target = torch.full((len(ex.target_ids), len(steps), n_layers, n_heads), float("nan"))
            target[:n_keys] = att.permute(3, 2, 0, 1).cpu()
            future = torch.arange(len(ex.target_ids)).view(-1, 1) >= steps.view(1, -1)
            target[future] = float("nan")
        source = None
        if enc_dec:
            att = cross[r, :, :, steps - 1, : len(ex.source_ids)]
            source = att.permute(3, 2, 0, 1).contiguous().cpu()
        labels = (tuple(str(x) for x in range(n_layers)), tuple(str(x) for x in range(n_heads)))
        results[i] = MethodOutput(source=source, target=target, extra_dims=("layer", "head"), extra_labels=labels)
    return results
