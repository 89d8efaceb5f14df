"""The engine against plain reference implementations (one forward+backward per step on the prefix,
written here with nothing but autograd), and the row planner."""

import numpy as np
import pytest
import torch

from distattr.methods.base import Example
from distattr.methods.rows import choose_width, pack, pack_suffixes, plan_units, unit_cost

PROMPT = "the cat is located in the city of"


def _baseline(ids, unk=0, eos=3):
    """Inseq's baseline: UNK everywhere but EOS."""
    return torch.where(ids == eos, ids, torch.full_like(ids, unk))


def _reference(model, adapter, ids, start, end, method, n_steps=8, source=None):
    """Per-step reference: (target [N, T], source [S, T] or None), L2 over the hidden size."""
    enc_dec = source is not None
    n = len(ids)
    out_t = np.full((n, end - start), np.nan, dtype=np.float32)
    out_s = np.full((len(source), end - start), np.nan, dtype=np.float32) if enc_dec else None
    with torch.no_grad():
        x_t = adapter.embed(ids)
        b_t = adapter.embed(_baseline(ids))
        if enc_dec:
            b_t[0] = x_t[0]  # decoder start token kept in the baseline
            x_s, b_s = adapter.embed(source), adapter.embed(_baseline(source))
    if method == "integrated_gradients":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        alphas, weights = (nodes + 1) / 2, weights / 2
    else:
        alphas, weights = [1.0], [1.0]
    for col, t in enumerate(range(start, end)):
        acc_t = torch.zeros_like(x_t[:t])
        acc_s = torch.zeros_like(x_s) if enc_dec else None
        for a, w in zip(alphas, weights, strict=True):
            zt = (b_t[:t] + a * (x_t[:t] - b_t[:t])).clone().requires_grad_(True)
            if enc_dec:
                zs = (b_s + a * (x_s - b_s)).clone().requires_grad_(True)
                logits = model(inputs_embeds=zs[None], decoder_inputs_embeds=zt[None] / adapter.decoder_divisor).logits
            else:
                logits = model(inputs_embeds=zt[None]).logits
            p = logits[0, -1].softmax(-1)[ids[t]]
            grads = torch.autograd.grad(p, [zt, zs] if enc_dec else [zt])
            acc_t += w * grads[0]
            if enc_dec:
                acc_s += w * grads[1]
        if method == "saliency":
            at, as_ = acc_t.abs(), (acc_s.abs() if enc_dec else None)
        elif method == "input_x_gradient":
            at, as_ = x_t[:t] * acc_t, (x_s * acc_s if enc_dec else None)
        else:
            at, as_ = (x_t[:t] - b_t[:t]) * acc_t, ((x_s - b_s) * acc_s if enc_dec else None)
        out_t[:t, col] = at.norm(dim=-1).detach().numpy()
        if enc_dec:
            out_s[:, col] = as_.norm(dim=-1).detach().numpy()
    return out_t, out_s


def _close(ours, ref, rel=1e-4):
    assert ours.shape == ref.shape
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    scale = np.nansum(np.abs(ref), axis=0, keepdims=True)
    assert np.nanmax(np.abs(ours - ref) / scale) <= rel


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients"])
@pytest.mark.parametrize("steps_per_row", [1, 2, None, 64])
def test_decoder_only_matches_reference(tiny, kind, method, steps_per_row):
    m = tiny(kind, method, **({"n_steps": 8} if method == "integrated_gradients" else {}))
    out = m.attribute(PROMPT, generation_args={"max_new_tokens": 5}, steps_per_row=steps_per_row, show_progress=False)
    seq = out[0]
    ids = torch.tensor(seq.target_ids)
    ref, _ = _reference(m.model, m.adapter, ids, seq.attr_pos_start, seq.attr_pos_end, method)
    _close(seq.target_attributions, ref)


@pytest.mark.parametrize("kind", ["t5", "marian"])
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_encoder_decoder_matches_reference(tiny, kind, method):
    m = tiny(kind, method, **({"n_steps": 8} if method == "integrated_gradients" else {}))
    out = m.attribute(PROMPT, generation_args={"max_new_tokens": 4}, attribute_target=True, show_progress=False)
    seq = out[0]
    ref_t, ref_s = _reference(m.model, m.adapter, torch.tensor(seq.target_ids), seq.attr_pos_start, seq.attr_pos_end,
                              method, source=torch.tensor(seq.source_ids))
    _close(seq.source_attributions, ref_s)
    _close(seq.target_attributions, ref_t)


def test_batched_equals_one_by_one_with_a_tight_token_budget(tiny):
    m = tiny("llama", "integrated_gradients", n_steps=6)
    prompts = [PROMPT, "a dog", "the big red house was built in the city of rome and"]
    together = m.attribute(prompts, generation_args={"max_new_tokens": 4}, token_budget=64, show_progress=False)
    for i, p in enumerate(prompts):
        alone = m.attribute(p, generation_args={"max_new_tokens": 4}, show_progress=False)
        _close(together[i].target_attributions, alone[0].target_attributions)
        np.testing.assert_allclose(together[i].deltas, alone[0].deltas, atol=1e-5)


def test_mc_dropout_restores_eval_mode(tiny):
    m = tiny("gpt2")
    m.model.config.resid_pdrop = 0.5
    out = m.attribute(PROMPT, generation_args={"max_new_tokens": 2}, step_scores=["mc_dropout_prob_avg"],
                      show_progress=False)
    assert not m.model.training
    assert out[0].step_scores["mc_dropout_prob_avg"].shape == (2,)


