"""A causal "language model" with planted importance: token ``x_j`` adds row ``table[x_j]`` to the logits
of every position ``i >= j``, so ``logits_i = sum_{j <= i} table[x_j]`` (UNK's row is zero: a replaced token
contributes nothing). With the ``logit`` target, ``f_t = sum_{j < t} table[x_j, y_t]`` is exactly linear in
which tokens are present. Wrapped like an HF causal LM (``input_ids``/``inputs_embeds``, ``.logits`` and
``["logits"]``), so distattr's adapter and Inseq's ReAGent core can run it."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from tiny import UNK, VOCAB
from torch import nn
from transformers.modeling_outputs import CausalLMOutput


class PlantedLM(nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        table = table.clone()
        table[UNK] = 0.0
        self.table = nn.Embedding.from_pretrained(table, freeze=True)
        self.config = SimpleNamespace(is_encoder_decoder=False, vocab_size=table.shape[0])
        self.rows_seen = 0

    def get_input_embeddings(self) -> nn.Module:
        return self.table

    def forward(self, input_ids=None, inputs_embeds=None, use_cache=False, **kwargs):
        embeds = self.table(input_ids) if inputs_embeds is None else inputs_embeds
        self.rows_seen += embeds.shape[0]
        return CausalLMOutput(logits=embeds.cumsum(1))


def ids(words: str) -> torch.Tensor:
    return torch.tensor([VOCAB[w] for w in words.split()])


def request(model: PlantedLM, target_ids: torch.Tensor, start: int, attributed_fn: str = "probability",
            token_budget: int = 256):
    """A method request for one decoder-only example attributing positions ``start ..`` of ``target_ids``."""
    from distattr import engine
    from distattr.methods.base import Example, Request
    from distattr.models.adapters import DecoderOnlyAdapter
    from distattr.options import AttributeOptions

    example = Example(target_ids=target_ids, target_baseline=torch.full_like(target_ids, UNK), start=start,
                      end=len(target_ids))
    cfg = AttributeOptions(method="occlusion", attributed_fn=attributed_fn).check()
    return Request(adapter=DecoderOnlyAdapter.wrap(model), examples=[example], target_fn=engine.target_function(cfg),
                   attribute_target=True, token_budget=token_budget)
