"""Fixes that let the reference Inseq 0.7.1 run on transformers 5 where its code predates it (used by the parity
tests and by ``benchmarks/bench_value_zeroing.py``; neither fix changes what Inseq computes or costs)."""

from __future__ import annotations

import torch


def value_zeroing_hook_factory(original):
    """Wrap ``ValueZeroing.get_states_extract_and_patch_hook`` so that its hook also handles decoder blocks that
    return a tensor (transformers 5) instead of a tuple; ``original`` is the unpatched method."""

    def get_hook(self, block_idx, hidden_state_idx=0):
        tuple_hook = original(self, block_idx, hidden_state_idx)

        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self.corrupted_block_output_states[block_idx] = output.clone().float().detach().cpu()
                return self.clean_block_output_states[block_idx].to(output.device)
            return tuple_hook(module, args, output)

        return hook

    return get_hook
