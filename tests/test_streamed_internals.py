"""Internals streamed off the accelerator: ``attention`` and ``value_zeroing`` take each layer's attention
weights as the layer produces them (and keep on the device only what the next step needs), never all layers'.

The values are checked against a reference computed here the way ``attention`` did before streaming (one
``output_attentions=True`` forward per batch, all layers stacked, the steps' query rows sliced); the streaming by
weak references to the ``[B, heads, Lq, Lk]`` probability tensors the attention modules return: when a layer's
attention is computed, no earlier layer's is still alive, and the model was not asked to collect them.
"""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from tiny import ENCODER_DECODER, KINDS, tiny_model

from distattr.methods import internals
from distattr.methods import value_zeroing as vz
from distattr.methods.base import Example, Request
from distattr.methods.gradient import _pad_stack
from distattr.models.adapters import RowInputs, block_stack, wrap_model
from distattr.models.memory import LIVE_SHARE

pytestmark = pytest.mark.usefixtures("one_thread")

# (target length, first attributed position, source length) of each example: different lengths, so batches pad
SHAPES = ((9, 3, 5), (12, 1, 7), (6, 4, 3), (12, 5, 2), (4, 1, 6))


def make_request(kind: str, attribute_target: bool = True, token_budget: int = 8, seed: int = 0) -> Request:
    model, _ = tiny_model(kind)
    adapter = wrap_model(model)
    enc_dec = adapter.is_encoder_decoder
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n, start, s in SHAPES:
        ids = torch.randint(4, 60, (n,), generator=gen)
        source = torch.randint(4, 60, (s,), generator=gen) if enc_dec else None
        examples.append(Example(target_ids=ids, target_baseline=ids, start=start, end=n, source_ids=source))
    return Request(adapter=adapter, examples=examples, target_fn=None, attribute_target=attribute_target,
                   token_budget=token_budget)


def reference_batch(req: Request, indices: list[int]) -> dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """The attention of the examples ``indices`` as one batch, from the model's ``output_attentions=True`` (all
    layers stacked, as before streaming): ``{index: (source, target)}``, ``[tokens, steps, layers, heads]``."""
    adapter = req.adapter
    enc_dec = adapter.is_encoder_decoder
    exs = [req.examples[i] for i in indices]
    length = max(ex.end - 1 for ex in exs)
    inputs = {"target_ids": _pad_stack([ex.target_ids[: ex.end - 1] for ex in exs], length)}
    if enc_dec:
        src_len = max(len(ex.source_ids) for ex in exs)
        inputs["source_ids"] = _pad_stack([ex.source_ids for ex in exs], src_len)
        inputs["source_mask"] = _pad_stack([torch.ones(len(ex.source_ids), dtype=torch.long) for ex in exs], src_len)
    with torch.no_grad():
        out = adapter.forward(RowInputs(**inputs), torch.zeros(len(exs), length, dtype=torch.bool),
                              output_attentions=True)
    self_att = torch.stack([a.float() for a in (out.decoder_attentions if enc_dec else out.attentions)], dim=1)
    cross = torch.stack([a.float() for a in out.cross_attentions], dim=1) if enc_dec else None
    refs = {}
    for r, (i, ex) in enumerate(zip(indices, exs, strict=True)):
        steps = torch.arange(ex.start, ex.end)
        n_layers, n_heads = self_att.shape[1:3]
        target = source = None
        if req.attribute_target:
            n_keys = ex.end - 1
            target = torch.full((len(ex.target_ids), len(steps), n_layers, n_heads), float("nan"))
            target[:n_keys] = self_att[r, :, :, steps - 1, :n_keys].permute(3, 2, 0, 1)
            target[torch.arange(len(ex.target_ids)).view(-1, 1) >= steps.view(1, -1)] = float("nan")
        if enc_dec:
            source = cross[r, :, :, steps - 1, : len(ex.source_ids)].permute(3, 2, 0, 1).contiguous()
        refs[i] = (source, target)
    return refs


def assert_same(a: torch.Tensor | None, b: torch.Tensor | None, what: str) -> None:
    assert (a is None) == (b is None), what
    if a is not None:
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, what
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN positions differ"
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"{what}: values differ"


