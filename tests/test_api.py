"""The public API end to end on tiny models: step functions both ways, registration, loading paths,
positions and special tokens."""

import numpy as np
import pytest
import torch

import distattr
from distattr.steps import list_step_functions

PROMPT = "the cat is located in the city of"
GEN = PROMPT + " paris , france"
CONTRAST = PROMPT + " rome , italy"
NEEDS_CONTRAST = {"contrast_logits", "contrast_prob", "contrast_logits_diff", "contrast_prob_diff", "pcxmi",
                  "kl_divergence", "in_context_pvi"}


@pytest.mark.parametrize("name", sorted(set(list_step_functions()) - {"top_p_size"}))
def test_every_step_function_works_as_step_score_and_as_target(tiny, name):
    m = tiny("llama", "input_x_gradient")
    kwargs = {}
    if name in NEEDS_CONTRAST:
        kwargs["contrast_targets"] = [CONTRAST]
    if name == "kl_divergence":
        kwargs["contrast_force_inputs"] = True
    out = m.attribute(PROMPT, GEN, step_scores=[name], attributed_fn=name, show_progress=False, **kwargs)
    seq = out[0]
    assert (seq.attr_pos_start, seq.attr_pos_end) == (9, 12)  # <s> + 8 prompt words, 3 generated
    assert seq.step_scores[name].shape == (3,)
    assert np.isfinite(seq.step_scores[name]).all()
    visible = ~np.isnan(seq.target_attributions)
    assert visible.sum() == 9 + 10 + 11  # step t sees tokens < t
    assert np.isfinite(seq.target_attributions[visible]).all()


def test_piecewise_constant_target_is_refused_by_gradient_methods(tiny):
    m = tiny("llama", "saliency")
    with pytest.raises(ValueError, match="does not depend differentiably"):
        m.attribute(PROMPT, GEN, attributed_fn="top_p_size", show_progress=False)
    with pytest.raises(ValueError, match="does not depend differentiably"):
        m.attribute(PROMPT, GEN, attributed_fn="top_p_size", method="deeplift", show_progress=False)
    out = m.attribute(PROMPT, GEN, attributed_fn="top_p_size", method="attention", step_scores=["top_p_size"],
                      show_progress=False)
    assert out[0].step_scores["top_p_size"].shape == (3,)


