"""User methods: a plugin module registers ``embedding_norm`` (tests/plugin_method.py), which then runs through the
public API, the planner and ``distattr methods`` like a built-in; refusals are one line; entry points and plugin
modules load methods by name; ``check_remote`` answers from each method's entry."""

import importlib.metadata
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import distattr
from distattr import methods
from distattr.methods import check_remote, load_plugins, register_method
from distattr.methods.rows import RowModel, n_steps_rows
from distattr.planner import PlanError, plan

PROMPT = "the cat is located in the city of"
GEN = PROMPT + " paris , france"


@pytest.fixture
def registry(monkeypatch):
    """A copy of the built-in registry (no method another test registered) with the plugin freshly imported into
    it; both put back afterwards."""
    monkeypatch.setattr(methods, "METHODS", {k: v for k, v in methods.METHODS.items() if k in methods.BUILTIN_METHODS})
    monkeypatch.delitem(sys.modules, "plugin_method", raising=False)
    load_plugins(["plugin_method"])
    yield methods.METHODS
    sys.modules.pop("plugin_method", None)  # then monkeypatch puts back an earlier import, if any


def _expected_norms(m, ids, ord: float) -> torch.Tensor:
    """By hand: the p-norm of each token's embedding row times the model's embedding scale."""
    weight = m.model.get_input_embeddings().weight
    return (weight[torch.tensor(ids)] * m.adapter.embed_scale).abs().pow(ord).sum(-1).pow(1 / ord)


@pytest.mark.parametrize("ord", [2.0, 1.0])
def test_a_registered_method_runs_end_to_end_and_matches_a_hand_computation(tiny, registry, ord):
    m = tiny("gpt2", "embedding_norm", ord=ord)
    seq = m.attribute(PROMPT, GEN, show_progress=False)[0]
    assert seq.source_attributions is None
    start, end = seq.attr_pos_start, seq.attr_pos_end
    assert seq.target_attributions.shape == (len(seq.target_ids), end - start)
    norms = _expected_norms(m, seq.target_ids, ord).numpy()
    for column, t in enumerate(range(start, end)):
        np.testing.assert_allclose(seq.target_attributions[:t, column], norms[:t], rtol=1e-5)
        assert np.isnan(seq.target_attributions[t:, column]).all()  # future tokens


def test_a_registered_method_attributes_the_source_of_an_encoder_decoder(tiny, registry):
    m = tiny("t5", "embedding_norm")
    seq = m.attribute("the cat is big", "a dog", show_progress=False)[0]
    norms = _expected_norms(m, seq.source_ids, 2.0).numpy()
    steps = seq.attr_pos_end - seq.attr_pos_start
    assert seq.source_attributions.shape == (len(seq.source_ids), steps)
    np.testing.assert_allclose(seq.source_attributions, np.repeat(norms[:, None], steps, axis=1), rtol=1e-5)


def test_registered_methods_are_listed_like_built_in_ones(registry):
    from distattr.cli import method_lines

    assert "embedding_norm" in distattr.list_methods()
    line = next(line for line in method_lines() if line.split()[0] == "embedding_norm")
    assert "custom" in line and "ord=2.0" in line


