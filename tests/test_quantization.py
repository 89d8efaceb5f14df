"""Quantized models (bitsandbytes NF4 and int8 on the CPU): gradients reach the input embeddings and agree with the
float32 model's, weights take less memory, and the CPU repacking of 4-bit weights (which silently breaks
gradients) cannot happen unnoticed."""

import sys

import numpy as np
import pytest
import torch

import distattr
from distattr import cli
from distattr.models.quantization import packed_4bit_layers, weight_bytes

PROMPT = "The Eiffel Tower is located in the city of"


def column_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each generated-token column (NaN = future tokens, counted as 0)."""
    a, b = np.nan_to_num(a), np.nan_to_num(b)
    return (a * b).sum(0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)


@pytest.fixture(scope="module")
def fp32():
    model = distattr.load_model("smollm2-135m", "saliency")
    generated = model.attribute(PROMPT, generation_args={"max_new_tokens": 4}, show_progress=False)
    return model, generated.info["generated_texts"][0], generated


@pytest.fixture(scope="module")
def quantized():
    """``{kind: AttributionModel}``, loaded once per module."""
    pytest.importorskip("bitsandbytes")
    return {kind: distattr.load_model("smollm2-135m", "saliency", quantization=kind) for kind in ("nf4", "int8")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_saliency_agrees_with_float32(fp32, quantized, kind):
    model, text, reference = fp32
    # the step score runs a no-grad forward before the gradients: the one that would repack 4-bit weights
    out = quantized[kind].attribute(PROMPT, text, step_scores=["probability"], show_progress=False)
    cosines = column_cosines(reference[0].target_attributions, out[0].target_attributions)
    print(f"{kind}: per-column cosine with float32 {np.round(cosines, 4).tolist()}")
    assert out[0].target_tokens == reference[0].target_tokens
    assert cosines[0] >= 0.98  # " Paris"
    assert cosines.mean() >= 0.98 and cosines.min() >= 0.95
    assert packed_4bit_layers(quantized[kind].model) == []
    info = out.info["quantization"]
    assert info["method"] == "bitsandbytes" and info["type"] == kind
    assert info["weight_bytes"] == weight_bytes(quantized[kind].model)


@pytest.mark.slow
def test_weights_take_less_memory(fp32, quantized):
    sizes = {"fp32": weight_bytes(fp32[0].model), **{k: weight_bytes(m.model) for k, m in quantized.items()}}
    print("weight bytes:", sizes)
    # SmolLM2-135M: 28.3M embedding parameters stay float32 (113 MB, tied LM head), 106M linear ones are quantized
    assert sizes["nf4"] < sizes["int8"] < sizes["fp32"]
    assert sizes["int8"] < 0.45 * sizes["fp32"] and sizes["nf4"] < 0.35 * sizes["fp32"]


@pytest.mark.slow
def test_integrated_gradients_through_nf4(fp32, quantized):
    model, text, _ = fp32
    args = {"method": "integrated_gradients", "n_steps": 4, "attr_pos_end": -2, "show_progress": False}
    want, got = model.attribute(PROMPT, text, **args)[0], quantized["nf4"].attribute(PROMPT, text, **args)[0]
    values = got.target_attributions[: got.attr_pos_start]
    assert np.isfinite(values).all() and (values > 0).all()
    assert np.isfinite(got.deltas).all()
    cosines = column_cosines(want.target_attributions, got.target_attributions)
    print(f"nf4 integrated gradients: per-column cosine with float32 {np.round(cosines, 4).tolist()}")
    assert cosines.min() >= 0.9


def _input_gradient_norms(model, ids: torch.Tensor) -> torch.Tensor:
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    probs = model(inputs_embeds=embeds).logits[0, -1].softmax(-1)
    probs.max().backward()
    return embeds.grad[0].norm(dim=-1)


@pytest.mark.slow
def test_repacked_4bit_weights_are_refused(fp32):
    """bitsandbytes repacks 4-bit weights for CPU inference in a no-grad eval forward on AVX512-BF16 CPUs; the
    packed layers have no autograd, so gradients come out wrong without any error. distattr switches the
    repacking off before the model runs and refuses models packed already."""
    functional = pytest.importorskip("bitsandbytes.functional")
    if not functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks 4-bit weights here")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from distattr.models import embedded

    reference, tokenizer = fp32[0].model, fp32[0].tokenizer
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    raw = AutoModelForCausalLM.from_pretrained(embedded.converted_dir("smollm2-135m"), dtype=torch.float32,
                                               quantization_config=config, device_map="cpu").eval()
    raw.requires_grad_(False)
    wanted = _input_gradient_norms(reference, ids)
    model = distattr.load_model(raw, "saliency", tokenizer=tokenizer)  # not run yet: accepted, repacking off
    with torch.no_grad():
        raw(ids)
    assert packed_4bit_layers(raw) == []
    assert torch.cosine_similarity(_input_gradient_norms(raw, ids), wanted, dim=0) > 0.98

    for module in raw.modules():  # undo the guard, as a model run elsewhere first would be
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        raw(ids)
    assert len(packed_4bit_layers(raw)) == 210  # 30 layers x 7 projections
    with pytest.warns(UserWarning, match="gemv_4bit: an autograd kernel was not registered"):
        broken = torch.cosine_similarity(_input_gradient_norms(raw, ids), wanted, dim=0)
    assert broken < 0.5  # the pitfall is real here: this is what the guard prevents
    with pytest.raises(RuntimeError, match="210 of 210 bitsandbytes 4-bit layers .* repacked for CPU inference"):
        model.attribute(PROMPT, generation_args={"max_new_tokens": 1}, show_progress=False)
    with pytest.raises(RuntimeError, match="Pass the model to distattr.load_model before running it"):
        distattr.load_model(raw, "saliency", tokenizer=tokenizer)


def test_missing_bitsandbytes_gives_the_install_command(monkeypatch, tmp_path):
    from tiny import tiny_model

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    hint = r"needs bitsandbytes, which is not installed: pip install 'distattr\[quant\]'"
    with pytest.raises(ImportError, match=hint):
        distattr.load_model(str(tmp_path / "m"), quantization="nf4")
    assert cli.main(["attribute", "x", "--model", str(tmp_path / "m"), "--quantization", "int8", "--no-show"]) == 2


def test_bad_quantization_arguments(tmp_path):
    from tiny import tiny_model
    from transformers import BitsAndBytesConfig

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="Unknown quantization 'int4'; use one of nf4, int8 or a BitsAndBytesConfig"):
        distattr.load_model(str(tmp_path / "m"), quantization="int4")
    with pytest.raises(TypeError, match="not int"):
        distattr.load_model(str(tmp_path / "m"), quantization=4)
    with pytest.raises(ValueError, match="quantizes nothing"):
        distattr.load_model(str(tmp_path / "m"), quantization=BitsAndBytesConfig())
    with pytest.raises(ValueError, match="quantization apply when distattr loads the model"):
        distattr.load_model(model, tokenizer=tok, quantization="nf4")