def test_contrast_force_inputs_scores_the_contrastive_forward(tiny):
    m = tiny("gpt2", "saliency")
    gen, contrast = PROMPT + " paris", "a dog is located in the city of rome"
    out = m.attribute(PROMPT, gen, attributed_fn="kl_divergence", contrast_targets=[contrast],
                      contrast_force_inputs=True, step_scores=["kl_divergence"], show_progress=False)
    assert np.isfinite(out[0].target_attributions[:8]).all()
    assert out[0].step_scores["kl_divergence"][0] > 0


def test_planner_width_minimises_cost_and_pack_respects_budget():
    ex = Example(target_ids=torch.zeros(60, dtype=torch.long), target_baseline=torch.zeros(60, dtype=torch.long),
                 start=20, end=60)
    width = choose_width([ex])

    def cost(w):
        steps = list(range(20, 60))
        return sum(unit_cost(c[-1], len(c)) for c in (steps[i:i + w] for i in range(0, 40, w)))

    assert all(cost(width) <= cost(w) for w in (1, 2, 4, 8, 16, 32, 40))
    units = plan_units([ex, ex], width)
    assert sorted(t for u in units for t in u.steps) == sorted(list(range(20, 60)) * 2)
    for budget in (50, 300, 5000):
        batches = pack(units, 7, budget)
        rows = {(p.unit, pt) for b in batches for p in b for pt in p.points}
        assert rows == {(u, pt) for u in range(len(units)) for pt in range(7)}
        for b in batches:
            width_b = max(units[p.unit].length for p in b)
            n_rows = sum(len(p.points) for p in b)
            assert n_rows * width_b <= budget or n_rows == 1


def test_several_layers_in_one_pass_equal_one_layer_at_a_time(tiny):
    layers = ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.1.self_attn"]
    m = tiny("llama", "layer_gradient_x_activation", target_layer=layers)
    together = m.attribute(PROMPT, generation_args={"max_new_tokens": 4}, show_progress=False)[0]
    assert together.dims == ("layer",) and together.dim_labels == (tuple(layers),)
    assert together.target_attributions.shape == (len(together.target_tokens), 4, 3)
    generated = m.tokenizer.decode(together.target_ids[1:])  # the same tokens, without the BOS
    for i, name in enumerate(layers):
        alone = m.attribute(PROMPT, generated, target_layer=name, show_progress=False)[0]
        _close(together.target_attributions[..., i], alone.target_attributions)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("steps_per_row", [1, None])
@pytest.mark.parametrize("token_budget", [16, 200])
def test_sequential_ig_from_a_cached_prefix_equals_whole_rows(tiny, kind, steps_per_row, token_budget):
    """Rows moving token j start at j after the clean prefix's KV cache; the values equal rows run whole."""
    import dataclasses

    from distattr.models.adapters import wrap_model

    cached = tiny(kind, "sequential_integrated_gradients", n_steps=5)
    assert cached.adapter.caches_prefixes
    whole = dataclasses.replace(cached, adapter=wrap_model(cached.model, prefix_cache=False))
    args = {"generation_args": {"max_new_tokens": 5, "min_new_tokens": 5}, "steps_per_row": steps_per_row,
            "token_budget": token_budget, "show_progress": False}
    prompts = [PROMPT, "a dog"]
    for a, b in zip(cached.attribute(prompts, **args), whole.attribute(prompts, **args), strict=True):
        _close(a.target_attributions, b.target_attributions, rel=1e-5)


def test_pack_suffixes_covers_every_row_within_the_budget():
    ex = Example(target_ids=torch.zeros(30, dtype=torch.long), target_baseline=torch.zeros(30, dtype=torch.long),
                 start=10, end=30)
    units = plan_units([ex], 4)
    n = 3  # points per moved token: point q moves token q // n

    def first(u, q):
        return q // n

    counts = [n * units[u].length for u in range(len(units))]
    for budget in (8, 64, 1000):
        batches = pack_suffixes(units, counts, budget, first)
        rows = [(p.unit, q) for b in batches for p in b for q in p.points]
        assert sorted(rows) == [(u, q) for u in range(len(units)) for q in range(counts[u])]
        for b in batches:
            assert len({p.unit for p in b}) == 1
            (piece,) = b
            width = units[piece.unit].length - first(piece.unit, piece.points[0])
            assert len(piece.points) * width <= budget or len(piece.points) == 1


def test_short_rows_run_eager_attention_on_the_cpu_with_the_same_values(tiny):
    from distattr.models.adapters import EAGER_EXTRA_MEMORY, batched_backward_attention

    m = tiny("llama", "integrated_gradients", n_steps=4)
    eager = m.attribute(PROMPT, generation_args={"max_new_tokens": 4}, show_progress=False)[0]
    m.model.set_attn_implementation("sdpa")
    config = m.model.config
    longest_short = int(EAGER_EXTRA_MEMORY * 16 * config.hidden_size // config.num_attention_heads)
    with batched_backward_attention(m.model, longest_short) as switched:
        assert switched and config._attn_implementation == "eager"
    assert config._attn_implementation == "sdpa"
    with batched_backward_attention(m.model, longest_short + 1) as switched:
        assert not switched and config._attn_implementation == "sdpa"
    sdpa = m.attribute(PROMPT, m.tokenizer.decode(eager.target_ids[1:]), show_progress=False)[0]  # same tokens
    assert config._attn_implementation == "sdpa"
    _close(sdpa.target_attributions, eager.target_attributions, rel=1e-5)
