"""Bad input gets a clear error (one test per case the issue names)."""

import json

import pytest

import distattr

PROMPT = "the cat is located in the city of"


def test_unknown_method_lists_valid_ones(tiny):
    with pytest.raises(ValueError, match="Unknown attribution method 'salience'.*saliency"):
        tiny("gpt2", "salience")
    m = tiny("gpt2")
    with pytest.raises(ValueError, match="integrated_gradients"):
        m.attribute(PROMPT, method="nope", generation_args={"max_new_tokens": 2}, show_progress=False)


def test_unknown_method_argument_lists_valid_ones(tiny):
    with pytest.raises(ValueError, match="Unknown argument.*n_step.*Valid arguments: internal_batch_size, method, "
                                         "n_steps, return_convergence_delta"):
        tiny("gpt2", "integrated_gradients", n_step=3)


def test_unknown_step_function_lists_valid_ones(tiny):
    m = tiny("gpt2")
    with pytest.raises(ValueError, match="Unknown step function 'probabilty'.*probability"):
        m.attribute(PROMPT, step_scores=["probabilty"], generation_args={"max_new_tokens": 2}, show_progress=False)
    with pytest.raises(ValueError, match="Unknown step function"):
        m.attribute(PROMPT, attributed_fn="nope", generation_args={"max_new_tokens": 2}, show_progress=False)


def test_unknown_layer_name(tiny):
    m = tiny("gpt2", "layer_gradient_x_activation", target_layer="transformer.h.9.mlp")
    with pytest.raises(ValueError, match=r"Unknown layer\(s\) \['transformer.h.9.mlp'\].*transformer"):
        m.attribute(PROMPT, generation_args={"max_new_tokens": 2}, show_progress=False)


def test_method_needing_what_the_model_lacks(tiny):
    m = tiny("gpt2")
    with pytest.raises(ValueError, match="contrast_sources are for encoder-decoder models"):
        m.attribute(PROMPT, contrast_sources=["the dog"], attributed_fn="contrast_prob_diff",
                    generation_args={"max_new_tokens": 2}, show_progress=False)
    with pytest.raises(ValueError, match="contrast_force_inputs=True"):
        m.attribute(PROMPT, attributed_fn="kl_divergence", contrast_targets=[PROMPT + " paris"],
                    generation_args={"max_new_tokens": 1}, show_progress=False)


@pytest.mark.parametrize("bad", ["", "   ", []])
def test_empty_input(tiny, bad):
    m = tiny("gpt2")
    with pytest.raises(ValueError, match="empty|No input text"):
        m.attribute(bad, generation_args={"max_new_tokens": 2}, show_progress=False)


def test_non_string_input(tiny):
    with pytest.raises(TypeError, match="not a string"):
        tiny("gpt2").attribute([3], show_progress=False)


def test_prompt_longer_than_context(tiny):
    m = tiny("gpt2")  # n_positions = 128
    with pytest.raises(ValueError, match="does not fit the model's context of 128"):
        m.attribute(" ".join(["the"] * 200), generation_args={"max_new_tokens": 2}, show_progress=False)


def test_given_text_longer_than_context_is_refused_by_name(tiny):
    m = tiny("gpt2")  # n_positions = 128
    long_text = " ".join(["the"] * 200)
    with pytest.raises(ValueError, match=r"Sequence #0 has \d+ tokens, longer than .+'s context of 128 tokens"):
        m.attribute("the cat", "the cat " + long_text, show_progress=False)


def test_contrast_targets_count_mismatch(tiny):
    m = tiny("gpt2")
    with pytest.raises(ValueError, match="2 contrast targets for 1 inputs"):
        m.attribute(PROMPT, generated_texts=PROMPT + " paris", attributed_fn="contrast_prob_diff",
                    contrast_targets=[PROMPT + " rome", PROMPT + " london"], show_progress=False)


def test_contrast_too_short_for_alignment(tiny):
    m = tiny("gpt2")
    with pytest.raises(ValueError, match="no token aligned to target position"):
        m.attribute(PROMPT, generated_texts=PROMPT + " paris france", attributed_fn="contrast_prob_diff",
                    contrast_targets=[PROMPT + " rome"], show_progress=False)


@pytest.mark.parametrize("start,end,message", [(50, None, "fall outside"), (None, 99, "fall outside"),
                                               (10, 10, "Nothing to attribute"), (-1, -3, "Nothing to attribute")])
def test_attr_pos_out_of_range(tiny, start, end, message):
    m = tiny("gpt2")
    with pytest.raises(ValueError, match=message):
        m.attribute(PROMPT, generated_texts=PROMPT + " paris france .", attr_pos_start=start, attr_pos_end=end,
                    show_progress=False)


def test_generated_text_must_extend_prompt(tiny):
    with pytest.raises(ValueError, match="must start with its input"):
        tiny("gpt2").attribute(PROMPT, generated_texts="a dog said", show_progress=False)


def test_nonexistent_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="Model folder not found"):
        distattr.load_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        distattr.load_model(str(tmp_path / "missing.gguf"))


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTATTR_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match="Could not read GGUF file"):
        distattr.load_model(str(bad))
    assert not any((tmp_path / "cache").glob("*/complete"))


def test_json_that_is_not_a_result(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a distattr result"):
        distattr.load(plain)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        distattr.load(garbage)


def test_json_from_a_newer_format(tmp_path):
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"format": "distattr.attribution", "version": 99, "sequences": []}))
    with pytest.raises(ValueError, match="format version 99.*Upgrade distattr"):
        distattr.load(newer)


def test_bad_hidden_reduction(tiny):
    with pytest.raises(ValueError, match="hidden_reduction"):
        tiny("gpt2").attribute(PROMPT, hidden_reduction="max", generation_args={"max_new_tokens": 1},
                               show_progress=False)
