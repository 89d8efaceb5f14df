"""Activation patching, attribution patching (AtP) and AtP*: equal to plain per-restoration / per-step references on
tiny models, AtP* recovering a component whose gradient paths cancel, results through JSON, Zarr, Ray and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distattr
from distattr.methods import patching
from distattr.models.adapters import attention_projection, block_part, block_stack

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "the cat is in the big red house"
TARGET = "the cat is in the big red house in paris"  # two attributed steps
CONTRAST = "a dog was on the big red house in paris"  # same token length, differs from position 0 on


# ---------------------------------------------------------------- plain references


def component_module(model, layer: int, component: str):
    """(module, channels) holding ``component`` in block ``layer``, found independently of distattr's Site."""
    block = block_stack(model)[layer]
    if component == "residual":
        return block, None
    if component in ("mlp", "attn"):
        return block_part(block, component), None
    return attention_projection(block, component)


def first(output):
    return output[0] if isinstance(output, tuple) else output


def run(model, embeds, hooks=()):
    """Logits ``[B, n, V]`` of a full forward from input embeddings, with forward hooks ``(module, fn)``."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        with torch.no_grad():
            return model(inputs_embeds=embeds).logits
    finally:
        for h in handles:
            h.remove()


def clean_components(model, embeds, component: str) -> list[torch.Tensor]:
    n_layers = len(block_stack(model))
    found: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in range(n_layers):
        module, _ = component_module(model, layer, component)
        hooks.append((module, lambda m, a, o, layer=layer: found.__setitem__(layer, first(o).detach().clone())))
    run(model, embeds, hooks)
    return [found[layer] for layer in range(n_layers)]


def noised(model, ids: torch.Tensor, span, samples: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """ROME's corruption as documented: embeddings + N(0, (scale * std(E))^2) on the span, ``samples`` draws."""
    table = model.get_input_embeddings().weight
    embeds = table[ids][None].repeat(samples, 1, 1).clone()
    sigma = scale * float(table.float().std())
    noise = torch.randn((samples, span[1] - span[0], table.shape[1]), generator=torch.Generator().manual_seed(seed))
    embeds[:, span[0]:span[1]] += noise * sigma
    return embeds


def probabilities(logits: torch.Tensor, ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``[B, T]`` probability of token ``t`` read at position ``t - 1`` for ``start <= t < end``."""
    steps = torch.arange(start, end)
    return logits[:, steps - 1].softmax(-1)[:, torch.arange(len(steps)), ids[steps]]


def reference_patching(model, ids: torch.Tensor, start: int, end: int, corrupted: torch.Tensor, component: str,
                       window: int) -> np.ndarray:
    """One full forward per (layer, position): the corrupted rows with a forward hook putting back the clean
    component at that position in the window's layers. Returns ``[n, T, L]`` mean indirect effects."""
    n = end - 1
    n_layers = len(block_stack(model))
    clean_embeds = model.get_input_embeddings()(ids[None, :n])
    clean = clean_components(model, clean_embeds, component)
    base = probabilities(run(model, corrupted), ids, start, end).mean(0)
    out = np.zeros((n, end - start, n_layers))
    for layer in range(n_layers):
        layers = range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))
        for p in range(n):
            hooks = []
            for m in layers:
                module, channels = component_module(model, m, component)

                def put(mod, args, output, m=m, p=p, channels=channels):
                    h = first(output).clone()
                    sel = slice(None) if channels is None else channels
                    h[:, p, sel] = clean[m][0, p, sel]
                    return (h, *output[1:]) if isinstance(output, tuple) else h

                hooks.append((module, put))
            restored = probabilities(run(model, corrupted, hooks), ids, start, end).mean(0)
            out[p, :, layer] = (restored - base).numpy()
    return out


def expected_matrix(values: np.ndarray, n_tokens: int, start: int, end: int, first_corrupted: int) -> np.ndarray:
    """A method's ``[N, T, L]`` from reference values ``[n, T, L]``: NaN for future tokens, 0 before the corruption."""
    out = np.full((n_tokens, end - start, values.shape[-1]), np.nan)
    out[: len(values)] = values
    out[:first_corrupted] = 0.0
    for k, t in enumerate(range(start, end)):
        out[t:, k] = np.nan
    return out


def attribute(tiny, kind: str, method: str, contrast: bool = False, token_budget: int | None = None, **args):
    model = tiny(kind, method)
    kwargs = {"contrast_targets": [CONTRAST]} if contrast else {}
    if token_budget is not None:
        kwargs["token_budget"] = token_budget
    out = model.attribute(PROMPT, TARGET, method_args=args, show_progress=False, **kwargs)
    return model, out.sequences[0]


