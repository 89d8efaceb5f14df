"""Parity of distattr with the real Inseq 0.7.1 package.

Every comparison runs Inseq at batch size 1 with eager attention (the tiny models are eager; the embedded
SmolLM2 is loaded eager) on exactly the tokens distattr explains: distattr generates, and its
``info["generated_texts"]`` go to Inseq as ``generated_texts`` (constrained decoding).

Token-level matrices are compared raw: ours are already L2-reduced over the hidden size
(``hidden_reduction="vnorm"``); Inseq's raw ``[tokens, steps, hidden]`` tensors are reduced the same way here.
Deterministic methods must agree within ``1e-4`` of each column's L1 norm (:func:`assert_columns_close`).

Where Inseq is wrong distattr deliberately differs (``perplexity``, ``mc_dropout_prob_avg``, Marian's
decoder embeddings); those tests show the difference instead of parity. Inseq 0.7.1 bugs met on the way, each
pinned by a test so that a fixed Inseq shows up: its layer IG / layer DeepLIFT ignore the baseline (all zeros;
compared with Inseq's algorithm run through Captum instead), its ``crossentropy`` (and so ``perplexity``) crashes
on a single sequence, and its ``kl_divergence`` is NaN under top-p / top-k filtering.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from tiny import DECODER_ONLY, tiny_model

import distattr

inseq = pytest.importorskip("inseq")

logging.getLogger("inseq").setLevel(logging.ERROR)
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]

TINY = ("gpt2", "llama", "t5", "bart")
ENC_DEC = ("t5", "bart")
PROMPT = "the cat is located in the city of"
PROMPTS = ("the cat is located in the city of", "paris is a big city in", "she said that the dog was not red and")
# a decoder module of each tiny model, for the layer methods
LAYER = {"gpt2": "transformer.h.0.mlp", "llama": "model.layers.0.mlp"}
REL = 1e-4


# ---------------------------------------------------------------- helpers




def assert_columns_close(ours, theirs, rel: float = REL, atol: float = 1e-9, what: str = "") -> None:
    """``|a - b| <= rel * L1(column of b) + atol`` everywhere, with NaN at the same positions.

    A column is one generated step (axis 1) of one trailing index (e.g. a layer and head): the L1 norm is
    taken over the token axis (axis 0), as Inseq's column normalisation does.
    """
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(theirs, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shapes differ: ours {a.shape}, Inseq {b.shape}"
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    assert (nan_a == nan_b).all(), f"{what}: NaN positions differ:\nours\n{nan_a}\nInseq\n{nan_b}"
    a, b = np.where(nan_a, 0.0, a), np.where(nan_b, 0.0, b)
    tol = rel * np.abs(b).sum(axis=0, keepdims=True) + atol
    bad = np.abs(a - b) > tol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {a.size} values differ; worst |a-b|/tol "
        f"{float((np.abs(a - b) / tol).max()):.3g}"
        f"\nours\n{a}\nInseq\n{b}"
    )


def vnorm(x) -> np.ndarray | None:
    """Inseq's raw ``[tokens, steps, hidden]`` -> token level, as distattr reports it."""
    if x is None:
        return None
    return torch.linalg.vector_norm(x.float(), ord=2, dim=-1).numpy()


def hsum(x) -> np.ndarray | None:
    return None if x is None else x.double().sum(-1).numpy()


def raw(x) -> np.ndarray | None:
    return None if x is None else x.float().numpy()


def inseq_attribute(model, tok, method: str, texts, generated, load_args: dict | None = None, batch_size: int = 1,
                    **kwargs):
    """Inseq (batch size 1 unless told) on the given model objects; returns its ``FeatureAttributionOutput``."""
    im = inseq.load_model(model, method, tokenizer=tok, **(load_args or {}))
    if not model.config.is_encoder_decoder:
        kwargs.pop("attribute_target", None)  # Inseq warns and ignores it for decoder-only models
    return im.attribute(list(texts) if not isinstance(texts, str) else texts, generated, batch_size=batch_size,
                        show_progress=False, **kwargs)


def ours_attribute(model, tok, method: str, texts, generated=None, max_new_tokens: int = 5, **kwargs):
    dm = distattr.load_model(model, method, tokenizer=tok)
    gen = None if generated is not None else {"max_new_tokens": max_new_tokens}
    return dm.attribute(texts, generated, generation_args=gen, show_progress=False, **kwargs)


def compare(ours, theirs, reduce=vnorm, step_scores=(), rel: float = REL, what: str = "") -> None:
    """Same tokens, positions, matrices and step scores in every sequence."""
    assert len(ours) == len(theirs.sequence_attributions)
    for i, (s, t) in enumerate(zip(ours, theirs.sequence_attributions, strict=True)):
        label = f"{what} seq {i}"
        # Inseq shows contrastive steps as "contrast → target"
        assert list(s.target_tokens) == [x.token.split(" → ")[-1] for x in t.target], label
        assert list(s.source_tokens) == [x.token for x in t.source], label
        assert (s.attr_pos_start, s.attr_pos_end) == (t.attr_pos_start, t.attr_pos_end), label
        for side in ("source", "target"):
            a, b = getattr(s, f"{side}_attributions"), reduce(getattr(t, f"{side}_attributions"))
            assert (a is None) == (b is None), f"{label} {side}: ours {a is None}, Inseq {b is None}"
            if a is not None:
                assert np.isfinite(b).any() and np.nanmax(np.abs(b)) > 0, f"{label} {side}: empty reference"
                assert_columns_close(a, b, rel=rel, what=f"{label} {side}")
        for name in step_scores:
            np.testing.assert_allclose(s.step_scores[name], t.step_scores[name].float().numpy(), rtol=1e-4,
                                       atol=1e-6, err_msg=f"{label} step score {name}")


def target_kw(kind: str, attribute_target: bool = True) -> dict:
    return {"attribute_target": attribute_target} if kind in ENC_DEC else {}


