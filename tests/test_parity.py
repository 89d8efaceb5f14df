"""Parity of distattr with the real Inseq 0.7.1 package.

Every comparison runs Inseq at batch size 1 with eager attention (the tiny models are eager; the embedded
SmolLM2 is loaded eager) on exactly the tokens distattr explains: distattr generates, and its
``info["generated_texts"]`` go to Inseq as ``generated_texts`` (constrained decoding).

Token-level matrices are compared raw: ours are already L2-reduced over the hidden size
(``hidden_reduction="vnorm"``); Inseq's raw ``[tokens, steps, hidden]`` tensors are reduced the same way here.
Deterministic methods must agree within ``1e-4`` of each column's L1 norm (:func:`assert_columns_close`).

Where Inseq is wrong distattr deliberately differs (``perplexity``, ``mc_dropout_prob_avg``, Marian's
decoder embeddings); those tests show the difference instead of parity.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from tiny import tiny_model

import distattr

inseq = pytest.importorskip("inseq")

logging.getLogger("inseq").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore")

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
        f"{what}: {int(bad.sum())} of {a.size} values differ; worst |a-b|/tol = {float((np.abs(a - b) / tol).max()):.3g}"
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


def inseq_attribute(model, tok, method: str, texts, generated, load_args: dict | None = None, **kwargs):
    """Inseq at batch size 1 on the given model objects; returns its ``FeatureAttributionOutput``."""
    im = inseq.load_model(model, method, tokenizer=tok, **(load_args or {}))
    if not model.config.is_encoder_decoder:
        kwargs.pop("attribute_target", None)  # Inseq warns and ignores it for decoder-only models
    return im.attribute(list(texts) if not isinstance(texts, str) else texts, generated, batch_size=1,
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
        assert list(s.target_tokens) == [x.token for x in t.target], label
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