def test_a_taken_or_bad_registration_is_refused_in_one_line(registry):
    spec = registry["embedding_norm"]
    cases = [
        (lambda: register_method("saliency", spec.run), "'saliency' is a built-in method; pass replace=True"),
        (lambda: register_method("embedding_norm", spec.run, spec.args), "'embedding_norm' is already registered"),
        (lambda: register_method("bad name", spec.run), "must be a Python identifier"),
        (lambda: register_method("no_run", None), "must be callable"),
        (lambda: register_method("dict_args", spec.run, dict), "must be a frozen dataclass"),
        (lambda: register_method("mutable_args", spec.run, _Mutable), "must be a frozen dataclass"),
        (lambda: register_method("bad_cost", spec.run, cost=3), "must be a distattr.methods.rows.RowModel"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    assert "mutable_args" not in registry and "no_run" not in registry


@dataclass
class _Mutable:
    x: int = 1


def test_replace_true_replaces_an_existing_entry(registry):
    old = registry["embedding_norm"]
    new = register_method("embedding_norm", old.run, old.args, summary="again", replace=True)
    assert registry["embedding_norm"] is new and new.summary == "again"


def test_unknown_or_bad_arguments_of_a_registered_method_are_one_line(tiny, registry):
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['p'\] for method 'embedding_norm'. "
                                         r"Valid arguments: ord$"):
        tiny("gpt2", "embedding_norm", p=1)
    m = tiny("gpt2", "saliency")
    with pytest.raises(ValueError, match="ord must be > 0") as err:
        m.attribute(PROMPT, GEN, method="embedding_norm", ord=-1.0, show_progress=False)
    assert "\n" not in str(err.value)


def test_a_plugin_module_that_cannot_be_imported_is_named_in_one_line():
    with pytest.raises(ValueError, match=r"^Cannot import plugin module 'no_such_plugin_xyz': "
                                         r"ModuleNotFoundError") as err:
        load_plugins(["no_such_plugin_xyz"])
    assert "\n" not in str(err.value)


def test_an_unknown_name_is_looked_up_in_the_entry_point_group(monkeypatch):
    monkeypatch.setattr(methods, "METHODS", {k: v for k, v in methods.METHODS.items() if k in methods.BUILTIN_METHODS})
    monkeypatch.delitem(sys.modules, "plugin_method", raising=False)
    points = [importlib.metadata.EntryPoint("embedding_norm", "plugin_method", "distattr.methods"),
              importlib.metadata.EntryPoint("broken", "no_such_plugin_xyz", "distattr.methods")]
    asked = []

    def entry_points(group):
        asked.append(group)
        return points if group == "distattr.methods" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    try:
        assert "embedding_norm" not in methods.METHODS
        assert methods.get_method("embedding_norm").args.__name__ == "EmbeddingNormArgs"
        assert asked == ["distattr.methods"] and "embedding_norm" in methods.METHODS
        with pytest.raises(ValueError, match="Cannot load method 'broken' from entry point 'no_such_plugin_xyz'"):
            methods.get_method("broken")
        with pytest.raises(ValueError, match="Unknown attribution method 'nope'. Available: "):
            methods.get_method("nope")
    finally:
        sys.modules.pop("plugin_method", None)


def test_the_planner_uses_a_registered_methods_cost_model(registry):
    p = plan("smollm2-135m", "cpu=8GiB", None, "embedding_norm", 64, 8)
    assert (p.rows, p.backward_passes, p.forward_passes) == (1, 0, 1)  # its cost: one forward-only row
    register_method("path_method", registry["embedding_norm"].run, _Steps, cost=RowModel(True, n_steps_rows))
    path = plan("smollm2-135m", "cpu=8GiB", None, "path_method", 64, 8, n_steps=4)
    ig = plan("smollm2-135m", "cpu=8GiB", None, "integrated_gradients", 64, 8, n_steps=4)
    assert (path.rows, path.forward_passes, path.backward_passes) == (ig.rows, ig.forward_passes, ig.backward_passes)
    register_method("unplanned", registry["embedding_norm"].run)
    with pytest.raises(PlanError, match="does not model method 'unplanned'; it plans: .*embedding_norm.*path_method"):
        plan("smollm2-135m", "cpu=8GiB", None, "unplanned", 64, 8)


@dataclass(frozen=True)
class _Steps:
    n_steps: int = 2


@pytest.mark.parametrize(("method", "args", "message"), [
    ("attention", {}, "'attention' reads attention weights or activations inside the transformer blocks"),
    ("value_zeroing", {}, "'value_zeroing' reads attention weights"),
    ("layer_gradient_x_activation", {"target_layer": "model.norm,model.layers.1.mlp"},
     r"target_layer \['model.layers.1.mlp'\] is inside the remote Petals blocks"),
    ("layer_integrated_gradients", {"target_layer": "model.layers"}, "is inside the remote Petals blocks"),
    ("layer_deeplift", {"target_layer": ("model.layers.0",)}, "is inside the remote Petals blocks"),
])
def test_check_remote_refuses_what_remote_blocks_cannot_give(method, args, message):
    with pytest.raises(ValueError, match=message) as err:
        check_remote(method, args)
    assert "\n" not in str(err.value)


def test_check_remote_accepts_the_rest_and_asks_a_registered_methods_entry(registry):
    for method, args in (("saliency", {}), ("integrated_gradients", {"n_steps": 3}), ("occlusion", None),
                         ("layer_gradient_x_activation", {"target_layer": "model.norm"}),
                         ("layer_deeplift", {}), ("embedding_norm", {"ord": 1.0})):
        check_remote(method, args)

    def needs_heads(name: str, args: dict) -> str | None:
        return f"{name!r} needs the heads of layer {args['layer']}" if args.get("layer") is not None else None

    register_method("head_probe", registry["embedding_norm"].run, remote=needs_heads)
    check_remote("head_probe", {})
    with pytest.raises(ValueError, match="^'head_probe' needs the heads of layer 3$"):
        check_remote("head_probe", {"layer": 3})
    with pytest.raises(ValueError, match="Unknown attribution method 'nope'"):
        check_remote("nope", {})
