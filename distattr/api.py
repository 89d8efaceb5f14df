"""The public surface: ``load_model`` -> ``AttributionModel.attribute`` -> ``AttributionOutput``."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import engine, methods
from .models.adapters import Adapter, wrap_model
from .models.loading import LoadedModel, describe, load
from .models.petals import is_petals_spec
from .options import AttributeOptions, describe_options, option_names
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
        contrast_targets: str | Sequence[str] | None = None,
        contrast_sources: str | Sequence[str] | None = None,
        options: AttributeOptions | None = None,
        show_progress: bool = True,
        method_args: dict | None = None,
        **kwargs,
    ) -> AttributionOutput:
        """Explain each generated token of each input.

        Args:
            input_texts: one prompt (decoder-only) or source text (encoder-decoder), or a list.
            generated_texts: attribute these targets instead of generating (constrained decoding); for
                decoder-only models each must start with its input text. Token-id sequences are accepted too
                (as in ``SequenceAttribution.target_ids``: prompt included, or decoder start token first).
            contrast_targets / contrast_sources: the contrastive input of ``contrast_*`` step functions (one per
                input; sources for encoder-decoder models).
            options: an :class:`~distattr.options.AttributeOptions` (the keywords below replace its fields).
            show_progress: a progress bar (a terminal, a notebook, or a line every so often in a log).
            method_args: the method's arguments as a dict (needed for names that clash with an option, e.g.
                integrated gradients' quadrature ``{"method": "riemann_left"}``).
            **kwargs: any field of :class:`~distattr.options.AttributeOptions` (``method``, ``attributed_fn``,
                ``step_scores``, ``generation_args``, ``token_budget``... listed below); any other name is an
                argument of the method (e.g. ``n_steps=16``). Without ``method`` the model's default method and
                its default arguments are used.

        Returns:
            :class:`~distattr.results.AttributionOutput`; its ``info`` reports every option.

        Every option, with its default (see :class:`~distattr.options.AttributeOptions`):
        """
        if self.loaded.given is not None and self.loaded.given.released:
            raise RuntimeError("This AttributionModel was released: its model is no longer frozen; call "
                               "distattr.load_model(model, tokenizer=...) again to attribute with it")
        opts = self.options(options, method_args, kwargs)
        if self.loaded.source.get("kind") == "petals":  # blocks on Petals servers: no internals methods
            methods.check_remote(opts.method, opts.method_args)
        inputs = engine.Inputs.of(input_texts, generated_texts, contrast_targets, contrast_sources)
        out = engine.attribute(self.loaded, self.adapter, inputs, opts,
                               progress=progress_factory(f"Attributing with {opts.method}") if show_progress else None)
        info = {**describe(self.loaded), **out.info, "versions": versions()}
        return AttributionOutput(sequences=out.sequences, info=info)

    def options(self, options: AttributeOptions | None = None, method_args: dict | None = None,
                kwargs: dict | None = None) -> AttributeOptions:
        """The :class:`~distattr.options.AttributeOptions` of a call: ``options`` (default: this model's method
        and its arguments), with ``kwargs`` that name an option replacing it and the other ``kwargs`` plus
        ``method_args`` added to the method's arguments."""
        names = set(option_names())
        kwargs = dict(kwargs or {})
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        base = options or AttributeOptions(method=self.method, method_args=dict(self.method_args))
        method = given.get("method", base.method)
        inherited = dict(base.method_args) if method == base.method and "method_args" not in given else {}
        given["method_args"] = {**inherited, **dict(given.get("method_args") or {}), **(method_args or {}), **kwargs}
        return AttributeOptions.from_kwargs(given, base)


AttributionModel.attribute.__doc__ += describe_options(indent=12) + "\n"


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
        methods.check_remote(method, method_args)
    loaded = load(model, tokenizer, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                  quantization=quantization, revision=revision, model_kwargs=model_kwargs,
                  tokenizer_kwargs=tokenizer_kwargs)
    remote = loaded.source.get("kind") == "petals"  # remote blocks take no KV cache
    adapter = wrap_model(loaded.model, prefix_cache=not remote)
    return AttributionModel(loaded=loaded, adapter=adapter, method=method, method_args=method_args)
