"""Results: JSON round trip, Inseq-style display aggregation, metadata."""

import json

import numpy as np
import pytest

import distattr
from distattr.aggregate import normalize_columns

PROMPT = "the cat is located in the city of"


@pytest.fixture(scope="module")
def outputs():
    from tiny import tiny_model

    import distattr

    model, tok = tiny_model("t5")
    m = distattr.load_model(model, "integrated_gradients", tokenizer=tok, n_steps=4)
    enc_dec = m.attribute(PROMPT, generation_args={"max_new_tokens": 4}, attribute_target=True,
                          step_scores=["probability", "entropy"], show_progress=False)
    model, tok = tiny_model("llama")
    m = distattr.load_model(model, "attention", tokenizer=tok)
    attention = m.attribute([PROMPT, "a dog"], generation_args={"max_new_tokens": 3}, show_progress=False)
    return {"enc_dec": enc_dec, "attention": attention}


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("which", ["enc_dec", "attention"])
def test_json_round_trip_is_exact(outputs, tmp_path, which):
    out = outputs[which]
    path = out.save(tmp_path / "out.json")
    back = distattr.load(path)
    assert back.info == json.loads(json.dumps(out.info, default=repr))
    assert len(back) == len(out)
    for a, b in zip(out, back, strict=True):
        for field in ("source_tokens", "target_tokens", "source_ids", "target_ids", "attr_pos_start", "attr_pos_end",
                      "dims", "dim_labels"):
            assert getattr(a, field) == getattr(b, field), field
        assert _same(a.source_attributions, b.source_attributions)
        assert _same(a.target_attributions, b.target_attributions)
        assert _same(a.deltas, b.deltas)
        assert a.step_scores.keys() == b.step_scores.keys()
        for k in a.step_scores:
            assert _same(a.step_scores[k], b.step_scores[k])


def test_json_fields_are_the_documented_contract(outputs, tmp_path):
    doc = json.loads(outputs["enc_dec"].save(tmp_path / "o.json").read_text())
    assert doc["format"] == "distattr.attribution" and doc["version"] == 1
    seq = doc["sequences"][0]
    for key in ("source_tokens", "target_tokens", "source_attributions", "target_attributions", "step_scores"):
        assert key in seq
    assert seq["target_attributions"]["shape"] == [len(seq["target_tokens"]),
                                                   seq["attr_pos_end"] - seq["attr_pos_start"]]
    assert None in seq["target_attributions"]["data"]  # NaN (future tokens) stored as null
    for key in ("model_name", "model_class", "attribution_method", "attribution_args", "attributed_fn", "versions",
                "timing", "generated_texts"):
        assert key in doc["info"], key
    assert doc["info"]["attribution_args"] == {"n_steps": 4}


def test_normalize_makes_columns_sum_to_one_over_source_and_target(outputs):
    seq = outputs["enc_dec"][0].aggregate()
    both = np.concatenate([seq.source_attributions, seq.target_attributions])
    np.testing.assert_allclose(np.nansum(np.abs(both), axis=0), 1.0, rtol=1e-5)
    raw = outputs["enc_dec"][0]
    assert np.isnan(seq.target_attributions).sum() == np.isnan(raw.target_attributions).sum()


def test_rescale_divides_by_global_max(outputs):
    raw = outputs["enc_dec"][0]
    seq = raw.aggregate(normalize=False, rescale=True)
    peak = max(np.nanmax(np.abs(raw.source_attributions)), np.nanmax(np.abs(raw.target_attributions)))
    np.testing.assert_allclose(seq.source_attributions, raw.source_attributions / peak, rtol=1e-6)
    with pytest.raises(ValueError, match="mutually exclusive"):
        raw.aggregate(normalize=True, rescale=True)


def test_attention_keeps_layers_and_heads_and_aggregates_like_inseq(outputs):
    seq = outputs["attention"][0]
    assert seq.dims == ("layer", "head")
    n_tokens, n_steps, n_layers, n_heads = seq.target_attributions.shape
    assert (n_layers, n_heads) == (2, 4) and n_steps == 3
    # Inseq: mean over heads, normalise columns, mean over layers, normalise columns
    x = np.nanmean(seq.target_attributions, axis=-1)
    _, x = normalize_columns(None, x)
    x = np.nanmean(x, axis=-1)
    _, x = normalize_columns(None, x)
    np.testing.assert_allclose(seq.aggregate().target_attributions, x, rtol=1e-6)
    # raw attention rows of each step sum to one over the visible tokens
    np.testing.assert_allclose(np.nansum(seq.target_attributions, axis=0), 1.0, rtol=1e-5)


def test_aggregation_works_on_results_read_back(outputs, tmp_path):
    out = outputs["attention"]
    back = distattr.load(out.save(tmp_path / "a.json"))
    assert _same(back[1].aggregate().target_attributions, out[1].aggregate().target_attributions)


def test_save_refuses_to_overwrite_when_asked(outputs, tmp_path):
    path = outputs["enc_dec"].save(tmp_path / "x.json")
    with pytest.raises(FileExistsError):
        outputs["enc_dec"].save(path, overwrite=False)
