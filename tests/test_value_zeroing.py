"""``value_zeroing``: parity with Inseq 0.7.1, the fast path against the generic one, rollout, module names.

Inseq 0.7.1 crashes on value zeroing with transformers 5 for most models (pinned below, so that a fixed Inseq
shows up): blocks now return a tensor instead of a tuple, and its state-patching hook does ``output[:0] +
(clean,) + output[1:]`` (``TypeError`` for Llama, BART, ...); GPT-2's value variable was renamed ``value`` ->
``value_states`` (its ``ModelConfig`` no longer matches). The parity tests run Inseq's own algorithm with those
two fixed (``fixed_inseq``): the hook returns the clean tensor when the block returns a tensor, and GPT-2's
config names ``value_states``. Everything else is Inseq's code, at batch size 1 with eager attention.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from inseq_compat import value_zeroing_hook_factory
from tiny import tiny_model

import distattr
from distattr.methods.value_zeroing import ARCHITECTURES, ValueZeroingArgs, parse_module_spec

inseq = pytest.importorskip("inseq")

logging.getLogger("inseq").setLevel(logging.ERROR)
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]

PROMPT = "the cat is located in the city of"
ENC_DEC = ("t5", "bart")
REL = 1e-4




@pytest.fixture
def fixed_inseq(monkeypatch):
    """Inseq's value zeroing with its two transformers-5 incompatibilities fixed (module docstring)."""
    from inseq.attr.feat.ops.value_zeroing import ValueZeroing
    from inseq.models.model_config import MODEL_CONFIGS, ModelConfig

    get_hook = value_zeroing_hook_factory(ValueZeroing.get_states_extract_and_patch_hook)
    monkeypatch.setattr(ValueZeroing, "get_states_extract_and_patch_hook", get_hook)
    monkeypatch.setitem(MODEL_CONFIGS, "GPT2LMHeadModel",
                        ModelConfig(self_attention_module="attn", value_vector="value_states"))


def assert_columns_close(ours, theirs, rel: float = REL, what: str = "") -> None:
    """``|a - b| <= rel * L1(column of b)`` (a column: one step of one layer) and NaN at the same places."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shapes differ: ours {a.shape}, Inseq {b.shape}"
    assert (np.isnan(a) == np.isnan(b)).all(), f"{what}: NaN positions differ"
    a, b = np.nan_to_num(a), np.nan_to_num(b)
    tol = rel * np.abs(b).sum(axis=0, keepdims=True) + 1e-9
    bad = np.abs(a - b) > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} values differ, worst {float((np.abs(a - b) - tol).max()):.3g}"


def ours_and_generated(kind: str, prompt: str = PROMPT, generated=None, **kwargs):
    model, tok = tiny_model(kind)
    dm = distattr.load_model(model, "value_zeroing", tokenizer=tok)
    gen = None if generated is not None else {"max_new_tokens": 5}
    return dm.attribute(prompt, generated, generation_args=gen, show_progress=False, **kwargs)


def inseq_value_zeroing(kind: str, prompt, generated, **kwargs):
    model, tok = tiny_model(kind)
    im = inseq.load_model(model, "value_zeroing", tokenizer=tok)
    if kind not in ENC_DEC:
        kwargs.pop("attribute_target", None)
    return im.attribute(prompt, generated, batch_size=1, show_progress=False, **kwargs)


def compare(ours, theirs, what: str, rel: float = REL) -> None:
    for s, t in zip(ours, theirs.sequence_attributions, strict=True):
        assert list(s.target_tokens) == [x.token for x in t.target], what
        assert (s.attr_pos_start, s.attr_pos_end) == (t.attr_pos_start, t.attr_pos_end), what
        for side in ("source", "target"):
            a, b = getattr(s, f"{side}_attributions"), getattr(t, f"{side}_attributions")
            assert (a is None) == (b is None), f"{what} {side}"
            if a is not None:
                b = b.float().numpy()
                assert np.nanmax(b) > 0, f"{what} {side}: empty reference"
                assert_columns_close(a, b, rel=rel, what=f"{what} {side}")


# ---------------------------------------------------------------- parity with Inseq


PARITY = [("gpt2", True, "pairs"), ("gpt2", True, "rerun"), ("llama", True, "pairs"), ("llama", True, "rerun"),
          ("t5", True, "auto"), ("t5", False, "auto"), ("bart", True, "auto"), ("bart", False, "auto")]


@pytest.mark.parametrize(("kind", "attribute_target", "strategy"), PARITY)
def test_matches_inseq(fixed_inseq, kind, attribute_target, strategy):
    kw = {"attribute_target": attribute_target} if kind in ENC_DEC else {}
    ours = ours_and_generated(kind, strategy=strategy, **kw)
    s = ours[0]
    matrix = s.target_attributions if s.target_attributions is not None else s.source_attributions
    assert s.dims == ("layer",) and matrix.shape[-1] == 2
    theirs = inseq_value_zeroing(kind, PROMPT, ours.info["generated_texts"], **kw)
    compare(ours, theirs, f"{kind} {strategy}")


def test_rows_are_normalised_and_causal():
    s = ours_and_generated("llama")[0]
    t = s.target_attributions  # [tokens, steps, layers]
    np.testing.assert_allclose(np.nansum(t, axis=0), 1.0, rtol=1e-5)
    for col, step in enumerate(range(s.attr_pos_start, s.attr_pos_end)):
        assert np.isnan(t[step:, col]).all() and not np.isnan(t[:step, col]).any()
    assert (np.nan_to_num(t) >= 0).all()


def test_rollout_matches_joint_attention_of_inseqs_matrices(fixed_inseq):
    """With a one-token prompt every row of every layer's matrix is some step's column, so Inseq's per-layer output
    holds the full matrices; Mohebbi et al.'s ``compute_joint_attention(res=False)`` of them is our rollout."""
    generated = ours_and_generated("gpt2", prompt="the").info["generated_texts"][0]
    theirs = inseq_value_zeroing("gpt2", "the", generated).sequence_attributions[0]
    per_layer = np.nan_to_num(theirs.target_attributions.float().numpy())  # [tokens, steps = tokens - 1, layers]
    matrices = per_layer[:-1].transpose(2, 1, 0)  # [layers, query i = step - 1, key j]
    joint = [matrices[0]]
    for layer in range(1, len(matrices)):
        joint.append(matrices[layer] @ joint[-1])
    expected = np.stack(joint).transpose(2, 1, 0)
    expected = np.concatenate([expected, np.zeros_like(expected[:1])])
    expected[np.isnan(theirs.target_attributions.float().numpy())] = np.nan
    for strategy in ("pairs", "rerun"):
        ours = ours_and_generated("gpt2", prompt="the", generated=generated, rollout=True, strategy=strategy)[0]
        assert_columns_close(ours.target_attributions, expected, what=f"rollout {strategy}")
        np.testing.assert_allclose(np.nansum(ours.target_attributions, axis=0), 1.0, rtol=1e-5)
    plain = ours_and_generated("gpt2", prompt="the", generated=generated)[0].target_attributions
    np.testing.assert_array_equal(np.isnan(plain), np.isnan(ours.target_attributions))
    assert_columns_close(ours.target_attributions[..., 0], plain[..., 0], what="rollout layer 0 = layer 0")