def contrast_for(kind: str, generated: str) -> str:
    """A contrastive target of the same length: every generated word replaced by another one."""
    words = generated.split()
    n_prompt = 0 if kind in ENC_DEC else len(PROMPT.split())
    swap = {"rome": "london", "london": "rome"}
    return " ".join(words[:n_prompt] + [swap.get(w, "rome") for w in words[n_prompt:]])


# ---------------------------------------------------------------- the helper itself


def test_assert_columns_close_can_fail():
    b = np.array([[1.0, np.nan], [3.0, 2.0]])
    assert_columns_close(b + np.array([[3e-4, np.nan], [0.0, 1e-4]]), b)  # within 1e-4 * (4, 2)
    with pytest.raises(AssertionError):
        assert_columns_close(b + np.array([[5e-4, 0.0], [0.0, 0.0]]), b)  # above 1e-4 * 4
    with pytest.raises(AssertionError):
        assert_columns_close(np.array([[1.0, 0.0], [3.0, 2.0]]), b)  # NaN missing
    with pytest.raises(AssertionError):
        assert_columns_close(b[:1], b)  # shape


# ---------------------------------------------------------------- deterministic gradient methods, tiny models


GRADIENT_CASES = [(k, m, at) for k in TINY for m in ("saliency", "input_x_gradient", "integrated_gradients", "deeplift")
                  for at in ((True, False) if k in ENC_DEC else (True,))]


@pytest.mark.parametrize(("kind", "method", "attribute_target"), GRADIENT_CASES)
def test_gradient_methods_match_inseq(kind, method, attribute_target):
    args = {"n_steps": 8, "return_convergence_delta": True} if method == "integrated_gradients" else {}
    model, tok = tiny_model(kind)
    ours = ours_attribute(model, tok, method, PROMPT, step_scores=["probability"],
                          **target_kw(kind, attribute_target), **args)
    theirs = inseq_attribute(*tiny_model(kind), method, PROMPT, ours.info["generated_texts"],
                             step_scores=["probability"], **target_kw(kind, attribute_target), **args)
    compare(ours, theirs, step_scores=["probability"], what=f"{kind} {method}")
    if method == "integrated_gradients":
        d_ours, d_theirs = ours[0].deltas, theirs.sequence_attributions[0].step_scores["deltas"].numpy()
        assert d_ours is not None and d_ours.shape == d_theirs.shape
        np.testing.assert_allclose(d_ours, d_theirs, rtol=1e-3, atol=1e-5)


# Inseq's SIG moves position idx of every attributed input at once and asserts they have the same length, so
# encoder-decoder parity is checked with the source only (distattr also handles source + target, one token a path).
SIG_CASES = [(k, at) for k in TINY for at in ((False,) if k in ENC_DEC else (True,))]


@pytest.mark.parametrize(("kind", "attribute_target"), SIG_CASES)
def test_sequential_integrated_gradients_match_inseq(kind, attribute_target):
    args = {"n_steps": 6}
    model, tok = tiny_model(kind)
    ours = ours_attribute(model, tok, "sequential_integrated_gradients", PROMPT, max_new_tokens=4,
                          **target_kw(kind, attribute_target), **args)
    theirs = inseq_attribute(*tiny_model(kind), "sequential_integrated_gradients", PROMPT, ours.info["generated_texts"],
                             **target_kw(kind, attribute_target), **args)
    compare(ours, theirs, what=f"{kind} sequential_integrated_gradients")


