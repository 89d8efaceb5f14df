"""DeepLIFT and layer DeepLIFT through Captum, on batches of stacked prefixes (one step per row).

DeepLIFT's rescale rule lives in Captum's module hooks, so these run Captum's own code on rows: a
row is the prefix of one step, right-padded, and the row scorer reads the logits at its last real
position. Batching steps and examples this way gives the same values as Inseq's per-step loop.

DeepLIFT (Shrikumar et al. 2017): ``A_i = (x_i - b_i) * m_i`` where the multipliers ``m`` follow the
chain rule with ``m = dy/dz`` replaced by ``(y(x) - y(b)) / (z(x) - z(b))`` at Captum's supported
nonlinearities (others, e.g. GELU/SiLU, use ordinary gradients). The forward runs on input and baseline
rows concatenated.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapters import RowInputs
from .base import MethodOutput, Picks, Request, attributed_sides, check_differentiable, empty_outputs, reduce_hidden
from .gradient import LayerTarget, _pad_stack
from .rows import pack, plan_units


class RowScorer(nn.Module):
    """``forward(target, source, source_mask, last, row_index) -> [R]``: the attributed function of each
    row at its position ``last`` (``target``/``source`` are embeddings or ids); ``row_index`` selects the
    row's :class:`Picks` entry in ``self.picks`` (Captum repeats rows, so picks travel by index)."""

    def __init__(self, req: Request):
        super().__init__()
        self.model = req.adapter.model
        self._adapter = req.adapter
        self._target_fn = req.target_fn
        self.entries: list = []

    def forward(self, target, source, source_mask, last, row_index):
        scored = torch.zeros(target.shape[:2], dtype=torch.bool, device=target.device)
        scored[torch.arange(len(last), device=target.device), last] = True
        floating = target.is_floating_point()
        rows = RowInputs(
            target_embeds=target if floating else None, target_ids=None if floating else target,
            source_embeds=source if source is not None and floating else None,
            source_ids=source if source is not None and not floating else None,
            source_mask=source_mask,
        )
        logits = self._adapter.forward(rows, scored).logits
        picks = Picks.gather([self.entries[i] for i in row_index.tolist()])
        return check_differentiable(self._target_fn(logits, picks, None))


def deeplift_attribution(req: Request, layer: LayerTarget | None = None) -> list[MethodOutput]:
    """DeepLIFT (``layer=None``) or layer DeepLIFT of one module; see the module docstring."""
    from captum.attr import DeepLift, LayerDeepLift

    adapter, examples = req.adapter, req.examples
    enc_dec = adapter.is_encoder_decoder
    scorer = RowScorer(req)
    explainer = (DeepLift(scorer, multiply_by_inputs=True) if layer is None
                 else LayerDeepLift(scorer, layer.modules[0], multiply_by_inputs=True))
    outputs = [empty_outputs(ex, set(layer.sides) if layer is not None else attributed_sides(req))
               for ex in examples]

    units = plan_units(examples, 1)
    src_lens = [len(examples[u.example].source_ids) if enc_dec else 0 for u in units]
    for batch in pack(units, 1, req.token_budget, src_lens):
        rows = [units[p.unit] for p in batch]
        exs = [examples[u.example] for u in rows]
        length = max(u.length for u in rows)
        device = adapter.input_device
        tgt = [ex.target_ids[: u.length] for ex, u in zip(exs, rows, strict=True)]
        tgt_b = [ex.target_baseline[: u.length] for ex, u in zip(exs, rows, strict=True)]
        attribute_target = req.attribute_target
        if not attribute_target:
            tgt_b = tgt
        src = src_b = mask = None
        if enc_dec:
            src_len = max(len(ex.source_ids) for ex in exs)
            src, src_b = [ex.source_ids for ex in exs], [ex.source_baseline for ex in exs]
            mask = _pad_stack([torch.ones(len(s), dtype=torch.long, device=device) for s in src], src_len)
        if layer is None:
            inputs = [_pad_stack([adapter.embed(i, "target") for i in tgt], length)]
            baselines = [_pad_stack([adapter.embed(i, "target") for i in tgt_b], length)]
            if enc_dec:
                inputs.append(_pad_stack([adapter.embed(i, "source") for i in src], src_len))
                baselines.append(_pad_stack([adapter.embed(i, "source") for i in src_b], src_len))
        else:
            inputs = [_pad_stack(tgt, length)]
            baselines = [_pad_stack(tgt_b, length)]
            if enc_dec:
                inputs.append(_pad_stack(src, src_len))
                baselines.append(_pad_stack(src_b, src_len))
        last = torch.tensor([u.length - 1 for u in rows], device=device)
        scorer.entries = [(ex, u.steps[0]) for ex, u in zip(exs, rows, strict=True)]
        row_index = torch.arange(len(rows), device=device)
        if not enc_dec:
            extra = (None, None, last, row_index)
            attr = explainer.attribute(inputs[0], baselines[0], additional_forward_args=extra)
            attrs = {"target": attr}
        elif layer is None:
            extra = (mask, last, row_index)
            attr_t, attr_s = explainer.attribute(tuple(inputs), tuple(baselines), additional_forward_args=extra)
            attrs = {"source": attr_s}
            if attribute_target:
                attrs["target"] = attr_t
        else:
            extra = (mask, last, row_index)
            attr = explainer.attribute(tuple(inputs), tuple(baselines), additional_forward_args=extra)
            attrs = {layer.sides[0]: attr}
        with torch.no_grad():
            for r, (ex, u) in enumerate(zip(exs, rows, strict=True)):
                t = u.steps[0]
                src_out, tgt_out = outputs[u.example]
                for side, value in attrs.items():
                    out = tgt_out if side == "target" else src_out
                    if out is None:
                        continue
                    n_valid = t if side == "target" else len(ex.source_ids)
                    out[:n_valid, t - ex.start] = reduce_hidden(value[r, :n_valid], req.hidden_reduction).float().cpu()
        if req.on_progress is not None:
            req.on_progress(len(rows), sum(u.length for u in rows))
    return [MethodOutput(source=s, target=t) for s, t in outputs]