# ---------------------------------------------------------------- Inseq's bugs, pinned


@pytest.mark.parametrize(("kind", "error"), [("llama", TypeError), ("bart", TypeError), ("gpt2", ValueError)])
def test_inseq_value_zeroing_crashes_on_transformers5(kind, error):
    generated = ours_and_generated(kind).info["generated_texts"]
    with pytest.raises(error):
        inseq_value_zeroing(kind, PROMPT, generated)


def test_inseq_euclidean_fails_ours_is_the_l2_distance(fixed_inseq):
    ours = ours_and_generated("gpt2", similarity_metric="euclidean")
    with pytest.raises(RuntimeError, match="expanded size"):  # 1 - cdist(...) is [L, L], stored into an [L] slot
        inseq_value_zeroing("gpt2", PROMPT, ours.info["generated_texts"], similarity_metric="euclidean")
    rerun = ours_and_generated("gpt2", generated=ours.info["generated_texts"], similarity_metric="euclidean",
                               strategy="rerun")
    assert_columns_close(ours[0].target_attributions, rerun[0].target_attributions, what="euclidean")
    np.testing.assert_allclose(np.nansum(ours[0].target_attributions, axis=0), 1.0, rtol=1e-5)
    cosine = ours_and_generated("gpt2", generated=ours.info["generated_texts"])[0].target_attributions
    assert np.nanmax(np.abs(cosine - ours[0].target_attributions)) > 1e-3


# ---------------------------------------------------------------- strategies, fallback, module names


def test_fallback_to_rerun_when_the_decomposition_does_not_hold(caplog):
    """A wrong output projection fails the checks: ``auto`` falls back (same numbers as ``rerun``), ``pairs``
    refuses."""
    wrong = {"value_module": "attn.c_attn[2/3]", "output_module": "mlp.c_proj"}
    generated = ours_and_generated("gpt2").info["generated_texts"]
    with caplog.at_level(logging.WARNING, logger="distattr.methods.value_zeroing"):
        fallback = ours_and_generated("gpt2", generated=generated, **wrong)
    assert "rerun" in caplog.text
    rerun = ours_and_generated("gpt2", generated=generated, strategy="rerun")
    np.testing.assert_allclose(fallback[0].target_attributions, rerun[0].target_attributions, rtol=1e-6)
    with pytest.raises(ValueError, match="pairs"):
        ours_and_generated("gpt2", generated=generated, strategy="pairs", **wrong)


