"""Block-wise recomputation in the gradient kernel (distattr/models/recompute.py): the same numbers as keeping every
block's activations, on every architecture and placement the kernel serves, with a fraction of the saved memory;
``auto`` switches it on when a row does not fit the token budget."""

import numpy as np
import pytest
import torch

import distattr
from distattr.methods.gradient import Memory, kernel_memory
from distattr.models.adapters import block_stack
from distattr.models.memory import recompute_kept_share
from distattr.models.recompute import recomputed_blocks, transformer_blocks

TEXT = "the cat is in the house of paris and the dog is in rome , the tower"
METHODS = [("saliency", {}), ("input_x_gradient", {}), ("integrated_gradients", {"n_steps": 5}),
           ("gradient_shap", {"n_samples": 3, "seed": 3}), ("discretized_integrated_gradients", {"n_steps": 3})]
LAYER_METHODS = [("layer_gradient_x_activation", {}), ("layer_integrated_gradients", {"n_steps": 3})]


def assert_columns_close(a, b, rtol=1e-5):
    """Every generated-token column of every matrix equal within ``rtol`` of the column's largest value."""
    for x, y in zip(a.sequences, b.sequences, strict=True):
        assert x.target_tokens == y.target_tokens
        for name in ("target_attributions", "source_attributions"):
            u, v = getattr(x, name), getattr(y, name)
            if u is None:
                assert v is None
                continue
            u, v = np.nan_to_num(u.reshape(u.shape[0], u.shape[1], -1)), np.nan_to_num(v.reshape(u.shape[0],
                                                                                                 u.shape[1], -1))
            scale = np.abs(u).max(axis=0, keepdims=True) + 1e-30
            assert (np.abs(u - v) / scale).max() <= rtol, (name, (np.abs(u - v) / scale).max())


class Recomputations:
    """Counts forwards of each block's first weight-holding module with gradients enabled: a block recomputed in a
    backward runs it again."""

    def __init__(self, model):
        self.calls = 0
        firsts = [next(m for m in b.modules() if list(m.parameters(recurse=False))) for b in transformer_blocks(model)]
        self.handles = [m.register_forward_hook(self.hook) for m in firsts]

    def hook(self, *args):
        if torch.is_grad_enabled():
            self.calls += 1

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def tiny_models():
    from tiny import tiny_model

    out = {}
    for kind in ("gpt2", "llama", "t5", "bart", "marian"):
        model, tok = tiny_model(kind)
        out[kind] = distattr.load_model(model, "saliency", tokenizer=tok)
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5", "bart", "marian"])
@pytest.mark.parametrize("method, args", METHODS)
def test_recomputation_gives_the_same_numbers(tiny_models, kind, method, args):
    model = tiny_models[kind]
    kwargs = {"method": method, "generation_args": {"max_new_tokens": 4}, "show_progress": False, **args}
    kept = model.attribute(TEXT, recompute="never", **kwargs)
    counter = Recomputations(model.model)
    try:
        recomputed = model.attribute(TEXT, generated_texts=kept.info["generated_texts"], recompute="always",
                                     **kwargs)
    finally:
        counter.close()
    forwards_only = Recomputations(model.model)
    try:
        model.attribute(TEXT, generated_texts=kept.info["generated_texts"], recompute="never", **kwargs)
    finally:
        forwards_only.close()
    assert counter.calls > forwards_only.calls > 0  # the blocks did run again in the backwards
    assert_columns_close(kept, recomputed)
    assert recomputed.info["recompute"] == "always"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("method, args", LAYER_METHODS)
def test_layer_methods_hooked_inside_recomputed_blocks(tiny_models, kind, method, args):
    """A hooked layer inside a block: its output is recomputed in the backward, and the gradient still reaches
    the leaf the forward hook created."""
    model = tiny_models[kind]
    inner = "transformer.h.1.mlp" if kind == "gpt2" else "model.layers.1.mlp"
    for layer in (None, inner):
        extra = dict(args) if layer is None else {**args, "target_layer": layer}
        kwargs = {"method": method, "generation_args": {"max_new_tokens": 4}, "show_progress": False, **extra}
        kept = model.attribute(TEXT, recompute="never", **kwargs)
        recomputed = model.attribute(TEXT, generated_texts=kept.info["generated_texts"], recompute="always",
                                     **kwargs)
        assert_columns_close(kept, recomputed)


@pytest.mark.parametrize("kind", ["t5", "bart", "marian"])
@pytest.mark.parametrize("method, args", LAYER_METHODS)
def test_encoder_decoder_layer_methods(tiny_models, kind, method, args):
    """The default layer of an encoder-decoder model is the encoder's embedding module (transformers 5 gives T5 and
    BART one of their own, tied to ``shared``, which the forward never calls): source attributions, recomputed or
    not, the same."""
    model = tiny_models[kind]
    kwargs = {"method": method, "generation_args": {"max_new_tokens": 3}, "show_progress": False, **args}
    kept = model.attribute(TEXT, recompute="never", **kwargs)
    recomputed = model.attribute(TEXT, generated_texts=kept.info["generated_texts"], recompute="always", **kwargs)
    assert kept[0].source_attributions is not None and np.abs(kept[0].source_attributions).sum() > 0
    assert_columns_close(kept, recomputed)


def test_saved_activations_shrink_to_the_block_boundaries(tiny_models):
    """What autograd saves for the backward, with and without recomputation (parameters excluded): with it, the
    hidden states entering the blocks and what surrounds the blocks, a small share of the whole."""
    model = tiny_models["llama"]
    params = {p.untyped_storage().data_ptr() for p in model.model.parameters()}

    def saved_bytes(mode):
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        text = " ".join([TEXT] * 6)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.attribute(text, text + " the cat", recompute=mode, show_progress=False)
        return sum(seen.values())

    never, always = saved_bytes("never"), saved_bytes("always")
    assert always < 0.5 * never, (always, never)


