"""ReAGent: finds planted tokens (as Inseq's own ReAGent core does), respects max_probe_steps, seeded, shaped
like Inseq's output (run with a uniform sampler in place of its nltk POS sampler)."""

import numpy as np
import pytest
import torch
from planted import PlantedLM, ids, request
from tiny import VOCAB

import distattr
from distattr.methods.reagent import ReagentArgs, reagent_attribution

PROMPT = "the cat is located in the city of"
SEQ = "the cat is in italy and france paris rome"  # "france" -> "paris", "italy" -> "rome"


def _planted():
    torch.manual_seed(0)
    table = 0.3 * torch.randn(66, 66)
    seq = ids(SEQ)
    paris, rome, france, italy = (VOCAB[w] for w in ("paris", "rome", "france", "italy"))
    table[:, paris] = table[:, rome] = -0.5
    table[france, paris] = table[italy, rome] = 10.0
    return PlantedLM(table), seq


def test_reagent_finds_the_planted_token_of_each_step():
    model, seq = _planted()
    stats = {}
    args = ReagentArgs(keep_top_n=1, stopping_condition_top_k=1, num_probes=8, max_probe_steps=300)
    out = reagent_attribution(request(model, seq, start=7), args, stats)[0].target
    assert int(out[:7, 0].argmax()) == 6  # step "paris": "france"
    assert int(out[:8, 1].argmax()) == 4  # step "rome": "italy"
    for col, (t, key) in enumerate(((7, 6), (8, 4))):
        others = torch.cat([out[:key, col], out[key + 1 : t, col]])
        assert out[key, col] > 2 * others.max()
    np.testing.assert_allclose(np.nansum(out.numpy(), 0), 1.0, rtol=1e-5)
    assert torch.isnan(out[7:, 0]).all() and torch.isnan(out[8:, 1]).all()
    assert stats["iterations"] < 300 and all(bool((c == 1).all()) for c in stats["converged"])


def test_inseq_reagent_core_finds_the_same_token():
    from inseq.attr.feat.ops.reagent_core import (
        AggregateRationalizer,
        DeltaProbImportanceScoreEvaluator,
        TopKStoppingConditionEvaluator,
        UniformTokenReplacer,
    )
    from tiny import _tokenizer

    model, seq = _planted()

    def sampler(input_ids):
        return torch.randint(0, 66, input_ids.shape)

    torch.manual_seed(0)
    stop = TopKStoppingConditionEvaluator(model=model, sampler=sampler, top_k=1, keep_top_n=1)
    evaluator = DeltaProbImportanceScoreEvaluator(
        model=model, tokenizer=_tokenizer(None), token_replacer=UniformTokenReplacer(sampler=sampler, ratio=0.3),
        stopping_condition_evaluator=stop, max_steps=300)
    rationalizer = AggregateRationalizer(importance_score_evaluator=evaluator, batch_size=8, overlap_threshold=0,
                                         keep_top_n=1)
    rationalizer(seq[None, :7], seq[7:8])
    theirs = rationalizer.mean_importance_score
    ours = reagent_attribution(request(model, seq, start=7),
                               ReagentArgs(keep_top_n=1, stopping_condition_top_k=1, num_probes=8))[0].target
    assert int(theirs.argmax()) == int(ours[:7, 0].argmax()) == 6


def test_reagent_respects_max_probe_steps_and_counts_rows():
    """A target that never enters the top 1: no probe converges, every round runs P update rows and P check
    rows, the loop stops at max_probe_steps and the scores average all probes (no NaN)."""
    model, seq = _planted()
    seq = seq.clone()
    seq[7] = VOCAB["the"]
    model.table.weight.data[:, VOCAB["the"]] = -5.0
    model.rows_seen = 0
    stats = {}
    out = reagent_attribution(request(model, seq[:8], start=7),
                              ReagentArgs(keep_top_n=1, stopping_condition_top_k=1, num_probes=4, max_probe_steps=7),
                              stats)[0].target
    assert stats["iterations"] == 7 and float(stats["converged"][0][0]) == 0.0
    assert model.rows_seen == 1 + 7 * (4 + 4)
    assert torch.isfinite(out[:7]).all() and float(out[:7].sum()) == pytest.approx(1.0, rel=1e-5)


def test_reagent_refuses_a_non_probability_target():
    model, seq = _planted()
    with pytest.raises(ValueError, match=r"needs values in \[0, 1\]"):
        reagent_attribution(request(model, seq, start=7, attributed_fn="logit"), ReagentArgs())


def test_reagent_takes_a_custom_replacer():
    model, seq = _planted()
    calls = []

    def to_unk(ids, mask, generator):
        calls.append(int(mask.sum()))
        return torch.where(mask, torch.zeros_like(ids), ids)

    out = reagent_attribution(request(model, seq, start=7), ReagentArgs(keep_top_n=1, stopping_condition_top_k=1,
                                                                        replacer=to_unk))[0].target
    assert calls and int(out[:7, 0].argmax()) == 6