# ---------------------------------------------------------------- activation patching


@pytest.mark.parametrize(("kind", "component", "window"), [
    ("llama", "residual", 1), ("llama", "mlp", 1), ("llama", "attn", 2), ("gpt2", "residual", 3),
    ("gpt2", "attn", 1), ("gpt2", "key", 1), ("llama", "query", 1),
])
@pytest.mark.parametrize("layer_rows", [True, False], ids=["block-by-block", "model-forward"])
def test_activation_patching_with_noise_equals_one_forward_per_restoration(tiny, monkeypatch, kind, component, window,
                                                                           layer_rows):
    monkeypatch.setattr(patching, "LAYER_ROWS", layer_rows)
    model, seq = attribute(tiny, kind, "activation_patching", component=component, window=window, corrupt_span=(2, 5),
                           noise_samples=3, seed=7, token_budget=40)
    ids = torch.tensor(seq.target_ids)
    start, end = seq.attr_pos_start, seq.attr_pos_end
    corrupted = noised(model.model, ids[: end - 1], (2, 5), samples=3, seed=7)
    ref = reference_patching(model.model, ids, start, end, corrupted, component, window)
    assert np.abs(ref).max() > 1e-3  # restorations change something
    np.testing.assert_allclose(seq.target_attributions, expected_matrix(ref, len(ids), start, end, 2), atol=1e-6)
    assert seq.dims == ("layer",) and seq.dim_labels == (("0", "1"),)


@pytest.mark.parametrize(("kind", "component", "window"), [("llama", "mlp", 3), ("gpt2", "residual", 1)])
@pytest.mark.parametrize("layer_rows", [True, False], ids=["block-by-block", "model-forward"])
def test_activation_patching_with_a_contrast_equals_one_forward_per_restoration(tiny, monkeypatch, kind, component,
                                                                                window, layer_rows):
    monkeypatch.setattr(patching, "LAYER_ROWS", layer_rows)
    model, seq = attribute(tiny, kind, "activation_patching", contrast=True, component=component, window=window,
                           token_budget=16)
    ids = torch.tensor(seq.target_ids)
    start, end = seq.attr_pos_start, seq.attr_pos_end
    other = torch.tensor(model.tokenizer(CONTRAST)["input_ids"])
    assert len(other) == len(ids)
    corrupted = model.model.get_input_embeddings()(other[None, : end - 1])
    ref = reference_patching(model.model, ids, start, end, corrupted, component, window)
    np.testing.assert_allclose(seq.target_attributions, expected_matrix(ref, len(ids), start, end, 0), atol=1e-6)
    clean = probabilities(run(model.model, model.model.get_input_embeddings()(ids[None, : end - 1])), ids, start, end)
    base = probabilities(run(model.model, corrupted), ids, start, end)
    np.testing.assert_allclose(seq.deltas, (clean - base)[0].numpy(), atol=1e-6)  # total effects


# ---------------------------------------------------------------- attribution patching


