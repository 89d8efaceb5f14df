"""A model loaded for attribution, and what loading changed on objects the user passed in.

Shared by every way of loading (:mod:`.loading` for local and hub models, :mod:`.petals` for a swarm), so that
neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ObjectState:
    """What :func:`.loading.load` changes on a model object (and tokenizer object) passed in, as it was before, so that
    :meth:`restore` can put it back: each module's ``training`` flag (``eval()``), each parameter's
    ``requires_grad`` (``requires_grad_(False)``), the tokenizer's pad token and ``config.pad_token_id`` (filled
    from EOS when unset), and the CPU repacking switch of bitsandbytes 4-bit layers."""

    training: list[tuple[torch.nn.Module, bool]]
    requires_grad: list[tuple[torch.nn.Parameter, bool]]
    tokenizer: Any
    pad_token: Any
    config_pad_token_id: Any
    cpu_repacking: list[tuple[torch.nn.Module, Any]]
    released: bool = False

    @classmethod
    def capture(cls, model: torch.nn.Module, tokenizer: Any) -> ObjectState:
        return cls(
            training=[(m, m.training) for m in model.modules()],
            requires_grad=[(p, p.requires_grad) for p in model.parameters()],
            tokenizer=tokenizer, pad_token=getattr(tokenizer, "pad_token", None),
            config_pad_token_id=getattr(model.config, "pad_token_id", None),
            cpu_repacking=[(m, m.support_avx512bf16_for_cpu) for m in model.modules()
                           if hasattr(m, "support_avx512bf16_for_cpu")],
        )

    def restore(self, model: torch.nn.Module) -> None:
        """Put back what :func:`.loading.load` changed (once; later calls do nothing)."""
        if self.released:
            return
        for module, training in self.training:
            module.training = training
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        for module, flag in self.cpu_repacking:
            module.support_avx512bf16_for_cpu = flag
        if self.tokenizer is not None and getattr(self.tokenizer, "pad_token", None) != self.pad_token:
            self.tokenizer.pad_token = self.pad_token
        model.config.pad_token_id = self.config_pad_token_id
        self.released = True


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for attribution: parameters frozen, eval mode. ``given`` holds the state of a model object
    passed in by the user, as it was (see :class:`ObjectState`); None when distattr loaded the model."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    revision: str | None = None
    source: dict = field(default_factory=dict)
    given: ObjectState | None = field(default=None, repr=False, compare=False)


def fill_special_tokens(model: torch.nn.Module, tokenizer: Any) -> None:
    """Inseq's fallbacks, so that baselines and padding always have a token to use: a tokenizer without a pad
    token gets the config's ``pad_token_id`` or else its (first) ``eos_token_id``, and a config without
    ``pad_token_id`` gets the tokenizer's."""
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if tokenizer.pad_token_id is None:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos
        if pad is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
