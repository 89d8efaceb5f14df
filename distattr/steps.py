"""Step functions: one score per generation step, usable as ``step_scores`` and as the attribution target.

A step function receives a :class:`StepContext` holding the logits at the scored positions (``K`` rows,
one per (example, step) being scored) and returns a ``[K]`` tensor. The same function serves both uses:
as a step score it runs under ``no_grad`` on the plain forward; as the attributed function its output is
differentiated.

Definitions follow Inseq 0.7.1 (natural logs, softmax probabilities), except where Inseq is wrong:

* ``perplexity`` is ``exp(CE)`` (Inseq returns ``2 ** CE`` with CE in nats, mixing bases).
* ``mc_dropout_prob_avg`` is the MC-dropout predictive mean ``mean_k p_k(y)`` (Gal & Ghahramani 2016)
  and the model is put back in eval mode afterwards (Inseq returns a z-score of the deterministic
  probability against the dropout samples and leaves the model in train mode).
* ``top_p_size`` counts tokens per row (Inseq's version is only valid at batch size 1).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .arguments import check_value, parameter_hints, parse_text


@dataclass(frozen=True)
class Contrast:
    """The contrastive side of a step: logits ``[K, V]`` and the contrast target ids ``[K]``."""

    logits: torch.Tensor
    target_ids: torch.Tensor


@dataclass(frozen=True)
class StepContext:
    """What a step function sees for ``K`` scored positions.

    Attributes:
        logits: ``[K, V]`` next-token logits of the original input at each scored position.
        target_ids: ``[K]`` the token whose score is taken at each position.
        contrast: logits and targets of the contrastive input (None when no contrast was given: the
            original serves as its own contrast, as in Inseq).
        rerun: recomputes ``[K, V]`` logits with dropout active (for MC dropout); None where unavailable.
        is_attributed_fn: True when the score is being differentiated.
    """

    logits: torch.Tensor
    target_ids: torch.Tensor
    contrast: Contrast | None = None
    rerun: Callable[[], torch.Tensor] | None = None
    is_attributed_fn: bool = False

    def contrast_or_self(self) -> Contrast:
        return self.contrast if self.contrast is not None else Contrast(self.logits, self.target_ids)


StepFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class StepFunction:
    """A registered step function.

    Attributes:
        fn: ``fn(ctx, **kwargs) -> [K]``.
        merge: how values merge when tokens merge (``"prod"``, ``"sum"``, ``"mean"``, ``"absmax"``...).
        contrastive: whether it reads the contrastive input.
    """

    fn: StepFn
    merge: str = "mean"
    contrastive: bool = False


def _gather(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, ids.to(values.device).long().unsqueeze(-1)).squeeze(-1)


def logit(ctx: StepContext) -> torch.Tensor:
    """Logit of the target token."""
    return _gather(ctx.logits, ctx.target_ids)


def probability(ctx: StepContext, logprob: bool = False) -> torch.Tensor:
    """Softmax probability of the target token (log-probability with ``logprob=True``)."""
    scores = ctx.logits.log_softmax(-1) if logprob else ctx.logits.softmax(-1)
    return _gather(scores, ctx.target_ids)


def entropy(ctx: StepContext) -> torch.Tensor:
    """Entropy of the next-token distribution, in nats."""
    logp = ctx.logits.float().log_softmax(-1)
    return -(logp.exp() * logp).nan_to_num(0.0).sum(-1)


def crossentropy(ctx: StepContext) -> torch.Tensor:
    """Cross-entropy of the target token, ``-log p(y)``, in nats."""
    return F.cross_entropy(ctx.logits, ctx.target_ids.to(ctx.logits.device).long(), reduction="none")


def perplexity(ctx: StepContext) -> torch.Tensor:
    """Per-token perplexity ``exp(CE)`` (Inseq: ``2 ** CE``, a base mix-up)."""
    return crossentropy(ctx).exp()


def contrast_logits(ctx: StepContext) -> torch.Tensor:
    """Logit of the contrast target under the contrastive input."""
    c = ctx.contrast_or_self()
    return _gather(c.logits, c.target_ids)


def contrast_prob(ctx: StepContext, logprob: bool = False) -> torch.Tensor:
    """Probability of the contrast target under the contrastive input."""
    c = ctx.contrast_or_self()
    scores = c.logits.log_softmax(-1) if logprob else c.logits.softmax(-1)
    return _gather(scores, c.target_ids)


def contrast_logits_diff(ctx: StepContext) -> torch.Tensor:
    """``logit(y) - logit(y_contrast)`` (Yin & Neubig 2022)."""
    return logit(ctx) - contrast_logits(ctx).to(ctx.logits.device)


def contrast_prob_diff(ctx: StepContext, logprob: bool = False) -> torch.Tensor:
    """``p(y) - p(y_contrast)`` (Yin & Neubig 2022)."""
    return probability(ctx, logprob=logprob) - contrast_prob(ctx, logprob=logprob).to(ctx.logits.device)


def pcxmi(ctx: StepContext) -> torch.Tensor:
    """Pointwise conditional cross-mutual information ``-log2(p(y) / p_contrast(y))``."""
    return -torch.log2(probability(ctx) / contrast_prob(ctx).to(ctx.logits.device))


def in_context_pvi(ctx: StepContext) -> torch.Tensor:
    """In-context pointwise V-information ``-log p(y) + log p_contrast(y)`` (natural log, as Inseq)."""
    return -probability(ctx, logprob=True) + contrast_prob(ctx, logprob=True).to(ctx.logits.device)


def _top_p_mask(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """True where a token falls outside the smallest set whose probability reaches ``top_p``."""
    sorted_logits, order = logits.sort(descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cum > top_p
    remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()
    remove_sorted[..., :min_tokens_to_keep] = False
    return remove_sorted.scatter(-1, order, remove_sorted)


def _filter_pair(orig: torch.Tensor, contrast: torch.Tensor, top_k: int, top_p: float,
                 min_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inseq's ``filter_logits`` with its default ``"merged"`` strategy: the top-p mask, then the top-k mask, are
    computed on ``orig + contrast`` and applied to both sets of logits (so both keep the same tokens)."""
    if 0 < top_p < 1:
        mask = _top_p_mask(orig + contrast, top_p, min_keep)
        orig, contrast = orig.masked_fill(mask, float("-inf")), contrast.masked_fill(mask, float("-inf"))
    if top_k > 0:
        merged = orig + contrast
        kth = merged.topk(min(max(top_k, min_keep), merged.size(-1)), dim=-1).values[..., -1:]
        orig, contrast = orig.masked_fill(merged < kth, float("-inf")), contrast.masked_fill(merged < kth,
                                                                                            float("-inf"))
    return orig, contrast