def corrupted_run(model, corrupted: torch.Tensor, component: str, drop: int | None = None, attentions: bool = False):
    """The corrupted rows with gradients: logits, each layer's component output (kept for autograd) and, with
    ``drop``, block ``drop``'s output rewired as ``input + (output - input).detach()`` (GradDrop's backward)."""
    blocks = block_stack(model)
    acts: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in range(len(blocks)):
        module, _ = component_module(model, layer, component)

        def keep(mod, args, output, layer=layer):
            h = first(output)
            z = torch.zeros_like(h, requires_grad=True)
            acts[layer] = (h.detach(), z)
            return (h + z, *output[1:]) if isinstance(output, tuple) else h + z

        hooks.append(module.register_forward_hook(keep))
    if drop is not None:
        def rewire(mod, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            return x + (first(output) - x).detach()

        hooks.insert(0, blocks[drop].register_forward_hook(rewire, with_kwargs=True))
    try:
        with torch.enable_grad():
            out = model(inputs_embeds=corrupted, output_attentions=attentions)
    finally:
        for h in hooks:
            h.remove()
    return out, [acts[layer] for layer in range(len(blocks))]


def reference_atp(model, ids, start, end, corrupted, component, window, drop=None) -> np.ndarray:
    """``[n, T, L]``: for each step, one backward of the corrupted rows' summed probabilities; (clean - corrupted)
    . gradient summed over the channels, mean over rows, summed over the window."""
    n = end - 1
    n_layers = len(block_stack(model))
    clean = clean_components(model, model.get_input_embeddings()(ids[None, :n]), component)
    _, channels = component_module(model, 0, component)
    sel = slice(None) if channels is None else channels
    out = np.zeros((n, end - start, n_layers))
    for k in range(end - start):
        logits, acts = corrupted_run(model, corrupted, component, drop)
        logits = logits.logits
        probs = probabilities(logits, ids, start, end)[:, k].sum()
        grads = torch.autograd.grad(probs, [z for _, z in acts], allow_unused=True)
        grads = [torch.zeros_like(z) if g is None else g for (_, z), g in zip(acts, grads, strict=True)]
        per_layer = np.stack([((clean[m][0] - h)[..., sel] * g[..., sel]).sum(-1).mean(0).detach().numpy()
                              for m, ((h, _), g) in enumerate(zip(acts, grads, strict=True))], axis=-1)  # [n, L]
        for layer in range(n_layers):
            a, b = max(0, layer - window // 2), min(n_layers, layer - (-window // 2))
            out[:, k, layer] = per_layer[:, a:b].sum(-1)
    return out


@pytest.mark.parametrize(("kind", "component", "window", "contrast", "budget"), [
    ("llama", "residual", 1, False, 1), ("llama", "mlp", 3, True, None), ("gpt2", "attn", 1, False, None),
    ("gpt2", "value", 1, True, None), ("llama", "key", 1, False, None),
])
def test_attribution_patching_equals_one_backward_of_the_corrupted_run(tiny, kind, component, window, contrast,
                                                                       budget):
    args = {"component": component, "window": window, "token_budget": budget}  # budget 1: one step per backward
    if not contrast:
        args.update(corrupt_span=(1, 4), noise_samples=4, seed=3)
    model, seq = attribute(tiny, kind, "attribution_patching", contrast=contrast, **args)
    ids = torch.tensor(seq.target_ids)
    start, end = seq.attr_pos_start, seq.attr_pos_end
    if contrast:
        other = torch.tensor(model.tokenizer(CONTRAST)["input_ids"])
        corrupted, first_corrupted = model.model.get_input_embeddings()(other[None, : end - 1]), 0
    else:
        corrupted, first_corrupted = noised(model.model, ids[: end - 1], (1, 4), samples=4, seed=3), 1
    ref = reference_atp(model.model, ids, start, end, corrupted.detach(), component, window)
    assert np.abs(ref).max() > 1e-4
    np.testing.assert_allclose(seq.target_attributions, expected_matrix(ref, len(ids), start, end, first_corrupted),
                               atol=1e-5)


def test_atp_star_grad_drop_averages_the_absolute_estimates_with_each_layer_dropped(tiny):
    model, seq = attribute(tiny, "llama", "atp_star", component="mlp", corrupt_span=(1, 4), noise_samples=2, seed=5)
    ids = torch.tensor(seq.target_ids)
    start, end = seq.attr_pos_start, seq.attr_pos_end
    corrupted = noised(model.model, ids[: end - 1], (1, 4), samples=2, seed=5)
    n_layers = len(block_stack(model.model))
    dropped = [np.abs(reference_atp(model.model, ids, start, end, corrupted, "mlp", 1, drop=layer))
               for layer in range(n_layers)]
    ref = sum(dropped) / (n_layers - 1)
    assert np.all(dropped[1][:, :, 1] == 0)  # the dropped layer's own component gets nothing
    np.testing.assert_allclose(seq.target_attributions, expected_matrix(ref, len(ids), start, end, 1), atol=1e-5)
    assert np.nanmin(seq.target_attributions) >= 0


def reference_qk_fixed(model, ids, start, end, corrupted, component) -> np.ndarray:
    """``[n, T, L]`` QK-fixed estimates from their definition: layer ``m``'s attention probabilities in a forward with
    the query/key projection at ``p`` restored (exact), minus the corrupted ones, times d metric / d probabilities."""
    n = end - 1
    n_layers = len(block_stack(model))
    clean = clean_components(model, model.get_input_embeddings()(ids[None, :n]), component)
    out = np.zeros((n, end - start, n_layers))
    for k in range(end - start):
        result, _ = corrupted_run(model, corrupted, component, attentions=True)
        metric = probabilities(result.logits, ids, start, end)[:, k].sum()
        grads = torch.autograd.grad(metric, list(result.attentions))
        for m in range(n_layers):
            module, channels = component_module(model, m, component)
            sel = slice(None) if channels is None else channels
            for p in range(n):
                def put(mod, args, output, m=m, p=p, sel=sel):
                    h = first(output).clone()
                    h[:, p, sel] = clean[m][0, p, sel]
                    return h

                handle = module.register_forward_hook(put)
                try:
                    with torch.no_grad():
                        patched = model(inputs_embeds=corrupted, output_attentions=True).attentions[m]
                finally:
                    handle.remove()
                change = (patched - result.attentions[m].detach()) * grads[m]
                out[p, k, m] = float(change.sum()) / len(corrupted)
    return out


@pytest.mark.parametrize(("kind", "component"), [("llama", "key"), ("llama", "query"), ("gpt2", "key")])
def test_atp_star_qk_fix_is_the_exact_attention_change_times_its_gradient(tiny, kind, component):
    model, seq = attribute(tiny, kind, "atp_star", component=component, grad_drop=False, corrupt_span=(1, 4),
                           noise_samples=2, seed=1)
    ids = torch.tensor(seq.target_ids)
    start, end = seq.attr_pos_start, seq.attr_pos_end
    corrupted = noised(model.model, ids[: end - 1], (1, 4), samples=2, seed=1)
    ref = reference_qk_fixed(model.model, ids, start, end, corrupted, component)
    assert np.abs(ref).max() > 1e-4
    np.testing.assert_allclose(seq.target_attributions, expected_matrix(ref, len(ids), start, end, 1), atol=1e-5)


@pytest.mark.parametrize("component", ["key", "query"])
def test_qk_fix_brings_attribution_patching_closer_to_activation_patching(tiny, component):
    """Default tiny Llama (fixed weights and noise): the exact attention pattern halves AtP's error or better."""
    model = tiny("llama", "activation_patching")
    args = {"component": component, "corrupt_span": (1, 4), "noise_samples": 5}
    runs = {method: model.attribute(PROMPT, TARGET, method=method, method_args={**args, **extra},
                                    show_progress=False).sequences[0].target_attributions
            for method, extra in (("activation_patching", {}), ("attribution_patching", {}),
                                  ("atp_star", {"grad_drop": False}))}
    exact = runs["activation_patching"]
    atp_error = np.nansum(np.abs(runs["attribution_patching"] - exact))
    fixed_error = np.nansum(np.abs(runs["atp_star"] - exact))
    assert fixed_error < 0.5 * atp_error


# ---------------------------------------------------------------- AtP* on a model built to fool AtP


def cancelling_model(w2: float):
    """A 3-layer Llama with hand-set weights: attention off (``o_proj = 0``: positions do not mix), residual dims
    0 = a constant 4 (keeps the RMS norms nearly linear), 1 = +1 for "paris" / -1 for "rome", 2/3/4 = written by
    the MLPs of layers 0/1/2. MLP 0 writes ``~1.5 * dim1`` to dim 2; MLP 1 writes ``-silu(-3 dim2)`` (scaled) to
    dim 3, linear where the corrupted run ("rome": dim 2 < 0) sits and flat (0) where the clean one sits; MLP 2 writes
    a small multiple of dim 1 to dim 4. The target's logit reads ``w2 dim2 + dim3 + dim4``: with ``w2`` set so that
    the direct path and the path through MLP 1 cancel in the gradient, AtP gives MLP 0 nothing, while restoring it
    changes the logit (MLP 1 saturates)."""
    from tiny import BOS, EOS, PAD, VOCAB
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=8, intermediate_size=2, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:  # norms keep their unit weights
                p.zero_()
        embedding = model.model.embed_tokens.weight
        embedding[:, 0] = 4.0
        embedding[VOCAB["paris"], 1], embedding[VOCAB["rome"], 1] = 1.0, -1.0
        mlp = [layer.mlp for layer in model.model.layers]
        mlp[0].gate_proj.weight[0, 0], mlp[0].up_proj.weight[0, 1], mlp[0].down_proj.weight[2, 0] = 2.0, 1.0, 0.4
        mlp[1].gate_proj.weight[0, 2], mlp[1].up_proj.weight[0, 0], mlp[1].down_proj.weight[3, 0] = -3.0, 1.0, 0.1
        mlp[2].gate_proj.weight[0, 0], mlp[2].up_proj.weight[0, 1], mlp[2].down_proj.weight[4, 0] = 2.0, 1.0, 0.05
        model.lm_head.weight[VOCAB["."], 2:5] = torch.tensor([w2, 1.0, 1.0])
    return model


def test_atp_star_recovers_the_top_components_that_cancelling_gradients_hide_from_atp():
    from tiny import tiny_model

    tokenizer = tiny_model("llama")[1]

    def scores(w2: float, method: str) -> np.ndarray:
        model = distattr.load_model(cancelling_model(w2), method, tokenizer=tokenizer, component="mlp")
        out = model.attribute("the cat is in paris", "the cat is in paris .", contrast_targets=["the cat is in rome ."],
                              attributed_fn="logit", show_progress=False)
        return out.sequences[0].target_attributions[:6, 0, :]  # [positions, layers] of the one step

    # the gradient wrt MLP 0's output is affine in w2: choose the w2 that cancels it
    at0, at1 = scores(0.0, "attribution_patching")[5, 0], scores(1.0, "attribution_patching")[5, 0]
    w2 = float(-at0 / (at1 - at0))
    exact, atp, star = (np.abs(scores(w2, m)) for m in ("activation_patching", "attribution_patching", "atp_star"))

    def top(values: np.ndarray, k: int = 2) -> set[tuple[int, int]]:
        flat = np.argsort(-values, axis=None, kind="stable")[:k]
        return {tuple(int(i) for i in np.unravel_index(f, values.shape)) for f in flat}

    assert top(exact) == {(5, 0), (5, 1)}  # MLP 0 and MLP 1 at the corrupted position
    assert exact[5, 0] > 2 * exact[5, 2] and atp[5, 0] < 1e-6  # AtP sees nothing of MLP 0...
    assert top(atp) == {(5, 1), (5, 2)}  # ... and ranks MLP 2 in its place
    assert top(star) == top(exact)  # GradDrop finds it
    np.testing.assert_allclose(star[5, 0], exact[5, 0], rtol=0.2)


# ---------------------------------------------------------------- results: JSON, Zarr, Ray, CLI


def test_patching_results_round_trip_through_json_and_zarr(tiny, tmp_path):
    from distattr.store import open_store, save_outputs

    model = tiny("gpt2", "activation_patching", component="mlp", window=2, corrupt_span=(0, 3), noise_samples=2)
    out = model.attribute([PROMPT, "the dog was in rome"], [TARGET, "the dog was in rome and"],
                          step_scores=["probability"], show_progress=False)
    out.save(tmp_path / "out.json")
    loaded = distattr.load(tmp_path / "out.json")
    save_outputs(str(tmp_path / "s.zarr"), out, ids=["a", "b"], unit_size=1)
    store = open_store(str(tmp_path / "s.zarr"))
    assert store.complete and store.schema.dims == ("layer",)
    for i, expected in enumerate(out.sequences):
        assert expected.dims == ("layer",) and expected.dim_labels == (("0", "1"),)
        for got in (loaded.sequences[i], store[i].sequences[0]):
            assert got.dims == expected.dims and got.dim_labels == expected.dim_labels
            np.testing.assert_array_equal(got.target_attributions, expected.target_attributions)
            np.testing.assert_array_equal(got.deltas, expected.deltas)
            np.testing.assert_array_equal(got.step_scores["probability"], expected.step_scores["probability"])
    assert store.to_xarray().target_attributions.dims == ("example", "target_token", "step", "layer")


@pytest.mark.slow
def test_dataset_job_on_ray_equals_one_process(ray_head, tiny_dir, tmp_path):
    from distattr.store import open_store

    folder = tiny_dir("llama")
    rows = [{"prompt": PROMPT, "target": TARGET, "contrast": CONTRAST, "uid": "a"},
            {"prompt": "the cat is in paris", "target": "the cat is in paris .", "contrast": "a dog is in rome .",
             "uid": "b"},
            {"prompt": "she said that the house", "target": "she said that the house was red",
             "contrast": "he said that a tower was red", "uid": "c"}]
    url = str(tmp_path / "patching.zarr")
    args = {"component": "mlp", "window": 3}
    summary = distattr.attribute_dataset(folder, rows, url, "activation_patching", target_field="target",
                                         contrast_field="contrast", id_field="uid", actors=2, unit_size=1,
                                         method_args=args, step_scores=["probability"], show_progress=False)
    assert summary.complete and not summary.failures
    model = distattr.load_model(folder, "activation_patching", **args)
    ref = model.attribute([r["prompt"] for r in rows], [r["target"] for r in rows],
                          contrast_targets=[r["contrast"] for r in rows], step_scores=["probability"],
                          show_progress=False).sequences
    store = open_store(url)
    assert store.schema.dims == ("layer",)
    for i, expected in enumerate(ref):
        got = store.get(rows[i]["uid"]).sequences[0]
        assert got.target_ids == expected.target_ids and got.dim_labels == expected.dim_labels
        np.testing.assert_allclose(got.target_attributions, expected.target_attributions, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(got.deltas, expected.deltas, atol=1e-6)
    assert np.nanmax(np.abs(store.get("a").sequences[0].target_attributions)) > 1e-3


def test_cli_runs_activation_patching_with_method_arguments(tiny_dir, tmp_path, capsys):
    from distattr.cli import main

    path = tmp_path / "out.json"
    code = main(["attribute", PROMPT, "--model", tiny_dir("gpt2"), "--generated-texts", TARGET,
                 "--method", "activation_patching", "--method-arg", "component=mlp", "--method-arg", "window=2",
                 "--method-arg", "corrupt_span=1,4", "--method-arg", "noise_samples=2", "--output", str(path),
                 "--no-show", "--quiet"])
    assert code == 0, capsys.readouterr().err
    out = distattr.load(path)
    assert out.info["attribution_args"] == {"component": "mlp", "window": 2, "corrupt_span": [1, 4],
                                            "noise_samples": 2}
    seq = out.sequences[0]
    assert seq.dims == ("layer",) and seq.target_attributions.shape == (len(seq.target_ids), 2, 2)


# ---------------------------------------------------------------- causal tracing helper and refusals


def test_trace_is_one_activation_patching_step_as_layers_by_positions(tiny):
    from distattr.methods.patching import subject_span, trace

    model = tiny("llama")
    span = subject_span(model.tokenizer, "the big red house is in", "big red")
    assert span == (2, 4)  # BOS first
    result = trace(model, "the big red house is in", "paris", span, component="mlp", window=2, samples=3, seed=2)
    n_layers = 2
    assert result.scores.shape == (n_layers, 7) and result.tokens[0] == "<s>"
    out = model.attribute("the big red house is in", "the big red house is in paris", method="activation_patching",
                          method_args={"component": "mlp", "window": 2, "noise_samples": 3, "seed": 2,
                                       "corrupt_span": span, "corruption": "noise"},
                          step_scores=["probability"], show_progress=False).sequences[0]
    np.testing.assert_array_equal(result.scores, out.target_attributions[:7, 0, :].T)
    assert result.clean == pytest.approx(float(out.step_scores["probability"][0]))
    assert result.corrupted == pytest.approx(result.clean - float(out.deltas[0]))
    assert np.all(result.scores[:, :2] == 0)  # before the subject: nothing to restore
    np.testing.assert_allclose(result.restored, result.corrupted + result.scores)

    contrasted = trace(model, "the cat is in paris", ".", contrast="the cat is in rome")
    out = model.attribute("the cat is in paris", "the cat is in paris .", contrast_targets=["the cat is in rome ."],
                          method="activation_patching", step_scores=["probability"], show_progress=False).sequences[0]
    np.testing.assert_array_equal(contrasted.scores, out.target_attributions[:6, 0, :].T)
    assert np.all(contrasted.scores[:, :5] == 0) and np.any(contrasted.scores[:, 5] != 0)  # only "paris" differs


def test_refusals_are_one_line(tiny):
    from distattr.methods import check_remote

    with pytest.raises(ValueError, match="decoder-only") as err:
        tiny("t5", "activation_patching").attribute("the cat", "a dog", show_progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="same token length"):
        tiny("llama", "activation_patching").attribute(PROMPT, TARGET, contrast_targets=[CONTRAST + " and rome"],
                                                       show_progress=False)
    with pytest.raises(ValueError, match="needs a contrastive sequence"):
        tiny("llama", "atp_star", corruption="contrast").attribute(PROMPT, TARGET, show_progress=False)
    with pytest.raises(ValueError, match="corrupt_span"):
        tiny("llama", "attribution_patching", corrupt_span=(3, 40)).attribute(PROMPT, TARGET, show_progress=False)
    with pytest.raises(ValueError, match="component must be one of"):
        tiny("llama", "activation_patching", component="heads")
    for method in ("activation_patching", "attribution_patching", "atp_star"):
        with pytest.raises(ValueError, match="remote Petals"):
            check_remote(method, {})