def test_step_scores_match_their_definitions(tiny):
    m = tiny("gpt2")
    out = m.attribute(PROMPT, GEN, step_scores=["probability", "crossentropy", "perplexity", "entropy", "logit",
                                                "contrast_prob_diff", "pcxmi", "top_p_size"],
                      contrast_targets=[CONTRAST], step_scores_args={"top_p_size": {"top_p": 0.5}},
                      show_progress=False)
    seq = out[0]
    ids = torch.tensor([seq.target_ids])
    cids = m.tokenizer(CONTRAST, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = m.model(ids).logits[0, seq.attr_pos_start - 1: seq.attr_pos_end - 1]
        clogits = m.model(cids).logits[0, seq.attr_pos_start - 1: seq.attr_pos_end - 1]
    tgt = ids[0, seq.attr_pos_start: seq.attr_pos_end]
    ctgt = cids[0, seq.attr_pos_start: seq.attr_pos_end]
    p = logits.softmax(-1).gather(-1, tgt[:, None])[:, 0]
    pc = clogits.softmax(-1).gather(-1, ctgt[:, None])[:, 0]
    np.testing.assert_allclose(seq.step_scores["probability"], p, rtol=1e-5)
    np.testing.assert_allclose(seq.step_scores["crossentropy"], -p.log(), rtol=1e-5)
    np.testing.assert_allclose(seq.step_scores["perplexity"], 1 / p, rtol=1e-4)
    np.testing.assert_allclose(seq.step_scores["logit"], logits.gather(-1, tgt[:, None])[:, 0], rtol=1e-5)
    logp = logits.log_softmax(-1)
    np.testing.assert_allclose(seq.step_scores["entropy"], -(logp.exp() * logp).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(seq.step_scores["contrast_prob_diff"], p - pc, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(seq.step_scores["pcxmi"], -torch.log2(p / pc), rtol=1e-4)
    sorted_p = logits.softmax(-1).sort(descending=True).values.cumsum(-1)
    expected = (sorted_p < 0.5).sum(-1) + 1
    np.testing.assert_array_equal(seq.step_scores["top_p_size"], expected.float())


def test_register_step_function(tiny, monkeypatch):
    from distattr import steps

    monkeypatch.setattr(steps, "STEP_FUNCTIONS", dict(steps.STEP_FUNCTIONS))  # keep the registry clean for others

    def max_logit(ctx, bias=0.0):
        return ctx.logits.max(-1).values + bias

    distattr.register_step_function(max_logit, "test_max_logit", merge="sum")
    with pytest.raises(ValueError, match="exists"):
        distattr.register_step_function(max_logit, "test_max_logit")
    with pytest.raises(ValueError, match="built in"):
        distattr.register_step_function(max_logit, "probability", overwrite=True)
    m = tiny("gpt2")
    out = m.attribute(PROMPT, GEN, step_scores=["test_max_logit"], attributed_fn="test_max_logit",
                      step_scores_args={"test_max_logit": {"bias": 1.0}}, show_progress=False)
    base = m.attribute(PROMPT, GEN, step_scores=["logit"], show_progress=False)
    assert (out[0].step_scores["test_max_logit"] >= base[0].step_scores["logit"] + 1.0 - 1e-5).all()
    assert np.isfinite(out[0].target_attributions[:8]).all()


def test_attr_pos_semantics(tiny):
    m = tiny("gpt2")
    full = m.attribute(PROMPT, GEN, show_progress=False)[0]
    assert (full.attr_pos_start, full.attr_pos_end) == (8, 11)
    part = m.attribute(PROMPT, GEN, attr_pos_start=9, attr_pos_end=-1, show_progress=False)[0]
    assert (part.attr_pos_start, part.attr_pos_end) == (9, 10)
    np.testing.assert_allclose(part.target_attributions, full.target_attributions[:, 1:2], rtol=1e-5)
    early = m.attribute(PROMPT, GEN, attr_pos_start=2, show_progress=False)[0]
    assert early.attr_pos_start == 8  # never before the prompt end, as Inseq


def test_encoder_decoder_attribute_target_switch(tiny):
    m = tiny("bart")
    without = m.attribute(PROMPT, generation_args={"max_new_tokens": 3}, show_progress=False)[0]
    assert without.target_attributions is None and without.source_attributions is not None
    assert without.attr_pos_start == 1
    with_t = m.attribute(PROMPT, generation_args={"max_new_tokens": 3}, attribute_target=True, show_progress=False)[0]
    assert with_t.target_attributions.shape == (len(with_t.target_tokens), with_t.attr_pos_end - 1)
    # the step-t column covers target tokens < t only
    for col in range(with_t.target_attributions.shape[1]):
        t = with_t.attr_pos_start + col
        assert not np.isnan(with_t.target_attributions[:t, col]).any()
        assert np.isnan(with_t.target_attributions[t:, col]).all()


def test_skip_special_tokens(tiny):
    m = tiny("llama")
    with_bos = m.attribute(PROMPT, generation_args={"max_new_tokens": 2}, show_progress=False)[0]
    without = m.attribute(PROMPT, generation_args={"max_new_tokens": 2}, skip_special_tokens=True,
                          show_progress=False)[0]
    assert with_bos.source_tokens[0] == "<s>" and without.source_tokens[0] == "the"


def test_load_from_folder_with_dtype_and_device_map(tmp_path):
    from tiny import tiny_model

    model, tok = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m = distattr.load_model(str(tmp_path / "m"), "saliency", dtype="bfloat16", device_map="cpu")
    assert next(m.model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in m.model.parameters())
    out = m.attribute(PROMPT, GEN, show_progress=False)
    assert out.info["dtype"] == "bfloat16" and np.isfinite(out[0].target_attributions[:8]).all()


def test_batch_of_inputs_with_generation(tiny):
    m = tiny("gpt2", "integrated_gradients", n_steps=4)
    out = m.attribute([PROMPT, "a dog", "she said that"], generation_args={"max_new_tokens": 3}, batch_size=2,
                      show_progress=False)
    assert len(out) == 3
    for seq, prompt in zip(out, [PROMPT, "a dog", "she said that"], strict=True):
        assert seq.attr_pos_start == len(prompt.split()) and seq.attr_pos_end == seq.attr_pos_start + 3
        assert seq.deltas.shape == (3,)


@pytest.mark.slow
def test_embedded_model_completes_paris_and_caches():
    import time

    started = time.perf_counter()
    m = distattr.load_model("smollm2-135m", "saliency")
    out = m.attribute("The Eiffel Tower is located in the city of", generation_args={"max_new_tokens": 3},
                      step_scores=["probability"], show_progress=False)
    assert out.info["generated_texts"][0].endswith(" Paris, France")
    assert out[0].generated_tokens == ("ĠParis", ",", "ĠFrance")
    assert out[0].step_scores["probability"][0] > 0.5
    started = time.perf_counter()
    distattr.load_model("smollm2-135m", "saliency")
    assert time.perf_counter() - started < 15  # from the safetensors cache, not a GGUF conversion


@pytest.mark.slow
def test_gguf_file_loads(tmp_path, monkeypatch):
    from distattr.models.embedded import gguf_path

    monkeypatch.setenv("DISTATTR_CACHE", str(tmp_path))
    m = distattr.load_model(str(gguf_path("smollm2-135m")), "saliency")
    out = m.attribute("The Eiffel Tower is located in the city of", generation_args={"max_new_tokens": 1},
                      show_progress=False)
    assert out[0].generated_tokens == ("ĠParis",)


def test_integrated_gradients_quadrature_through_method_args(tiny):
    m = tiny("gpt2", "integrated_gradients", method_args={"method": "riemann_trapezoid", "n_steps": 5})
    out = m.attribute(PROMPT, GEN, show_progress=False)
    assert out.info["attribution_args"] == {"method": "riemann_trapezoid", "n_steps": 5}
    legendre = m.attribute(PROMPT, GEN, method_args={"method": "gausslegendre"}, show_progress=False)
    assert not np.allclose(out[0].target_attributions[:8], legendre[0].target_attributions[:8])
    with pytest.raises(ValueError, match="Unknown integration method"):
        m.attribute(PROMPT, GEN, method_args={"method": "simpson"}, show_progress=False)


def test_contrast_alignment_pairs_with_repeated_and_shifted_positions(tiny):
    m = tiny("gpt2")
    # target: prompt(8) + "paris , france"; contrast: a longer text whose tokens 9 and 10 line up with steps 9, 10
    contrast = PROMPT + " rome rome , italy"
    pairs = [(8, 8), (9, 10), (10, 10)]  # steps 9 and 10 both aligned to contrast position 10
    out = m.attribute(PROMPT, GEN, step_scores=["contrast_prob"], contrast_targets=[contrast],
                      contrast_targets_alignments=pairs, show_progress=False)
    cids = m.tokenizer(contrast, return_tensors="pt").input_ids
    with torch.no_grad():
        probs = m.model(cids).logits[0].softmax(-1)
    expected = [probs[7, cids[0, 8]], probs[9, cids[0, 10]], probs[9, cids[0, 10]]]
    np.testing.assert_allclose(out[0].step_scores["contrast_prob"], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        m.attribute(PROMPT, GEN, step_scores=["contrast_prob"], contrast_targets=[contrast],
                    contrast_targets_alignments=[(8, 40)], show_progress=False)