# ---------------------------------------------------------------- attention: values


@pytest.mark.parametrize(("kind", "attribute_target"),
                         [(kind, True) for kind in KINDS] + [(kind, False) for kind in ENCODER_DECODER])
def test_attention_equals_the_models_output_attentions(kind, attribute_target, monkeypatch):
    """Bit for bit what the stacked ``output_attentions=True`` forward gives, batch by batch (several batches,
    padded rows, NaN at future positions, cross-attention for encoder-decoder models)."""
    req = make_request(kind, attribute_target)
    batches = []
    run_batch = internals._attention_batch

    def recording(req, indices, *args, **kwargs):
        batches.append(list(indices))
        return run_batch(req, indices, *args, **kwargs)

    monkeypatch.setattr(internals, "_attention_batch", recording)
    outputs = internals.attention_attribution(req)
    assert len(batches) > 1 and sorted(i for b in batches for i in b) == list(range(len(SHAPES)))
    n_layers = len(block_stack(req.adapter.model))
    for indices in batches:
        for i, (source, target) in reference_batch(req, indices).items():
            out = outputs[i]
            assert_same(out.source, source, f"{kind} example {i} source")
            assert_same(out.target, target, f"{kind} example {i} target")
            assert out.extra_dims == ("layer", "head") and len(out.extra_labels[0]) == n_layers
            assert len(out.extra_labels[1]) == (out.target if out.target is not None else out.source).shape[-1]


@pytest.mark.parametrize("kind", KINDS)
def test_attention_matches_one_example_at_a_time(kind):
    """Each example of a padded batch equals its own unpadded ``output_attentions`` forward (up to float32
    rounding: the padded forward has other shapes)."""
    req = make_request(kind, token_budget=1 << 12)
    outputs = internals.attention_attribution(req)
    for i in range(len(SHAPES)):
        source, target = reference_batch(req, [i])[i]
        for got, want in ((outputs[i].source, source), (outputs[i].target, target)):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


# ---------------------------------------------------------------- attention: streaming


class AttentionTensors:
    """Weak references to every attention-probability tensor ``[B, heads, Lq, Lk]`` that a module returns
    (non-negative, rows summing to 1; T5's position bias is not one), seen by a global forward hook, which runs
    ahead of every module's own hooks. ``worst`` is the most earlier ones alive when a new one appears;
    ``overlaps`` lists those moments as ``(shapes of the earlier ones alive, shape of the new one)``."""

    def __init__(self):
        self.refs: list[weakref.ref] = []
        self.worst = 0
        self.overlaps: list[tuple[list[tuple[int, ...]], tuple[int, ...]]] = []

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.refs)

    def hook(self, module, args, output):
        for item in output if isinstance(output, tuple | list) else ():
            if (isinstance(item, torch.Tensor) and item.dim() == 4 and item.is_floating_point()
                    and item.shape[-1] > 1 and not any(ref() is item for ref in self.refs) and (item >= 0).all()
                    and torch.allclose(item.sum(-1), torch.ones(()), atol=1e-5)):
                alive = [tuple(t.shape) for t in (ref() for ref in self.refs) if t is not None]
                self.worst = max(self.worst, len(alive))
                if alive:
                    self.overlaps.append((alive, tuple(item.shape)))
                self.refs.append(weakref.ref(item))

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def model_calls(model, monkeypatch) -> list[tuple[dict, object]]:
    """``(kwargs, output)`` of every call of the model."""
    calls = []
    forward = model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(model, "forward", spy)
    return calls


def collected_tensors(out) -> int:
    """Attention tensors the model put in its output."""
    found = 0
    for key in ("attentions", "decoder_attentions", "cross_attentions", "encoder_attentions"):
        value = getattr(out, key, None)
        found += sum(isinstance(t, torch.Tensor) for t in value or ())
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_attention_holds_one_layers_weights_at_a_time(kind, monkeypatch):
    """When a layer's attention is computed, the weights of every earlier layer (and of the encoder) are gone:
    the method keeps CPU copies of the rows it needs, the model collects nothing, and the hooks are removed."""
    req = make_request(kind, token_budget=1 << 12)  # one batch
    model = req.adapter.model
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    calls = model_calls(model, monkeypatch)
    with AttentionTensors() as seen:
        outputs = internals.attention_attribution(req)
        alive = seen.alive()
    n_layers = len(block_stack(model))
    n_modules = n_layers * (3 if model.config.is_encoder_decoder else 1)  # encoder self, decoder self and cross
    assert len(seen.refs) == n_modules, "every attention module returned its weights"
    assert seen.worst == 0 and alive == 0, f"{seen.worst} earlier layers' attention alive"
    assert len(calls) == 1 and not calls[0][0].get("output_attentions")
    assert collected_tensors(calls[0][1]) == 0
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert all(o.target is not None for o in outputs)