@pytest.mark.parametrize("kind", ("gpt2", "llama"))
def test_fast_path_recomputes_internals_beyond_the_memory_cap(kind, monkeypatch):
    """With no room to keep attention weights from the clean forward, each block is re-run once to get them."""
    import distattr.methods.value_zeroing as vz

    kept = ours_and_generated(kind, rollout=True)
    monkeypatch.setattr(vz, "RECORD_BYTES", 0)
    again = ours_and_generated(kind, generated=kept.info["generated_texts"], rollout=True)
    np.testing.assert_allclose(again[0].target_attributions, kept[0].target_attributions, rtol=1e-6, atol=1e-7)


def test_unknown_architecture_needs_module_names(monkeypatch):
    model, tok = tiny_model("gpt2")
    monkeypatch.setattr(model.config, "model_type", "mystery")  # the config object is shared by tiny_model's copies
    dm = distattr.load_model(model, "value_zeroing", tokenizer=tok)
    with pytest.raises(ValueError, match="value_module") as err:
        dm.attribute(PROMPT, generation_args={"max_new_tokens": 2}, show_progress=False)
    assert "attn.c_attn" in str(err.value)  # lists the block's modules
    out = dm.attribute(PROMPT, generation_args={"max_new_tokens": 2}, show_progress=False,
                       value_module="attn.c_attn[2/3]", output_module="attn.c_proj", layers="transformer.h",
                       final_norm="transformer.ln_f")
    with pytest.raises(ValueError, match="no module"):
        dm.attribute(PROMPT, generation_args={"max_new_tokens": 2}, show_progress=False, value_module="attn.v")
    monkeypatch.undo()
    default = ours_and_generated("gpt2", generated=out.info["generated_texts"])
    np.testing.assert_allclose(out[0].target_attributions, default[0].target_attributions, rtol=1e-6)


def test_argument_validation():
    with pytest.raises(ValueError, match="similarity_metric"):
        ValueZeroingArgs(similarity_metric="dot")
    with pytest.raises(ValueError, match="strategy"):
        ValueZeroingArgs(strategy="fast")
    with pytest.raises(ValueError, match="path"):
        ValueZeroingArgs(value_module="attn.c_attn[2]")
    with pytest.raises(ValueError, match="part 3 of 3"):
        ValueZeroingArgs(value_module="attn.c_attn[3/3]")
    with pytest.raises(ValueError, match="decoder-only"):
        ours_and_generated("t5", rollout=True)
    with pytest.raises(ValueError, match="decoder-only"):
        ours_and_generated("t5", strategy="pairs")


def test_parse_module_spec():
    assert parse_module_spec("self_attn.v_proj")[1](64) == slice(0, 64)
    path, select = parse_module_spec("attn.c_attn[2/3]")
    assert path == "attn.c_attn" and select(96) == slice(64, 96)
    assert parse_module_spec("qkv[-16:]")[1](48) == slice(32, 48)
    assert parse_module_spec("qkv[8:24]")[1](48) == slice(8, 24)
    with pytest.raises(ValueError, match="equal parts"):
        parse_module_spec("qkv[1/3]")[1](64)