def kl_divergence(
    ctx: StepContext, top_k: int = 0, top_p: float = 1.0, min_tokens_to_keep: int = 1,
    contrast_force_inputs: bool = False,
) -> torch.Tensor:
    """``KL(P_orig || P_contrast)`` over the next-token distributions, optionally after top-p then top-k
    filtering of both with masks computed on the summed logits (Inseq's default "merged" strategy). Filtered
    tokens contribute 0 (Inseq's ``F.kl_div`` turns them into NaN)."""
    if ctx.is_attributed_fn and not contrast_force_inputs:
        raise ValueError(
            "kl_divergence as the attribution target compares two different forward passes; pass "
            "contrast_force_inputs=True to do it anyway."
        )
    # Fix: the filter used to be computed on the original logits alone (contrast masked where the original
    # was), while Inseq masks both where ``orig + contrast`` falls outside the top-p / top-k set.
    orig, contrast = _filter_pair(ctx.logits, ctx.contrast_or_self().logits.to(ctx.logits.device), top_k, top_p,
                                  min_tokens_to_keep)
    logp, logq = orig.log_softmax(-1), contrast.log_softmax(-1)
    terms = logp.exp() * (logp - logq)
    return terms.nan_to_num(0.0).sum(-1)


def mc_dropout_prob_avg(ctx: StepContext, n_mcd_steps: int = 5, logprob: bool = False) -> torch.Tensor:
    """MC-dropout predictive mean ``(1/n) sum_k p_k(y)`` over ``n_mcd_steps`` dropout forwards."""
    if ctx.rerun is None:
        raise ValueError("mc_dropout_prob_avg needs a model forward it can rerun with dropout")
    samples = []
    for _ in range(n_mcd_steps):
        logits = ctx.rerun()
        scores = logits.log_softmax(-1) if logprob else logits.softmax(-1)
        samples.append(_gather(scores, ctx.target_ids))
    return torch.stack(samples).mean(0)


def top_p_size(ctx: StepContext, top_p: float = 0.9) -> torch.Tensor:
    """Number of tokens in the nucleus of probability ``top_p`` at each step."""
    return (~_top_p_mask(ctx.logits, top_p, 1)).sum(-1).to(ctx.logits.dtype)


