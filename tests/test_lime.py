"""LIME: recovers planted linear importance, matches a closed-form weighted ridge and Captum's kernel, seeded,
shaped like occlusion on every architecture; Inseq's LIME masks embeddings with a scalar token id."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from planted import PlantedLM, ids, request

import distattr
from distattr.methods.lime import LimeArgs, cosine_kernel, lime_attribution, weighted_ridge
from distattr.methods.perturbation import occlusion_attribution

PROMPT = "the cat is located in the city of"


def _planted_table(seed=0):
    torch.manual_seed(seed)
    return torch.randn(66, 66)


def _expected(table, seq, start):
    """The planted weights: ``A[j, t] = table[x_j, x_t]`` for ``j < t``, NaN after."""
    n = len(seq)
    out = np.full((n, n - start), np.nan)
    for col, t in enumerate(range(start, n)):
        out[:t, col] = table[seq[:t], seq[t]].numpy()
    return out


def test_lime_recovers_planted_linear_weights():
    table = _planted_table()
    seq = ids("the cat is located in paris , france and a dog")
    start = 3
    req = request(PlantedLM(table), seq, start, attributed_fn="logit")
    expected = _expected(table, seq, start)
    nan = np.isnan(expected)

    exact = lime_attribution(req, LimeArgs(n_samples=64, alpha=1e-9))[0].target.numpy()
    assert np.array_equal(np.isnan(exact), nan)
    np.testing.assert_allclose(exact[~nan], expected[~nan], atol=1e-4)  # noise-free linear f: exact fit

    ridge = lime_attribution(req, LimeArgs())[0].target.numpy()  # defaults: alpha = 1 shrinks a little
    scale = np.abs(expected[~nan]).max()
    assert np.abs(ridge[~nan] - expected[~nan]).max() < 0.1 * scale
    assert np.corrcoef(ridge[~nan], expected[~nan])[0, 1] > 0.99
    for col in range(expected.shape[1]):
        known = ~nan[:, col]
        assert ridge[known, col].argmax() == expected[known, col].argmax()
        assert ridge[known, col].argmin() == expected[known, col].argmin()

    # on a linear function, LIME's coefficients are the signed occlusion differences
    occlusion = occlusion_attribution(req, absolute=False)[0].target.numpy()
    np.testing.assert_allclose(exact[~nan], occlusion[~nan], atol=1e-5)


def test_lime_recovers_a_planted_token_under_the_probability_target():
    table = torch.zeros(66, 66)
    seq = ids("the cat is located in france , the city of paris")
    table[seq[5], seq[-1]] = 6.0  # "france" makes "paris" likely
    out = lime_attribution(request(PlantedLM(table), seq, len(seq) - 1), LimeArgs())[0].target[:-1, 0]
    assert int(out.argmax()) == 5
    assert out[5] > 10 * out[torch.arange(len(out)) != 5].abs().max()


def test_weighted_ridge_is_the_closed_form_solution():
    gen = torch.Generator().manual_seed(3)
    n, p, steps = 40, 7, 5
    x = (torch.rand(n, p, generator=gen) > 0.5).double()
    y = torch.randn(n, steps, generator=gen, dtype=torch.float64)
    w = torch.rand(n, steps, generator=gen, dtype=torch.float64) + 0.1
    valid = torch.rand(steps, p, generator=gen) > 0.3
    for alpha in (0.0, 0.5):
        got = weighted_ridge(x, y, w, valid, alpha).numpy()
        for t in range(steps):
            cols = valid[t].numpy()
            design = np.concatenate([np.ones((n, 1)), x.numpy()[:, cols]], axis=1)
            penalty = np.diag([0.0] + [alpha] * int(cols.sum()))
            lhs = design.T @ (w[:, t].numpy()[:, None] * design) + penalty
            theta = np.linalg.solve(lhs, design.T @ (w[:, t].numpy() * y[:, t].numpy()))
            np.testing.assert_allclose(got[t, cols], theta[1:], rtol=1e-9, atol=1e-9)
            assert np.all(got[t, ~cols] == 0.0)


def test_kernel_is_captums_exponential_cosine_kernel_on_the_binary_sample():
    from captum.attr._core.lime import get_exp_kernel_similarity_function

    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(20, 6, generator=gen) > 0.5
    valid = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    ours = cosine_kernel(keep, valid, 0.25)
    captum = get_exp_kernel_similarity_function("cosine", kernel_width=0.25)
    for i in range(20):
        for t in range(2):
            z = keep[i][valid[t]].float()
            expected = captum(torch.ones_like(z), z, None)
            assert ours[i, t].item() == pytest.approx(expected, rel=1e-6)


def _occlusion_shape(tiny, kind, attribute_target, text):
    out = tiny(kind, "occlusion").attribute(PROMPT, text, attribute_target=attribute_target, show_progress=False)
    return out[0]


@pytest.mark.parametrize("kind,attribute_target", [("gpt2", False), ("llama", False), ("t5", False), ("t5", True),
                                                    ("bart", True)])
def test_lime_shapes_seeds_and_budget(tiny, kind, attribute_target):
    m = tiny(kind, "lime", n_samples=32)
    first = m.attribute(PROMPT, generation_args={"max_new_tokens": 4}, attribute_target=attribute_target,
                        show_progress=False)
    text = first.info["generated_texts"][0]
    ref = _occlusion_shape(tiny, kind, attribute_target, text)
    ours = first[0]
    for a, b in ((ours.source_attributions, ref.source_attributions),
                 (ours.target_attributions, ref.target_attributions)):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b))
        assert np.isfinite(a[~np.isnan(b)]).all()
        assert np.all(a[b == 0] == 0)  # tokens equal to their baseline (EOS, decoder start) are not features

    again = m.attribute(PROMPT, text, attribute_target=attribute_target, show_progress=False)[0]
    other = m.attribute(PROMPT, text, attribute_target=attribute_target, seed=7, show_progress=False)[0]
    tight = m.attribute(PROMPT, text, attribute_target=attribute_target, token_budget=24, show_progress=False)[0]
    side = "target_attributions" if ours.source_attributions is None else "source_attributions"
    np.testing.assert_array_equal(getattr(again, side), getattr(ours, side))
    np.testing.assert_allclose(getattr(tight, side), getattr(ours, side), atol=1e-5)
    assert not np.allclose(getattr(other, side), getattr(ours, side), equal_nan=True)


def test_lime_arguments_are_validated(tiny):
    model = tiny("gpt2", "saliency")
    for bad in ({"n_samples": 1}, {"mask_prob": 1.0}, {"kernel_width": 0.0}, {"alpha": -1.0}):
        with pytest.raises(ValueError):
            distattr.load_model(model.model, "lime", tokenizer=model.tokenizer, **bad)
    with pytest.raises(ValueError, match="Valid arguments: alpha, kernel_width, mask_prob, n_samples, seed"):
        distattr.load_model(model.model, "lime", tokenizer=model.tokenizer, mask_token="unk")


def test_inseq_lime_replaces_embeddings_with_the_scalar_token_id():
    """Inseq 0.7.1 masks the *embedding* with ``unk_token_id`` broadcast over the hidden size (here 50256, as
    for GPT-2), not with the UNK embedding, and its special-token guard never applies (it compares embedding
    rows with ids). distattr replaces token ids, so the model sees the real UNK token."""
    from inseq.attr.feat.ops.lime import Lime

    unk = 50256
    stub = SimpleNamespace(attribution_model=SimpleNamespace(
        special_tokens_ids=[0, 1, 2, 3], tokenizer=SimpleNamespace(unk_token_id=unk), device="cpu"))
    embeds = torch.randn(1, 5, 8)
    (perturbed,) = Lime.perturb_func(stub, (embeds,), mask_prob=1.0)  # mask every token
    assert torch.all(perturbed == unk)
    (kept,) = Lime.perturb_func(stub, (embeds,), mask_prob=0.0)
    assert torch.equal(kept, embeds)