def test_sequential_integrated_gradients_follow_the_definition():
    """SIG_j = (x_j - b_j) . sum_k w_k df/dx_j(x with only x_j moved to b_j + a_k (x_j - b_j)), computed here by
    plain autograd for every step and token of a tiny GPT-2 and compared (signed sums over the hidden size)."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    model, tok = tiny_model("gpt2")
    n = 5
    out = ours_attribute(model, tok, "sequential_integrated_gradients", PROMPT, max_new_tokens=3, n_steps=n,
                         hidden_reduction="sum")
    seq = out[0]
    ids = torch.tensor(seq.target_ids)
    x = model.get_input_embeddings()(ids).detach()
    base_ids = torch.where(ids == tok.eos_token_id, ids, torch.full_like(ids, tok.unk_token_id))
    b = model.get_input_embeddings()(base_ids).detach()
    step_sizes, alphas = approximation_parameters("gausslegendre")
    weights, alphas = step_sizes(n), alphas(n)
    for c, t in enumerate(range(seq.attr_pos_start, seq.attr_pos_end)):
        for j in range(t):
            total = torch.zeros(x.shape[-1])
            for w, a in zip(weights, alphas, strict=True):
                z = x[:t].clone()
                z[j] = b[j] + a * (x[j] - b[j])
                z.requires_grad_(True)
                prob = model(inputs_embeds=z[None]).logits[0, t - 1].softmax(-1)[ids[t]]
                (grad,) = torch.autograd.grad(prob, z)
                total += w * grad[j]
            expected = float(((x[j] - b[j]) * total).sum())
            assert seq.target_attributions[j, c] == pytest.approx(expected, rel=1e-4, abs=1e-7), (j, t)


@pytest.mark.parametrize(("kind", "attribute_target"), [(k, at) for k in TINY
                                                     for at in ((True, False) if k in ENC_DEC else (True,))])
def test_discretized_integrated_gradients_match_inseq(kind, attribute_target, tmp_path):
    """Same anchors (k-NN by brute force here, scikit-learn's graph in Inseq), same monotonic paths, same sums.
    Inseq caches its k-NN graph on disk by model name (the same for every tiny model): a fresh cache_dir each."""
    args = {"n_steps": 6}
    model, tok = tiny_model(kind)
    ours = ours_attribute(model, tok, "discretized_integrated_gradients", PROMPT, max_new_tokens=4,
                          **target_kw(kind, attribute_target), **args)
    theirs = inseq_attribute(*tiny_model(kind), "discretized_integrated_gradients", PROMPT,
                             ours.info["generated_texts"], load_args={"cache_dir": tmp_path},
                             **target_kw(kind, attribute_target), **args)
    compare(ours, theirs, what=f"{kind} discretized_integrated_gradients")


@pytest.mark.parametrize("kind", ("gpt2", "t5"))
def test_integrated_gradients_quadrature_matches_inseq(kind):
    """Another Captum quadrature and ``internal_batch_size`` (``method`` clashes with ``attribute(method=)`` on both
    sides, hence the argument dicts)."""
    args = {"n_steps": 5, "method": "riemann_trapezoid", "internal_batch_size": 2, "return_convergence_delta": True}
    model, tok = tiny_model(kind)
    dm = distattr.load_model(model, "integrated_gradients", tokenizer=tok)
    ours = dm.attribute(PROMPT, generation_args={"max_new_tokens": 5}, method_args=args, show_progress=False,
                        **target_kw(kind))
    theirs = inseq_attribute(*tiny_model(kind), "integrated_gradients", PROMPT, ours.info["generated_texts"],
                             attribution_args=args, **target_kw(kind))
    compare(ours, theirs, what=f"{kind} riemann_trapezoid")
    np.testing.assert_allclose(ours[0].deltas, theirs.sequence_attributions[0].step_scores["deltas"].numpy(),
                               rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------- layer methods


@pytest.mark.parametrize(("kind", "layer"), [("gpt2", LAYER["gpt2"]), ("llama", LAYER["llama"]),
                                           ("bart", "model.encoder.layers.0.fc2")])
def test_layer_gradient_x_activation_matches_inseq(kind, layer):
    model, tok = tiny_model(kind)
    ours = ours_attribute(model, tok, "layer_gradient_x_activation", PROMPT, target_layer=layer)
    model2, tok2 = tiny_model(kind)
    theirs = inseq_attribute(model2, tok2, "layer_gradient_x_activation", PROMPT, ours.info["generated_texts"],
                             load_args={"target_layer": model2.get_submodule(layer)})
    compare(ours, theirs, what=f"{kind} layer_gradient_x_activation")


class _NextTokenProbs(torch.nn.Module):
    """``ids [B, L]`` -> next-token probabilities ``[B, V]`` at the last position (Inseq's attributed function)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits[:, -1].softmax(-1)


def captum_layer_reference(kind: str, method: str, layer: str, target_ids: list[int], start: int, n_steps: int):
    """Inseq's per-step loop for a decoder-only model, run directly with Captum: one call per step on the prefix,
    UNK baseline ids with EOS kept, the probability of the next token as target. Returns ``[tokens, steps]``."""
    from captum.attr import LayerDeepLift, LayerIntegratedGradients

    model, tok = tiny_model(kind)
    scorer = _NextTokenProbs(model)
    module = model.get_submodule(layer)
    explainer = (LayerIntegratedGradients(scorer, module) if method == "layer_integrated_gradients"
                 else LayerDeepLift(scorer, module))
    ids = torch.tensor(target_ids)
    base = torch.where(ids == tok.eos_token_id, ids, torch.full_like(ids, tok.unk_token_id))
    out = np.full((len(ids), len(ids) - start), np.nan)
    for col, t in enumerate(range(start, len(ids))):
        kwargs = {"n_steps": n_steps} if method == "layer_integrated_gradients" else {}
        attr = explainer.attribute(ids[None, :t], baselines=base[None, :t], target=int(ids[t]), **kwargs)
        out[:t, col] = torch.linalg.vector_norm(attr[0].detach(), dim=-1).numpy()
    return out


@pytest.mark.parametrize(("kind", "method"), [(k, m) for k in DECODER_ONLY
                                              for m in ("layer_integrated_gradients", "layer_deeplift")])
def test_layer_baseline_methods_match_inseqs_algorithm(kind, method):
    """Inseq 0.7.1's layer methods feed the model the real ids whatever Captum passes (its forward reads
    ``input_ids`` from the extra arguments when ``use_embeddings=False``), so the baseline is silently replaced by
    the input: ``h(b) == h(x)`` and layer IG / layer DeepLIFT are identically zero. We compare with Inseq's own
    per-step loop run through Captum with the baseline honoured, and show Inseq's zeros."""
    args = {"n_steps": 8} if method == "layer_integrated_gradients" else {}
    model, tok = tiny_model(kind)
    ours = ours_attribute(model, tok, method, PROMPT, target_layer=LAYER[kind], **args)
    s = ours[0]
    reference = captum_layer_reference(kind, method, LAYER[kind], list(s.target_ids), s.attr_pos_start,
                                       args.get("n_steps", 0))
    assert np.nanmax(reference) > 1e-3
    assert_columns_close(s.target_attributions, reference, what=f"{kind} {method}")

    model2, tok2 = tiny_model(kind)
    theirs = inseq_attribute(model2, tok2, method, PROMPT, ours.info["generated_texts"],
                             load_args={"target_layer": model2.get_submodule(LAYER[kind])}, **args)
    t = vnorm(theirs.sequence_attributions[0].target_attributions)
    assert np.array_equal(np.isnan(t), np.isnan(reference))
    assert np.nanmax(np.abs(t)) == 0.0  # Inseq's bug; if this starts failing, Inseq was fixed: compare directly


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("kind", TINY)
def test_attention_matches_inseq(kind):
    model, tok = tiny_model(kind)
    ours = ours_attribute(model, tok, "attention", PROMPT, **target_kw(kind))
    assert ours[0].dims == ("layer", "head")
    theirs = inseq_attribute(*tiny_model(kind), "attention", PROMPT, ours.info["generated_texts"], **target_kw(kind))
    # Inseq's raw attention is [tokens, steps, layers, heads], as ours
    compare(ours, theirs, reduce=raw, what=f"{kind} attention")


# ---------------------------------------------------------------- step scores and contrastive targets


STEP_SCORES = ("probability", "entropy", "crossentropy", "logit", "contrast_prob_diff", "kl_divergence", "pcxmi",
               "in_context_pvi", "top_p_size")


@pytest.mark.parametrize("kind", TINY)
def test_step_scores_match_inseq(kind):
    model, tok = tiny_model(kind)
    generated = ours_attribute(model, tok, "saliency", PROMPT).info["generated_texts"][0]
    contrast = contrast_for(kind, generated)
    top_p = 0.5
    ours = ours_attribute(model, tok, "saliency", PROMPT, generated, step_scores=STEP_SCORES,
                          contrast_targets=contrast, step_scores_args={"top_p_size": {"top_p": top_p}})
    # Inseq's crossentropy crashes on a single sequence (its 0-d target ids reach F.cross_entropy): ours is
    # compared with -log of Inseq's probability here, and with Inseq's crossentropy on a batch of two below.
    # Inseq passes top_p to every step function taking it, and its kl_divergence is NaN under any filtering
    # (test_kl_divergence_filtering): kl_divergence runs unfiltered in a second call.
    scores_1 = [n for n in STEP_SCORES if n not in ("crossentropy", "kl_divergence")]
    theirs = inseq_attribute(*tiny_model(kind), "saliency", PROMPT, generated, step_scores=scores_1,
                             contrast_targets=contrast, top_p=top_p)
    compare(ours, theirs, step_scores=scores_1, what=f"{kind} step scores")
    theirs_kl = inseq_attribute(*tiny_model(kind), "saliency", PROMPT, generated, step_scores=["kl_divergence"],
                                contrast_targets=contrast)
    compare(ours, theirs_kl, step_scores=["kl_divergence"], what=f"{kind} kl_divergence")
    scores = ours[0].step_scores
    np.testing.assert_allclose(scores["crossentropy"],
                               -np.log(theirs.sequence_attributions[0].step_scores["probability"].double().numpy()),
                               rtol=1e-4, atol=1e-6)
    # the contrast is real: the contrastive scores are not those of the original
    assert np.abs(scores["contrast_prob_diff"]).max() > 1e-3 and scores["kl_divergence"].max() > 1e-3
    assert (scores["top_p_size"] >= 1).all() and (scores["top_p_size"] > 1).any()


def _step_logits(model, ids, positions, source=None, tok=None) -> torch.Tensor:
    """Next-token logits ``[n, V]`` read at ``positions`` of a plain forward from token ids (``source``: the
    encoder input, as text or ids)."""
    with torch.no_grad():
        if source is None:
            logits = model(input_ids=torch.tensor([list(ids)])).logits[0]
        else:
            src = tok(source)["input_ids"] if isinstance(source, str) else list(source)
            logits = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([list(ids)])).logits[0]
    return logits[list(positions)]


def _probabilities(model, ids, start: int, end: int, source=None, tok=None, targets=None) -> np.ndarray:
    """``p(targets[t] | ids[:t])`` for ``start <= t < end`` from a plain forward (``targets`` defaults to ``ids``)."""
    targets = list(ids if targets is None else targets)
    logits = _step_logits(model, ids, range(start - 1, end - 1), source, tok)
    return logits.double().softmax(-1).gather(-1, torch.tensor(targets[start:end])[:, None])[:, 0].numpy()


@pytest.mark.parametrize("kind", ("gpt2", "bart"))
def test_kl_divergence_filtering(kind):
    """With top-p / top-k filtering Inseq's KL is NaN (``F.kl_div`` computes ``0 * (-inf - -inf)`` on the filtered
    tokens); ours drops those terms. Both filter with Inseq's default "merged" strategy: the masks are computed on
    ``orig + contrast`` logits and applied to both."""
    from inseq.utils.torch_utils import filter_logits

    model, tok = tiny_model(kind)
    generated = ours_attribute(model, tok, "saliency", PROMPT).info["generated_texts"][0]
    contrast = contrast_for(kind, generated)
    filters = {"top_p": 0.6, "top_k": 5}
    ours = ours_attribute(model, tok, "saliency", PROMPT, generated, step_scores=["kl_divergence"],
                          contrast_targets=contrast, step_scores_args={"kl_divergence": filters})
    s = ours[0]
    positions = range(s.attr_pos_start - 1, s.attr_pos_end - 1)
    source = PROMPT if kind in ENC_DEC else None
    c_ids = list(s.target_ids[:1]) + tok(text_target=contrast)["input_ids"] if kind in ENC_DEC else tok(contrast)[
        "input_ids"]
    orig = _step_logits(model, list(s.target_ids), positions, source, tok)
    other = _step_logits(model, c_ids, positions, source, tok)
    f_orig, f_other = filter_logits(orig, other, **filters)
    logp, logq = f_orig.log_softmax(-1), f_other.log_softmax(-1)
    expected = (logp.exp() * (logp - logq)).nan_to_num(0.0).sum(-1).numpy()
    assert np.isfinite(s.step_scores["kl_divergence"]).all()
    np.testing.assert_allclose(s.step_scores["kl_divergence"], expected, rtol=1e-4, atol=1e-6)
    assert expected.max() > 1e-3
    theirs = inseq_attribute(*tiny_model(kind), "saliency", PROMPT, generated, step_scores=["kl_divergence"],
                             contrast_targets=contrast, **filters)
    assert np.isnan(theirs.sequence_attributions[0].step_scores["kl_divergence"].numpy()).all()


@pytest.mark.parametrize(("kind", "attribute_target"),
                         [(k, at) for k in TINY for at in ((True, False) if k in ENC_DEC else (True,))])
def test_contrastive_attribution_matches_inseq(kind, attribute_target):
    model, tok = tiny_model(kind)
    generated = ours_attribute(model, tok, "saliency", PROMPT).info["generated_texts"][0]
    contrast = contrast_for(kind, generated)
    kw = {"attributed_fn": "contrast_prob_diff", "step_scores": ["contrast_prob_diff"],
          **target_kw(kind, attribute_target)}
    ours = ours_attribute(model, tok, "input_x_gradient", PROMPT, generated, contrast_targets=contrast, **kw)
    theirs = inseq_attribute(*tiny_model(kind), "input_x_gradient", PROMPT, generated, contrast_targets=contrast,
                             **kw)
    compare(ours, theirs, step_scores=["contrast_prob_diff"], what=f"{kind} contrastive")
    # and it is not the plain probability's attribution
    plain = ours_attribute(model, tok, "input_x_gradient", PROMPT, generated, **target_kw(kind, attribute_target))
    with pytest.raises(AssertionError):
        assert_columns_close(plain[0].source_attributions if kind in ENC_DEC else plain[0].target_attributions,
                             ours[0].source_attributions if kind in ENC_DEC else ours[0].target_attributions)


@pytest.mark.parametrize("kind", TINY)
def test_contrast_force_inputs(kind):
    """``contrast_force_inputs``: the contrastive term comes from a forward of the contrastive input, which ours
    treats as a constant. Inseq does the same for decoder-only models (it runs that forward from ids), so both agree
    there, and for encoder-decoder models on a contrastive source when only the source is attributed. With the
    target attributed, Inseq's encoder-decoder contrastive forward reuses the attributed decoder embeddings (the
    prefix is shared) and differentiates through them too; ours then equals Inseq's attribution of the
    non-contrastive probability, since the constant contrastive term has no gradient."""
    model, tok = tiny_model(kind)
    generated = ours_attribute(model, tok, "saliency", PROMPT).info["generated_texts"][0]
    contrast = ({"contrast_sources": "the dog is located in the city of"} if kind in ENC_DEC
                else {"contrast_targets": contrast_for(kind, generated)})
    kw = {"attributed_fn": "contrast_prob_diff", "contrast_force_inputs": True,
          "step_scores": ["contrast_prob_diff", "pcxmi", "kl_divergence"], **contrast}
    ours = ours_attribute(model, tok, "input_x_gradient", PROMPT, generated, **kw)
    theirs = inseq_attribute(*tiny_model(kind), "input_x_gradient", PROMPT, generated, **kw)
    compare(ours, theirs, step_scores=kw["step_scores"], what=f"{kind} contrast_force_inputs")
    assert np.abs(ours[0].step_scores["pcxmi"]).max() > 0.1
    if kind in ENC_DEC:
        ours_t = ours_attribute(model, tok, "input_x_gradient", PROMPT, generated, attribute_target=True, **kw)
        theirs_t = inseq_attribute(*tiny_model(kind), "input_x_gradient", PROMPT, generated, attribute_target=True,
                                   **kw)
        with pytest.raises(AssertionError, match="target"):
            compare(ours_t, theirs_t, what="Inseq differentiates the contrastive forward")
        plain = inseq_attribute(*tiny_model(kind), "input_x_gradient", PROMPT, generated, attribute_target=True)
        compare(ours_t, plain, what=f"{kind} fixed contrastive term")


# ---------------------------------------------------------------- where distattr deliberately differs


@pytest.mark.parametrize("kind", ENC_DEC)
def test_perplexity_is_exp_of_crossentropy(kind):
    """Ours is ``exp(CE)``; Inseq's is ``2 ** CE`` with CE in nats. Inseq's crossentropy (which its perplexity
    calls) crashes on a single sequence, so Inseq runs on a batch of two here (encoder-decoder models, where
    Inseq batches constrained decoding)."""
    model, tok = tiny_model(kind)
    names = ["crossentropy", "perplexity", "probability"]
    ours = ours_attribute(model, tok, "saliency", list(PROMPTS[:2]), step_scores=names)
    theirs = inseq_attribute(*tiny_model(kind), "saliency", list(PROMPTS[:2]), ours.info["generated_texts"],
                             step_scores=names, batch_size=2)
    for s, t in zip(ours, theirs.sequence_attributions, strict=True):
        ce = t.step_scores["crossentropy"].double().numpy()
        np.testing.assert_allclose(s.step_scores["crossentropy"], ce, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(s.step_scores["perplexity"], np.exp(ce), rtol=1e-4)
        np.testing.assert_allclose(t.step_scores["perplexity"].numpy(), 2.0**ce, rtol=1e-4)
        assert (s.step_scores["perplexity"] > 1.5 * t.step_scores["perplexity"].numpy()).all()  # e^CE vs 2^CE


def test_mc_dropout_prob_avg_is_predictive_mean_and_restores_eval():
    """Ours is the MC-dropout predictive mean ``mean_k p_k(y)`` and leaves the model in eval mode; Inseq returns a
    z-score of the deterministic probability against the dropout samples and leaves the model in train mode."""
    model, tok = tiny_model("gpt2")  # GPT-2 has dropout (0.1); the tiny Llama has none
    generated = ours_attribute(model, tok, "saliency", PROMPT).info["generated_texts"][0]
    n = 64
    torch.manual_seed(0)
    ours = ours_attribute(model, tok, "saliency", PROMPT, generated, step_scores=["mc_dropout_prob_avg", "probability"],
                          step_scores_args={"mc_dropout_prob_avg": {"n_mcd_steps": n}})
    assert not any(m.training for m in model.modules())
    s = ours[0]
    mc = s.step_scores["mc_dropout_prob_avg"]
    assert ((mc > 0) & (mc < 1)).all()
    # an independent Monte Carlo estimate of the same expectation: dropout forwards of the whole sequence
    positions = range(s.attr_pos_start - 1, s.attr_pos_end - 1)
    targets = torch.tensor(s.target_ids[s.attr_pos_start : s.attr_pos_end])
    model.train()
    torch.manual_seed(1)
    samples = torch.stack([_step_logits(model, list(s.target_ids), positions, None, tok).softmax(-1)
                           .gather(-1, targets[:, None])[:, 0] for _ in range(n)]).double()
    model.eval()
    mean, se = samples.mean(0).numpy(), (samples.std(0) / math.sqrt(n)).numpy()
    assert (se > 0).all()  # dropout is active
    assert (np.abs(mc - mean) <= 5 * math.sqrt(2) * se + 1e-6).all()
    # and it is not the deterministic probability
    assert not np.allclose(mc, s.step_scores["probability"], rtol=1e-3)

    model2, tok2 = tiny_model("gpt2")
    theirs = inseq_attribute(model2, tok2, "saliency", PROMPT, generated, step_scores=["mc_dropout_prob_avg"],
                             n_mcd_steps=8)
    assert model2.training  # Inseq leaves dropout on
    z = theirs.sequence_attributions[0].step_scores["mc_dropout_prob_avg"].numpy()
    assert not np.allclose(z, mc, rtol=0.1)


def test_marian_probability_matches_the_models_own_forward():
    """In transformers 5 the Marian decoder multiplies given ``decoder_inputs_embeds`` by ``embed_scale`` again, so
    Inseq (which passes scaled embeddings) double-scales them and its probabilities are wrong. Ours equal the
    probabilities of the model's own forward from token ids."""
    model, tok = tiny_model("marian")
    ours = ours_attribute(model, tok, "saliency", PROMPT, step_scores=["probability"], attribute_target=True)
    s = ours[0]
    positions = range(s.attr_pos_start - 1, s.attr_pos_end - 1)
    targets = torch.tensor(s.target_ids[s.attr_pos_start : s.attr_pos_end])
    expected = _step_logits(model, list(s.target_ids), positions, PROMPT, tok).softmax(-1).gather(
        -1, targets[:, None])[:, 0].numpy()
    np.testing.assert_allclose(s.step_scores["probability"], expected, rtol=1e-4, atol=1e-7)
    theirs = inseq_attribute(*tiny_model("marian"), "saliency", PROMPT, ours.info["generated_texts"],
                             step_scores=["probability"], attribute_target=True)
    p_inseq = theirs.sequence_attributions[0].step_scores["probability"].numpy()
    assert np.abs(p_inseq - expected).max() > 1e-3


def test_marian_gradients_are_wrt_scaled_embeddings():
    """Our Marian saliency is the gradient of the model's own forward w.r.t. the scaled embeddings (Inseq's
    convention), although the model is fed ``scaled / scale`` to undo its second scaling."""
    model, tok = tiny_model("marian")
    ours = ours_attribute(model, tok, "saliency", PROMPT, attribute_target=True)
    s = ours[0]
    model, _ = tiny_model("marian")  # a fresh copy: ours froze the parameters of the first
    scale = model.get_encoder().embed_scale
    src = tok(PROMPT, return_tensors="pt")["input_ids"]
    ids = torch.tensor([s.target_ids])
    for col, t in enumerate(range(s.attr_pos_start, s.attr_pos_end)):
        captured = {}

        def keeper(side, captured=captured):
            def keep(module, args, output):
                output.retain_grad()
                captured[side] = output
            return keep

        hooks = [model.get_encoder().embed_tokens.register_forward_hook(keeper("source")),
                 model.get_decoder().embed_tokens.register_forward_hook(keeper("target"))]
        try:
            logits = model(input_ids=src, decoder_input_ids=ids[:, :t]).logits[0, -1]
        finally:
            for h in hooks:
                h.remove()
        logits.softmax(-1)[ids[0, t]].backward()
        # the embedding module's output e enters the model as e * scale: d/d(e * scale) = (d/de) / scale
        src_grad = captured["source"].grad[0].abs() / scale
        tgt_grad = captured["target"].grad[0].abs() / scale
        np.testing.assert_allclose(s.source_attributions[:, col], torch.linalg.vector_norm(src_grad, dim=-1),
                                   rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(s.target_attributions[:t, col], torch.linalg.vector_norm(tgt_grad, dim=-1),
                                   rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- batching does not change numbers


def _assert_same_results(a, b, what: str) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.target_ids == y.target_ids and (x.attr_pos_start, x.attr_pos_end) == (y.attr_pos_start, y.attr_pos_end)
        for side in ("source_attributions", "target_attributions"):
            u, v = getattr(x, side), getattr(y, side)
            assert (u is None) == (v is None)
            if u is not None:
                assert_columns_close(u, v, what=f"{what} seq {i} {side}")
        for name, value in y.step_scores.items():
            np.testing.assert_allclose(x.step_scores[name], value, rtol=1e-4, atol=1e-6, err_msg=f"{what} {name}")
        if y.deltas is not None:
            np.testing.assert_allclose(x.deltas, y.deltas, rtol=1e-3, atol=1e-5, err_msg=f"{what} deltas")


@pytest.mark.parametrize("kind", TINY)
@pytest.mark.parametrize("method", ("integrated_gradients", "deeplift", "attention"))
def test_batched_equals_unbatched(kind, method):
    """Three prompts of different lengths in one call == one call each (same generated texts); for the
    shared-forward gradient kernel also one step per row, a row per example, and a token budget that splits the
    path points of a step over several batches."""
    args = {"n_steps": 6} if method == "integrated_gradients" else {}
    model, tok = tiny_model(kind)
    dm = distattr.load_model(model, method, tokenizer=tok)
    kw = {"step_scores": ["probability"], "show_progress": False, **target_kw(kind), **args}
    generated = dm.attribute(list(PROMPTS), generation_args={"max_new_tokens": 5}, **kw).info["generated_texts"]
    generated[1] = " ".join(generated[1].split()[:-2])  # ragged targets too (encoder-decoder ones end alike)
    batched = dm.attribute(list(PROMPTS), generated, **kw)
    assert len({len(s.target_ids) for s in batched}) > 1 and len({len(s.source_ids) for s in batched}) == 3
    one_by_one = [dm.attribute(p, g, **kw)[0] for p, g in zip(PROMPTS, generated, strict=True)]
    _assert_same_results(one_by_one, batched, f"{kind} {method} one by one")
    if method == "integrated_gradients":
        for variant in ({"steps_per_row": 1}, {"steps_per_row": 64}, {"token_budget": 40}):
            other = dm.attribute(list(PROMPTS), generated, **kw, **variant)
            _assert_same_results(other, batched, f"{kind} {method} {variant}")


@pytest.mark.parametrize("kind", TINY)
def test_contrastive_batched_equals_unbatched(kind):
    """Contrastive step scores and attribution (with and without ``contrast_force_inputs``) on ragged batches."""
    model, tok = tiny_model(kind)
    dm = distattr.load_model(model, "input_x_gradient", tokenizer=tok)
    generated = dm.attribute(list(PROMPTS), generation_args={"max_new_tokens": 5},
                             show_progress=False).info["generated_texts"]
    generated[1] = " ".join(generated[1].split()[:-2])
    n_prompt = [0 if kind in ENC_DEC else len(p.split()) for p in PROMPTS]
    contrasts = [" ".join(g.split()[:n] + ["rome"] * (len(g.split()) - n)) for g, n in zip(generated, n_prompt,
                                                                                          strict=True)]
    for force in (False, True):
        kw = {"attributed_fn": "contrast_prob_diff", "contrast_force_inputs": force, "show_progress": False,
              "step_scores": ["contrast_prob_diff", "pcxmi", "kl_divergence", "in_context_pvi"], **target_kw(kind)}
        batched = dm.attribute(list(PROMPTS), generated, contrast_targets=contrasts, **kw)
        one_by_one = [dm.attribute(p, g, contrast_targets=c, **kw)[0]
                      for p, g, c in zip(PROMPTS, generated, contrasts, strict=True)]
        _assert_same_results(one_by_one, batched, f"{kind} contrastive force={force}")


def test_gradient_shap_samples_split_over_batches():
    """A token budget smaller than a step's samples splits them over batches (this used to fail on a shape error).
    Without input noise the same alphas are drawn in the same order, so the numbers are those of one batch."""
    model, tok = tiny_model("gpt2")
    dm = distattr.load_model(model, "gradient_shap", tokenizer=tok)
    kw = {"n_samples": 7, "seed": 3, "show_progress": False, "step_scores": ["probability"]}
    generated = dm.attribute(list(PROMPTS), generation_args={"max_new_tokens": 4}, **kw).info["generated_texts"]
    whole = dm.attribute(list(PROMPTS), generated, **kw)
    split = dm.attribute(list(PROMPTS), generated, token_budget=40, **kw)
    _assert_same_results(split, whole, "gradient_shap split samples")


# ---------------------------------------------------------------- integrated gradients completeness


def _baseline(ids, tok, keep_first: bool) -> list[int]:
    """Inseq's baseline ids: UNK everywhere but EOS (and the decoder-start token of encoder-decoder targets)."""
    out = [i if i == tok.eos_token_id else tok.unk_token_id for i in ids]
    if keep_first:
        out[0] = ids[0]
    return out


def _token_totals(s) -> np.ndarray:
    parts = [x for x in (s.source_attributions, s.target_attributions) if x is not None]
    return sum(np.nansum(p.astype(np.float64), axis=0) for p in parts)


@pytest.mark.parametrize("kind", ("gpt2", "llama", "bart"))
def test_integrated_gradients_completeness(kind):
    """With ``hidden_reduction="sum"`` the token attributions of a step add up to ``f(x) - f(baseline)`` (f: the
    probability of the step's token) as ``n_steps`` grows; the returned deltas are exactly that gap."""
    model, tok = tiny_model(kind)
    generated = ours_attribute(model, tok, "saliency", PROMPT).info["generated_texts"]
    fresh, _ = tiny_model(kind)
    gaps = {}
    for n_steps in (2, 64):
        out = ours_attribute(model, tok, "integrated_gradients", PROMPT, generated, n_steps=n_steps,
                             hidden_reduction="sum", **target_kw(kind))
        s = out[0]
        source = list(s.source_ids) if kind in ENC_DEC else None
        ids = list(s.target_ids)
        f_x = _probabilities(fresh, ids, s.attr_pos_start, s.attr_pos_end, source, tok)
        base_ids = _baseline(ids, tok, keep_first=kind in ENC_DEC)
        base_src = _baseline(source, tok, keep_first=False) if source is not None else None
        # f(baseline): the probability of the real token after the baseline prefix
        f_b = _probabilities(fresh, base_ids, s.attr_pos_start, s.attr_pos_end, base_src, tok, targets=ids)
        gap = _token_totals(s) - (f_x - f_b)
        np.testing.assert_allclose(s.deltas, gap, rtol=1e-3, atol=2e-6)  # deltas are the completeness gap
        gaps[n_steps] = np.abs(gap)
    assert np.abs(f_x - f_b).min() > 1e-3  # a non-trivial difference to explain
    assert gaps[64].max() < 1e-3
    assert gaps[64].max() < 0.05 * gaps[2].max()


# ---------------------------------------------------------------- GradientSHAP: same distribution


def _sum_matrix(seq_like) -> np.ndarray:
    """Source and target rows of one sequence stacked: ``[tokens, steps]``."""
    return np.concatenate([np.asarray(x, dtype=np.float64) for x in seq_like if x is not None])


def _z_scores(mean: np.ndarray, se: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Standardised differences where the estimate varies; exact agreement required where it does not (tokens
    equal to their baseline have zero attribution in every sample)."""
    known = ~np.isnan(reference)
    assert (np.isnan(mean) == ~known).all()
    fixed = known & (se == 0)
    assert np.abs(mean[fixed] - reference[fixed]).max(initial=0.0) < 1e-6
    varies = known & (se > 0)
    return (mean[varies] - reference[varies]) / se[varies]


def _gradient_shap_samples(kind: str, generated, seeds: range, n_samples: int, stdevs: float):
    """Per-seed GradientSHAP matrices (hidden size summed: the estimator is linear in it), ours and Inseq's."""
    model, tok = tiny_model(kind)
    dm = distattr.load_model(model, "gradient_shap", tokenizer=tok)
    ours = np.stack([_sum_matrix((s.source_attributions, s.target_attributions)) for s in (
        dm.attribute(PROMPT, generated, n_samples=n_samples, stdevs=stdevs, seed=k, hidden_reduction="sum",
                     show_progress=False, **target_kw(kind))[0] for k in seeds)])
    model2, tok2 = tiny_model(kind)
    im = inseq.load_model(model2, "gradient_shap", tokenizer=tok2)
    state = np.random.get_state()  # Captum draws GradientSHAP's alphas from numpy, its noise from torch
    theirs = []
    try:
        for k in seeds:
            np.random.seed(k)
            torch.manual_seed(k)
            t = im.attribute(PROMPT, generated, n_samples=n_samples, stdevs=stdevs, batch_size=1, show_progress=False,
                             **target_kw(kind)).sequence_attributions[0]
            theirs.append(_sum_matrix((hsum(t.source_attributions), hsum(t.target_attributions))))
    finally:
        np.random.set_state(state)
    return ours, np.stack(theirs)


def _mean_se(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return samples.mean(0), samples.std(0, ddof=1) / math.sqrt(len(samples))


CHI2_MAX, Z_MAX = 3.0, 6.0  # mean squared z-score (about 1 when unbiased) and largest |z|


@pytest.mark.parametrize("kind", ("gpt2", "bart"))
def test_gradient_shap_expectation_is_integrated_gradients(kind):
    """Without input noise GradientSHAP is an unbiased Monte Carlo estimate of integrated gradients
    (``E_a[(x - b) * grad f(b + a (x - b))]``, ``a ~ U(0, 1)``). Ours and Inseq's, averaged over 32 seeds of 64
    samples, must both sit within sampling error of IG with 64 Gauss-Legendre steps; and the same statistic must
    reject a reference 10% off, so that the check has power."""
    model, tok = tiny_model(kind)
    generated = ours_attribute(model, tok, "saliency", PROMPT).info["generated_texts"]
    ig_out = ours_attribute(model, tok, "integrated_gradients", PROMPT, generated, n_steps=64, hidden_reduction="sum",
                            **target_kw(kind))[0]
    assert np.abs(ig_out.deltas).max() < 1e-4
    ig = _sum_matrix((ig_out.source_attributions, ig_out.target_attributions))
    ours, theirs = _gradient_shap_samples(kind, generated, range(32), 64, 0.0)
    for name, samples in (("ours", ours), ("Inseq", theirs)):
        mean, se = _mean_se(samples)
        z = _z_scores(mean, se, ig)
        assert np.mean(z**2) < CHI2_MAX and np.abs(z).max() < Z_MAX, (name, np.mean(z**2), np.abs(z).max())
        assert np.mean(_z_scores(mean, se, 0.9 * ig) ** 2) > 2 * CHI2_MAX, name  # power: a 10% error is caught


def test_gradient_shap_with_noise_matches_inseq_in_distribution():
    """With Gaussian input noise there is no closed form: a two-sample test of ours against Inseq, which must also
    tell both apart from noise-free IG (the noise is really applied)."""
    kind = "gpt2"
    model, tok = tiny_model(kind)
    generated = ours_attribute(model, tok, "saliency", PROMPT).info["generated_texts"]
    ours, theirs = _gradient_shap_samples(kind, generated, range(32), 64, 0.1)
    (m_o, se_o), (m_t, se_t) = _mean_se(ours), _mean_se(theirs)
    z = _z_scores(m_o, np.sqrt(se_o**2 + se_t**2), m_t)
    assert np.mean(z**2) < CHI2_MAX and np.abs(z).max() < Z_MAX, (np.mean(z**2), np.abs(z).max())
    ig_out = ours_attribute(model, tok, "integrated_gradients", PROMPT, generated, n_steps=64,
                            hidden_reduction="sum")[0]
    ig = _sum_matrix((ig_out.source_attributions, ig_out.target_attributions))
    assert np.mean(_z_scores(m_o, se_o, ig) ** 2) > 10 * CHI2_MAX


# ---------------------------------------------------------------- the embedded SmolLM2-135M (a real Llama)


SMOL_PROMPT = "The capital of France is"
SMOL_LAYER = "model.layers.0.mlp"


@pytest.fixture(scope="module")
def smollm():
    """The embedded model, eager attention (Inseq's setting), loaded once; its greedy continuation. Both sides
    attribute the continuation as a constrained text: Inseq re-tokenizes generated texts, which can merge tokens
    (e.g. two newlines)."""
    dm = distattr.load_model("smollm2-135m", "saliency", model_kwargs={"attn_implementation": "eager"})
    generated = dm.attribute(SMOL_PROMPT, generation_args={"max_new_tokens": 5}, show_progress=False)
    return dm, generated.info["generated_texts"][0]


SMOL_CASES = {
    "saliency": ({}, ["probability", "entropy", "logit"]),
    "integrated_gradients": ({"n_steps": 4, "return_convergence_delta": True}, ["probability"]),
    "deeplift": ({}, []),
    "layer_gradient_x_activation": ({"target_layer": SMOL_LAYER}, []),
    "attention": ({}, []),  # Inseq refuses step scores with final-step methods
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SMOL_CASES))
def test_smollm2_matches_inseq(smollm, method):
    dm, generated = smollm
    args, scores = dict(SMOL_CASES[method][0]), SMOL_CASES[method][1]
    ours = dm.attribute(SMOL_PROMPT, generated, method=method, step_scores=scores, show_progress=False, **args)
    load_args = {"target_layer": dm.model.get_submodule(args.pop("target_layer"))} if "target_layer" in args else {}
    theirs = inseq_attribute(dm.model, dm.tokenizer, method, SMOL_PROMPT, generated, load_args=load_args,
                             step_scores=scores, **args)
    compare(ours, theirs, reduce=raw if method == "attention" else vnorm, step_scores=scores, what=f"smollm2 {method}")
    if method == "integrated_gradients":
        np.testing.assert_allclose(ours[0].deltas, theirs.sequence_attributions[0].step_scores["deltas"].numpy(),
                                   rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_smollm2_contrastive_matches_inseq(smollm):
    dm, generated = smollm
    contrast = generated.replace("Paris", "Rome")
    n_tokens = len(dm.tokenizer(generated)["input_ids"])
    assert contrast != generated and len(dm.tokenizer(contrast)["input_ids"]) == n_tokens
    kw = {"attributed_fn": "contrast_prob_diff", "step_scores": ["contrast_prob_diff", "pcxmi"],
          "contrast_targets": contrast}
    ours = dm.attribute(SMOL_PROMPT, generated, method="input_x_gradient", show_progress=False, **kw)
    theirs = inseq_attribute(dm.model, dm.tokenizer, "input_x_gradient", SMOL_PROMPT, generated, **kw)
    compare(ours, theirs, step_scores=kw["step_scores"], what="smollm2 contrastive")
    assert np.abs(ours[0].step_scores["pcxmi"]).max() > 0.1
