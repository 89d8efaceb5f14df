"""Block-wise recomputation: a forward that keeps only the hidden states between transformer blocks.

A backward through a transformer needs, per block, the inputs of every saved op (norms, projections, the
MLP's intermediate, rotary queries and keys): ``12 d + 4 d_ff`` values per token for a gated MLP, against the
``d`` of the hidden state entering the block. Inside :func:`recomputed_blocks` each block runs under
``torch.utils.checkpoint`` (non-reentrant): its forward saves its inputs only, and a backward that reaches the
block runs its forward again from those inputs with gradients enabled, pulls the cotangent through it and frees
what it recomputed before going on to the block below. The graph stays the model's own graph, so everything
else is unchanged: gradients reach the input embeddings and any hooked layer output, accelerate's device-map
hooks move the inputs of each recomputation to its block's device, bitsandbytes layers recompute their
dequantized matmuls, dropout replays its random state.

Each ``torch.autograd.grad`` call that reaches a block recomputes it once, so the gradient kernel batches as
many step backwards as memory allows into one call (``vmap`` over cotangents, ``is_grads_batched``): the
recomputation costs one forward per such call, shared by all of its steps.

Not recomputed: blocks without local weights (Petals' remote blocks keep no activations here), and forwards that
extend a KV cache (a recomputation would append to the cache twice; the kernel does not recompute rows that
start after a cached prefix).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapters import block_stack

CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past", "cache")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks recomputation applies to: the decoder's block stack and, for encoder-decoder models, the
    encoder's; blocks without local parameters (remote ones) are left out."""
    stacks = [block_stack(model)]
    if getattr(model.config, "is_encoder_decoder", False):
        stacks.append(block_stack(model.get_encoder()))
    return [block for stack in stacks for block in stack if next(block.parameters(), None) is not None]


@contextmanager
def recomputed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While open (and ``enabled``), forwards with gradients through ``model`` keep only each block's inputs and
    the backwards recompute the blocks one at a time (see the module docstring). The backwards may run after
    the block is closed: a forward run inside it is recomputed whenever its graph is differentiated."""
    if not enabled:
        yield
        return
    blocks = transformer_blocks(model)
    previous = [block.__dict__.get("forward") for block in blocks]  # accelerate's hook, or None (the class's)
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    try:
        yield
    finally:
        for block, forward in zip(blocks, previous, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled() or any(kwargs.get(name) is not None for name in CACHE_ARGUMENTS):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