def test_reference_forward_keeps_every_layer():
    """The probe sees the difference: with ``output_attentions=True`` every layer's weights stay alive."""
    req = make_request("llama", token_budget=1 << 12)
    with AttentionTensors() as seen:
        reference_batch(req, [0, 1])
    assert seen.worst == len(block_stack(req.adapter.model)) - 1


def test_modules_returning_weights_only_when_asked(monkeypatch):
    """Attention modules that return their weights only with ``output_attentions=True`` (older transformers) get a
    second forward that asks; the hooks still drop the weights, so the model collects none."""
    req = make_request("llama", token_budget=1 << 12)
    model = req.adapter.model
    for block in block_stack(model):
        attention = block.self_attn
        forward = attention.forward

        def only_when_asked(*args, _forward=forward, **kwargs):
            out, weights = _forward(*args, **kwargs)
            return out, weights if kwargs.get("output_attentions") else None

        monkeypatch.setattr(attention, "forward", only_when_asked)
    calls = model_calls(model, monkeypatch)
    with AttentionTensors() as seen:
        outputs = internals._attention_batch(req, [0, 1, 2], req.adapter.input_device)
    assert [bool(kwargs.get("output_attentions")) for kwargs, _ in calls] == [False, True]
    assert collected_tensors(calls[1][1]) == 0 and seen.worst == 0
    for i, (_, target) in reference_batch(req, [0, 1, 2]).items():
        assert_same(outputs[i].target, target, f"example {i}")


def test_non_eager_weights_are_refused(monkeypatch):
    req = make_request("llama", token_budget=1 << 12)
    for block in block_stack(req.adapter.model):
        forward = block.self_attn.forward
        monkeypatch.setattr(block.self_attn, "forward", lambda *a, _f=forward, **k: (_f(*a, **k)[0], None))
    with pytest.raises(ValueError, match="return no weights"):
        internals.attention_attribution(req)


def test_batches_count_one_layer_of_attention(monkeypatch):
    """Rows per batch: padded tokens plus one layer's ``[heads, L, L]`` within the inference budget, whatever
    the number of layers."""
    req = make_request("llama", token_budget=16)
    config = req.adapter.model.config
    per_entry = internals.attention_entry_tokens(req.adapter.model)
    # a budget token: NO_GRAD_BUDGET_FACTOR = 4 no-grad tokens of the activation model's bytes (LIVE_SHARE of 12
    # hidden + 4 intermediate float32 values per layer)
    bytes_per_token = int(LIVE_SHARE * (12 * config.hidden_size + 4 * config.intermediate_size) * 4) \
        * config.num_hidden_layers
    assert per_entry == pytest.approx(config.num_attention_heads * internals.ATTENTION_ENTRY_BYTES * 4
                                      / bytes_per_token)
    batches = []
    monkeypatch.setattr(internals, "_attention_batch",
                        lambda req, indices, *args, **kwargs: batches.append(list(indices)) or {
                            i: None for i in indices})
    internals.attention_attribution(req)
    for indices in batches:
        width = max(len(req.examples[i].target_ids) for i in indices)
        if len(indices) > 1:
            assert len(indices) * (width + per_entry * width ** 2) <= req.inference_token_budget
    assert len(batches) < len(SHAPES)  # some rows share a batch


# ---------------------------------------------------------------- value zeroing


def projections(kind: str, block):
    """The value projection, the attention output projection and the attention module of a tiny block."""
    if kind == "gpt2":
        return block.attn.c_attn, block.attn.c_proj, block.attn
    return block.self_attn.v_proj, block.self_attn.o_proj, block.self_attn