def _meta_model(model_type: str):
    """A model of ``model_type`` with its default config on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model(model_type)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_config(config)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_registered_module_names_exist(model_type):
    from distattr.methods.value_zeroing import resolve_plan

    try:
        model = _meta_model(model_type)
    except (ValueError, KeyError, ImportError) as err:
        pytest.skip(f"transformers cannot build {model_type}: {err}")
    plan = resolve_plan(model, ValueZeroingArgs())  # raises when a registered path is missing
    assert len(plan.blocks) == len([m for m in plan.blocks])
    block = plan.blocks[0]
    assert isinstance(block.get_submodule(plan.value), torch.nn.Module)
    assert plan.output is not None and "." in plan.output
    if model.config.is_encoder_decoder:
        assert plan.cross_value is not None


SMALL = {"hidden_size": 32, "n_embd": 32, "d_model": 32, "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2,
         "num_decoder_layers": 2, "encoder_layers": 2, "decoder_layers": 2, "num_attention_heads": 4, "n_head": 4,
         "num_heads": 4, "encoder_attention_heads": 4, "decoder_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "d_ff": 64, "d_kv": 8,
         "head_dim": 8, "max_position_embeddings": 128, "n_positions": 128, "rotary_dim": 4, "num_experts": 4,
         "num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
         "shared_expert_intermediate_size": 32, "word_embed_proj_dim": 32,
         "attention_types": [[["global", "local"], 1]], "window_size": 16, "sliding_window": 16}


def _small_model(model_type: str):
    """A 2-layer random model of ``model_type`` on the tiny word vocabulary (eager attention)."""
    from tiny import BOS, EOS, PAD, VOCAB
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model(model_type)
    for key, value in {**SMALL, "vocab_size": len(VOCAB), "pad_token_id": PAD, "bos_token_id": BOS,
                       "eos_token_id": EOS, "decoder_start_token_id": PAD}.items():
        if hasattr(config, key):
            setattr(config, key, value)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("model_type", sorted(t for t in ARCHITECTURES if t not in ("gpt2", "llama", "t5", "bart")))
def test_every_registered_architecture_runs(model_type, caplog):
    """Decoder-only: the fast path passes its checks (no fallback) and equals the generic re-run. Encoder-decoder:
    the re-run gives normalised source rows (the final norm is found)."""
    from tiny import _tokenizer

    model = _small_model(model_type)
    dm = distattr.load_model(model, "value_zeroing", tokenizer=_tokenizer("eos" if model.config.is_encoder_decoder
                                                                          else None))
    if model.config.is_encoder_decoder:
        out = dm.attribute(PROMPT, "paris is big", show_progress=False, attribute_target=True)[0]
        np.testing.assert_allclose(out.source_attributions.sum(0), 1.0, rtol=1e-5)
        np.testing.assert_allclose(np.nansum(out.target_attributions, axis=0), 1.0, rtol=1e-5)
        return
    text = PROMPT + " paris is big"
    with caplog.at_level(logging.WARNING, logger="distattr.methods.value_zeroing"):
        fast = dm.attribute(PROMPT, text, show_progress=False)[0].target_attributions
    assert "rerun" not in caplog.text
    rerun = dm.attribute(PROMPT, text, show_progress=False, strategy="rerun")[0].target_attributions
    assert_columns_close(fast, rerun, what=model_type)


@pytest.mark.slow
def test_smollm2_matches_inseq_up_to_its_float32_cosine(fixed_inseq, monkeypatch):
    """The embedded SmolLM2 (Llama architecture, GQA, tied embeddings), eager attention on both sides.

    Inseq computes ``1 - cos`` in float32; for rows whose distances are all small (deep layers of a real model,
    ~1e-5) that loses up to 3e-3 of a normalised score and flips values across the 1e-5 threshold. distattr
    computes the distance in float64 (from the same float32 states): against the whole computation in float64
    it is within 1e-5, where Inseq is off by more than 1e-3. With Inseq's float32 cosine substituted, distattr
    matches Inseq up to what the float32 cosine makes of the last-bit differences of the states, which depend on
    the CPU's kernels: measured within 2e-4 of each column's L1 on an AMD EPYC, and on an Intel Xeon 3 of 1,500
    values at 1.9e-3 (the rest within 2e-4), hence 2e-3."""
    import distattr.methods.value_zeroing as vz

    dm = distattr.load_model("smollm2-135m", "value_zeroing", model_kwargs={"attn_implementation": "eager"})
    prompt = "The capital of France is"
    generated = dm.attribute(prompt, generation_args={"max_new_tokens": 5}, show_progress=False).info["generated_texts"]
    ours = dm.attribute(prompt, generated, show_progress=False)  # both re-tokenize the generated text
    im = inseq.load_model(dm.model, "value_zeroing", tokenizer=dm.tokenizer)
    theirs = im.attribute(prompt, generated, batch_size=1, show_progress=False)
    rerun = dm.attribute(prompt, generated, show_progress=False, strategy="rerun")
    assert_columns_close(ours[0].target_attributions, rerun[0].target_attributions, what="smollm2 pairs vs rerun")

    with monkeypatch.context() as m:
        m.setattr(vz, "_distance", lambda clean, corrupted, metric: (1 - torch.nn.functional.cosine_similarity(
            clean.float(), corrupted.float(), dim=-1)).double())
        as_inseq = dm.attribute(prompt, generated, show_progress=False)
    compare(as_inseq, theirs, "smollm2 with Inseq's float32 cosine", rel=2e-3)

    dm.model.double()
    exact = dm.attribute(prompt, generated, show_progress=False, strategy="rerun")[0].target_attributions
    assert_columns_close(ours[0].target_attributions, exact, rel=1e-5, what="smollm2 vs float64")
    inseq_error = np.nanmax(np.abs(theirs.sequence_attributions[0].target_attributions.numpy() - exact))
    assert inseq_error > 1e-3  # Inseq's float32 cosine; a more precise Inseq makes this fail
