"""Occlusion on full sequences: same values as Inseq's per-step occlusion, far fewer forwards."""

import numpy as np
import pytest

import distattr

PROMPT = "the cat is located in the city of"


def _inseq_occlusion(kind, generated, attribute_target):
    import inseq
    from tiny import tiny_model

    model, tok = tiny_model(kind)
    im = inseq.load_model(model, "occlusion", tokenizer=tok)
    out = im.attribute(PROMPT, generated, attribute_target=attribute_target, show_progress=False)
    return out.sequence_attributions[0]


@pytest.mark.parametrize("kind,attribute_target", [("gpt2", False), ("llama", False), ("t5", True), ("t5", False),
                                                    ("bart", True)])
def test_occlusion_matches_inseq(tiny, kind, attribute_target):
    m = tiny(kind, "occlusion")
    out = m.attribute(PROMPT, generation_args={"max_new_tokens": 4}, attribute_target=attribute_target,
                      show_progress=False)
    ours = out[0]
    theirs = _inseq_occlusion(kind, out.info["generated_texts"], attribute_target)
    for a, b in ((ours.target_attributions, theirs.target_attributions),
                 (ours.source_attributions, theirs.source_attributions)):
        if b is None:
            assert a is None
            continue
        b = b.numpy()
        assert a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b))
        scale = np.nansum(np.abs(b), axis=0, keepdims=True)
        assert np.nanmax(np.abs(a - b) / scale) <= 1e-4


def test_occlusion_is_the_probability_drop(tiny):
    import torch

    m = tiny("gpt2", "occlusion", absolute=False)
    seq = m.attribute(PROMPT, PROMPT + " paris , france", show_progress=False)[0]
    ids = torch.tensor(seq.target_ids)

    def prob(seq_ids, t):
        with torch.no_grad():
            return m.model(seq_ids[None, :t]).logits[0, -1].softmax(-1)[ids[t]].item()

    for col, t in enumerate(range(seq.attr_pos_start, seq.attr_pos_end)):
        for j in range(t):
            occluded = ids.clone()
            occluded[j] = 0  # UNK (no EOS in this sequence)
            expected = prob(ids, t) - prob(occluded, t)
            assert seq.target_attributions[j, col] == pytest.approx(expected, abs=1e-6)
        assert np.isnan(seq.target_attributions[t:, col]).all()


def test_occlusion_takes_any_target_and_a_tight_budget(tiny):
    m = tiny("llama", "occlusion")
    loose = m.attribute(PROMPT, PROMPT + " paris , france", attributed_fn="top_p_size", show_progress=False)
    tight = m.attribute(PROMPT, PROMPT + " paris , france", attributed_fn="top_p_size", token_budget=8,
                        show_progress=False)
    np.testing.assert_array_equal(loose[0].target_attributions, tight[0].target_attributions)
    with pytest.raises(ValueError, match="Valid arguments: absolute"):
        distattr.load_model(m.model, "occlusion", tokenizer=m.tokenizer, sliding_window_shapes=(1, 32))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rows_after_the_clean_prefix_cache_equal_whole_rows(tiny, kind):
    import dataclasses

    from distattr.models.adapters import wrap_model

    cached = tiny(kind, "occlusion", absolute=False)
    whole = dataclasses.replace(cached, adapter=wrap_model(cached.model, prefix_cache=False))
    prompts = [PROMPT, "a dog"]
    args = {"generation_args": {"max_new_tokens": 5, "min_new_tokens": 5}, "attributed_fn": "contrast_prob_diff",
            "contrast_targets": ["the cat is located in the city of rome , italy", "a dog is a b c"],
            "contrast_targets_alignments": "auto", "step_scores": ["probability"], "show_progress": False}
    for budget in (4, 1000):
        for a, b in zip(cached.attribute(prompts, token_budget=budget, **args),
                        whole.attribute(prompts, token_budget=budget, **args), strict=True):
            np.testing.assert_allclose(a.target_attributions, b.target_attributions, atol=1e-6, equal_nan=True)
            assert np.isfinite(a.target_attributions[: a.attr_pos_start]).all()