@pytest.mark.parametrize("kind", ("gpt2", "llama"))
@pytest.mark.parametrize("cap", ("none", "one"))
def test_value_zeroing_keeps_internals_of_the_blocks_that_fit_only(kind, cap, monkeypatch):
    """The fast path's clean forward keeps a block's attention internals (weights, values, output-projection
    input and output) only while they fit ``RECORD_BYTES``: the other blocks' are released when the block returns,
    not at the end of the forward; the model is not asked for attention weights. Same values as with room for
    all."""
    req = make_request(kind, token_budget=64)
    model = req.adapter.model
    plan = vz.resolve_plan(model, vz.ValueZeroingArgs())
    ex = req.examples[1]
    with torch.no_grad():
        _, _, kept = vz._clean_forward(req, plan, ex, first_row=ex.start - 1)
    assert all(rec is not None for rec in kept)
    first_size = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                      for t in (kept[0].weights, kept[0].value, kept[0].x, kept[0].attn_out)}.values())
    monkeypatch.setattr(vz, "RECORD_BYTES", 0 if cap == "none" else first_size)
    blocks = block_stack(model)
    refs: list[list[weakref.ref]] = [[] for _ in blocks]
    dead_at_next_block: list[bool] = []
    handles = []
    for layer, block in enumerate(blocks):
        value, output, attention = projections(kind, block)

        def keep(*tensors, layer=layer):
            refs[layer].extend(weakref.ref(t) for t in tensors if isinstance(t, torch.Tensor))

        handles += [value.register_forward_hook(lambda m, a, o, keep=keep: keep(o)),
                    output.register_forward_pre_hook(lambda m, a, keep=keep: keep(a[0])),
                    attention.register_forward_hook(lambda m, a, o, keep=keep: keep(*o))]
        if layer:
            handles.append(block.register_forward_pre_hook(
                lambda m, a, layer=layer: dead_at_next_block.append(all(r() is None for r in refs[layer - 1]))))
    calls = model_calls(model, monkeypatch)
    try:
        with torch.no_grad():
            _, _, internals_ = vz._clean_forward(req, plan, ex, first_row=ex.start - 1)
    finally:
        for h in handles:
            h.remove()
    expect_kept = 0 if cap == "none" else 1
    assert [rec is not None for rec in internals_] == [i < expect_kept for i in range(len(blocks))]
    assert dead_at_next_block == [layer >= expect_kept for layer in range(len(blocks) - 1)]
    assert calls[0][0].get("output_attentions") is False and collected_tensors(calls[0][1]) == 0
    monkeypatch.undo()
    full = vz.value_zeroing_attribution(req, vz.ValueZeroingArgs())
    monkeypatch.setattr(vz, "RECORD_BYTES", 0 if cap == "none" else first_size)
    capped = vz.value_zeroing_attribution(req, vz.ValueZeroingArgs())
    for a, b in zip(full, capped, strict=True):
        assert_same(a.target, b.target, f"{kind} value zeroing")


@pytest.mark.parametrize("kind", ("llama", "t5"))
def test_value_zeroing_holds_one_layers_attention_at_a_time(kind):
    """No attention weights of an earlier block are alive when a block computes its own (clean forward and
    re-runs), beyond the fast path's copies of the needed rows. A T5 decoder block keeps its own self-attention
    weights (``[R, heads, L, L]``) while its cross-attention (``[R, heads, L, S]``, ``S != L`` here) runs: that
    is one block's attention."""
    req = make_request(kind, token_budget=64)
    req = dataclasses.replace(req, examples=req.examples[:2])
    with AttentionTensors() as seen:
        outputs = vz.value_zeroing_attribution(req, vz.ValueZeroingArgs())
    assert len(seen.refs) > 0 and seen.alive() == 0
    if kind == "t5":
        assert seen.worst == 1
        for alive, new in seen.overlaps:  # the same rows' self-attention, then their cross-attention
            assert alive[0][:3] == new[:3] and alive[0][-1] == alive[0][-2] != new[-1], (alive, new)
    else:
        assert seen.worst == 0, seen.overlaps
    assert all(o.target is not None for o in outputs)