def _inseq_reagent(kind, text, attribute_target, monkeypatch, **args):
    import inseq
    import inseq.attr.feat.ops.reagent as inseq_reagent
    from tiny import tiny_model

    class Uniform:  # Inseq's POSTagTokenSampler needs nltk and its tagger data
        def __init__(self, *a, **k):
            pass

        def __call__(self, input_ids):
            return torch.randint(0, len(VOCAB), input_ids.shape)

    monkeypatch.setattr(inseq_reagent, "POSTagTokenSampler", Uniform)
    model, tok = tiny_model(kind)
    torch.manual_seed(0)
    im = inseq.load_model(model, "reagent", tokenizer=tok, **args)
    return im.attribute(PROMPT, text, attribute_target=attribute_target, show_progress=False).sequence_attributions[0]


@pytest.mark.parametrize("kind,attribute_target", [("gpt2", False), ("llama", False), ("t5", True), ("bart", True)])
def test_reagent_shapes_match_inseq(tiny, monkeypatch, kind, attribute_target):
    args = {"max_probe_steps": 20, "num_probes": 4}
    m = tiny(kind, "reagent", **args)
    out = m.attribute(PROMPT, generation_args={"max_new_tokens": 4}, attribute_target=attribute_target,
                      show_progress=False)
    ours = out[0]
    theirs = _inseq_reagent(kind, out.info["generated_texts"][0], attribute_target, monkeypatch, **args)
    total = 0.0
    future = np.arange(len(ours.target_ids))[:, None] >= np.arange(ours.attr_pos_start, ours.attr_pos_end)[None]
    for a, b, side in ((ours.source_attributions, theirs.source_attributions, "source"),
                       (ours.target_attributions, theirs.target_attributions, "target")):
        if b is None:
            assert a is None
            continue
        b = b[..., 0].numpy()  # Inseq repeats the token score over the hidden size
        assert a.shape == b.shape
        assert np.array_equal(np.isnan(a), future if side == "target" else np.zeros_like(a, dtype=bool))
        # Inseq 0.7.1 divides by the number of converged probes: 0/0 = NaN columns when none converged (the
        # fix, inseq#305, came later); elsewhere the NaN patterns agree
        unconverged = np.isnan(b).all(0)
        assert np.array_equal(np.isnan(a[:, ~unconverged]), np.isnan(b[:, ~unconverged]))
        assert np.all(a[~np.isnan(a)] >= 0)
        total = total + np.nansum(a, axis=0)
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)  # as Inseq's: a distribution over the attributed tokens


def test_reagent_encoder_decoder_source_only(tiny, monkeypatch):
    """Inseq 0.7.1's Reagent.attribute falls through to the decoder-only call for encoder-decoder models without
    attribute_target and fails; distattr attributes the source."""
    m = tiny("t5", "reagent", max_probe_steps=20, num_probes=4)
    out = m.attribute(PROMPT, generation_args={"max_new_tokens": 3}, show_progress=False)
    src = out[0].source_attributions
    assert out[0].target_attributions is None and np.isfinite(src).all()
    np.testing.assert_allclose(src.sum(0), 1.0, rtol=1e-5)
    with pytest.raises(RuntimeError):
        _inseq_reagent("t5", out.info["generated_texts"][0], False, monkeypatch, max_probe_steps=20, num_probes=4)


def test_reagent_is_seeded_and_budget_independent(tiny):
    m = tiny("llama", "reagent", max_probe_steps=30, num_probes=4)
    text = PROMPT + " paris , france"
    first = m.attribute(PROMPT, text, show_progress=False)[0].target_attributions
    again = m.attribute(PROMPT, text, show_progress=False)[0].target_attributions
    other = m.attribute(PROMPT, text, seed=1, show_progress=False)[0].target_attributions
    tight = m.attribute(PROMPT, text, token_budget=16, show_progress=False)[0].target_attributions
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(tight, first, atol=1e-4)
    assert not np.allclose(other, first, equal_nan=True)


def test_reagent_arguments_are_validated(tiny):
    model = tiny("gpt2", "saliency")

    def load(**args):
        return distattr.load_model(model.model, "reagent", tokenizer=model.tokenizer, **args)

    for bad in ({"keep_ratio": 0.3}, {"keep_top_n": 0}, {"keep_top_n": 0, "keep_ratio": 1.5}, {"num_probes": 0},
                {"max_probe_steps": 0}, {"replacing_ratio": 0.0}, {"replacer": "pos_tag"}):
        with pytest.raises(ValueError):
            load(**bad)
    m = load(keep_top_n=0, keep_ratio=0.5, max_probe_steps=5, num_probes=2, invert_keep=True)
    seq = m.attribute(PROMPT, PROMPT + " paris", show_progress=False)[0]
    assert np.isfinite(seq.target_attributions[:-1, 0]).all()


@pytest.mark.parametrize("method,args", [("reagent", {"max_probe_steps": 30, "num_probes": 4}),
                                         ("lime", {"n_samples": 32})])
def test_an_example_scores_the_same_alone_or_in_a_batch(tiny, method, args):
    m = tiny("gpt2", method, **args)
    texts, outputs = ["the cat is", "a dog said that it"], ["the cat is in paris", "a dog said that it was big"]
    together = m.attribute(texts, outputs, show_progress=False)
    for i in range(2):
        alone = m.attribute(texts[i], outputs[i], show_progress=False)[0].target_attributions
        np.testing.assert_allclose(together[i].target_attributions, alone, atol=1e-4)