def test_auto_recomputes_rows_longer_than_the_budget(tiny_models):
    model = tiny_models["llama"]
    long_text = " ".join([TEXT] * 4)
    generated = long_text + " the cat"
    for budget, recomputes in ((8, True), (4096, False)):
        counter, plain = Recomputations(model.model), Recomputations(model.model)
        try:
            model.attribute(long_text, generated, recompute="auto", token_budget=budget, show_progress=False)
            counter.close()
            model.attribute(long_text, generated, recompute="never", token_budget=budget, show_progress=False)
        finally:
            counter.close()
            plain.close()
        assert (counter.calls > plain.calls - counter.calls) == recomputes, (budget, counter.calls, plain.calls)


def test_memory_policy():
    plain = Memory(1000)
    assert not plain.recompute and plain.batch_tokens == 1000 and plain.slots_per_backward(100) == 80
    recompute = Memory(1000, True, 0.1, 30)
    assert recompute.batch_tokens == 5000  # half of the budget for what the batch keeps
    assert recompute.slots_per_backward(5000) == 3  # the other half: 5000-token slots through one block of 30
    assert recompute.slots_per_backward(10**6) == 1  # at least one slot, whatever the length

    from tiny import tiny_model

    model, _ = tiny_model("llama")
    assert kernel_memory(model, 64, 64, "auto") == Memory(64)
    assert kernel_memory(model, 64, 65, "auto").recompute
    assert kernel_memory(model, 64, 10, "always").kept_share == pytest.approx(recompute_kept_share(model.config))
    assert not kernel_memory(model, 64, 10**6, "never").recompute


def test_the_blocks_are_restored_and_remote_blocks_left_alone(tiny_models):
    model = tiny_models["llama"].model
    blocks = block_stack(model)
    before = [b.__dict__.get("forward") for b in blocks]
    with recomputed_blocks(model):
        assert all("forward" in b.__dict__ for b in blocks)
    assert [b.__dict__.get("forward") for b in blocks] == before

    class Remote(torch.nn.Module):  # a block list entry without local weights (Petals' RemoteBlocks)
        def forward(self, hidden, **kwargs):
            return hidden

    from tiny import tiny_model

    other, _ = tiny_model("llama")
    other.model.layers = torch.nn.ModuleList([Remote()])
    assert transformer_blocks(other) == []


def test_bad_recompute_value_is_one_line(tiny_models):
    with pytest.raises(ValueError, match="recompute must be one of auto, always, never, not 'sometimes'"):
        tiny_models["llama"].attribute(TEXT, recompute="sometimes", show_progress=False)


@pytest.mark.parametrize("method, args", [("saliency", {}), ("integrated_gradients", {"n_steps": 3})])
def test_device_map_with_disk_offload(tmp_path, method, args):
    """Each block recomputed on its device: accelerate's hooks load an offloaded block again for its recomputation."""
    from tiny import tiny_model

    model, tok = tiny_model("llama")
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    layers = ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head")
    placement = dict.fromkeys(layers, "cpu") | {"model.layers.1": "disk"}
    plain = distattr.load_model(str(folder), method, **args)
    mapped = distattr.load_model(str(folder), method, device_map=placement,
                                 model_kwargs={"offload_folder": str(tmp_path / "off")}, **args)
    want = plain.attribute(TEXT, generation_args={"max_new_tokens": 3}, recompute="never", show_progress=False)
    got = mapped.attribute(TEXT, want.info["generated_texts"], recompute="always", show_progress=False)
    assert_columns_close(want, got)


@pytest.mark.slow
def test_embedded_model_long_prompt():
    """SmolLM2-135M on a ~400-token prompt: recomputed saliency equals the plain one within 1e-5 per column."""
    model = distattr.load_model("smollm2-135m", "saliency")
    sentence = ("The Eiffel Tower is located in the city of Paris, which is the capital of France and one of the "
                "most visited cities in the world. ")
    ids = model.tokenizer(sentence * 20)["input_ids"][:404]
    prompt, text = model.tokenizer.decode(ids[:400]), model.tokenizer.decode(ids)
    kept = model.attribute(prompt, text, recompute="never", show_progress=False)
    recomputed = model.attribute(prompt, text, recompute="always", show_progress=False)
    assert_columns_close(kept, recomputed)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_layers_recompute(kind):
    """bitsandbytes 4-bit and 8-bit layers recompute their matmuls: the same gradients as without recomputation."""
    pytest.importorskip("bitsandbytes")
    model = distattr.load_model("smollm2-135m", "saliency", quantization=kind)
    prompt = "The Eiffel Tower is located in the city of"
    kept = model.attribute(prompt, prompt + " Paris, France.", recompute="never", show_progress=False)
    recomputed = model.attribute(prompt, prompt + " Paris, France.", recompute="always", show_progress=False)
    assert_columns_close(kept, recomputed, rtol=1e-4)


@pytest.mark.slow
def test_planned_memory_matches_the_measured_peak(tmp_path):
    """benchmarks/bench_long_context.py at 1,024 tokens (a fresh process, the embedded model, saliency at the plan's
    budget with recomputation): the resident-set peak of the attribution call within 15% of the plan."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "bench_long_context.py"
    out = tmp_path / "long.json"
    done = subprocess.run([sys.executable, str(script), "--lengths", "1024", "--modes", "always", "--generated", "4",
                           "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (point,) = json.loads(out.read_text())["points"]
    assert point["planned_recompute"] and point["recompute_passes"] >= 1, point
    assert 0.85 <= point["ratio"] <= 1.15, point