STEP_FUNCTIONS: dict[str, StepFunction] = {
    "logit": StepFunction(logit, merge="sum"),
    "probability": StepFunction(probability, merge="prod"),
    "entropy": StepFunction(entropy, merge="sum"),
    "crossentropy": StepFunction(crossentropy, merge="sum"),
    "perplexity": StepFunction(perplexity, merge="prod"),
    "contrast_logits": StepFunction(contrast_logits, merge="sum", contrastive=True),
    "contrast_prob": StepFunction(contrast_prob, merge="prod", contrastive=True),
    "contrast_logits_diff": StepFunction(contrast_logits_diff, merge="sum", contrastive=True),
    # Inseq merges contrast_prob_diff with prod, which flips the sign of two negative differences; a sum is
    # exact for logprob=True (log p(w) - log q(w)) and first order otherwise.
    "contrast_prob_diff": StepFunction(contrast_prob_diff, merge="sum", contrastive=True),
    "pcxmi": StepFunction(pcxmi, merge="sum", contrastive=True),
    "kl_divergence": StepFunction(kl_divergence, merge="sum", contrastive=True),
    "in_context_pvi": StepFunction(in_context_pvi, merge="sum", contrastive=True),
    "mc_dropout_prob_avg": StepFunction(mc_dropout_prob_avg, merge="prod"),
    "top_p_size": StepFunction(top_p_size, merge="sum"),
}
BUILTIN_STEP_FUNCTIONS = frozenset(STEP_FUNCTIONS)  # what every process has without plugins


def register_step_function(
    fn: StepFn, name: str, *, merge: str = "mean", contrastive: bool = False, overwrite: bool = False
) -> None:
    """Register ``fn(ctx: StepContext, **kwargs) -> Tensor[K]`` under ``name``."""
    if not callable(fn):
        raise TypeError("A step function must be callable")
    if name in STEP_FUNCTIONS and not overwrite:
        raise ValueError(f"Step function {name!r} exists; pass overwrite=True to replace it")
    if name in BUILTIN_STEP_FUNCTIONS and overwrite:
        raise ValueError(f"{name!r} is built in and cannot be replaced")
    STEP_FUNCTIONS[name] = StepFunction(fn, merge=merge, contrastive=contrastive)


def get_step_function(name: str) -> StepFunction:
    try:
        return STEP_FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"Unknown step function {name!r}. Available: {', '.join(sorted(STEP_FUNCTIONS))}"
        ) from None


def step_parameters(name: str) -> dict[str, object] | None:
    """The keyword parameters of step function ``name`` after its context, ``{name: type hint}`` (``Any`` where
    unannotated); None when it takes ``**kwargs`` (any name goes)."""
    fn = get_step_function(name).fn
    params = list(inspect.signature(fn).parameters.values())[1:]  # the first one receives the StepContext
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    hints = parameter_hints(fn)
    return {p.name: hints.get(p.name, inspect.Parameter.empty) for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def _check_names(name: str, params: dict | None, kwargs) -> None:
    if params is None:
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = ", ".join(sorted(params)) or "none"
        raise ValueError(f"Unknown argument(s) {unknown} for step function {name!r}. Valid arguments: {valid}")


def check_step_args(name: str, kwargs: dict) -> dict:
    """Validate ``kwargs`` for step function ``name``: known parameter names, values of their annotated types
    (``logprob="no"`` is an error, not True). Returns ``kwargs``."""
    params = step_parameters(name)
    _check_names(name, params, kwargs)
    for key, value in kwargs.items():
        check_value(f"{name} argument {key}", value, (params or {}).get(key, inspect.Parameter.empty))
    return kwargs


def parse_step_args(name: str, texts: dict[str, str]) -> dict:
    """Command-line ``{key: text}`` -> ``{key: value}`` for step function ``name``, read against its parameters'
    types (``logprob=no`` -> False, ``top_p=0.5`` -> 0.5); unannotated parameters read the text as JSON."""
    params = step_parameters(name)
    _check_names(name, params, texts)
    hints = params or {}
    values = {key: parse_text(f"{name} argument {key}", text, hints.get(key, inspect.Parameter.empty))
              for key, text in texts.items()}
    return check_step_args(name, values)


def list_step_functions() -> list[str]:
    return sorted(STEP_FUNCTIONS)
