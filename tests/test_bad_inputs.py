"""Issue 13: every bad input gets one clear line on stderr and exit status 2 (usage) or 1 (runtime failure,
internal error); a traceback only with --debug. One test per input that used to give a traceback or a silently
wrong result."""

import errno
import importlib
import sys
from typing import Literal

import pytest
import torch

import distattr
from distattr import cli, methods, steps
from distattr.arguments import check_value, parse_text
from distattr.cli import main
from distattr.options import check_generation_args
from distattr.planner import PlanError, plan

PROMPT = "the cat is located in the city of"


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return tiny_dir("gpt2")


@pytest.fixture
def no_loading(monkeypatch):
    """Make any model load (attribute) or dataset job (attribute-dataset) fail the test: the input must be refused
    before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the bad input reached the model load")

    monkeypatch.setattr(importlib.import_module("distattr.api"), "load_model", refuse)
    monkeypatch.setattr(importlib.import_module("distattr.jobs"), "attribute_dataset", refuse)


def one_error_line(capsys) -> str:
    """The single line ``main`` wrote on stderr (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- 1. --device cuda without CUDA


def test_cuda_device_on_a_cpu_only_torch_is_refused_before_loading(monkeypatch, capsys, no_loading):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["attribute", PROMPT, "--device", "cuda"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("distattr: error: --device cuda: CUDA is not available in this torch build"), line


def test_cuda_device_without_a_visible_gpu_is_refused(monkeypatch, capsys, no_loading):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["attribute", PROMPT, "--device", "cuda:1"]) == 2
    assert "no CUDA device is visible" in one_error_line(capsys)


def test_cuda_index_beyond_the_devices_is_refused(monkeypatch, capsys, no_loading):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["attribute", PROMPT, "--device", "cuda:2"]) == 2
    assert "this machine has 2 CUDA device(s), numbered from 0" in one_error_line(capsys)


# ---------------------------------------------------------------- 2. Riemann quadrature with one step


@pytest.mark.parametrize("method", ["integrated_gradients", "sequential_integrated_gradients",
                                    "layer_integrated_gradients"])
def test_riemann_rule_with_one_step_is_refused_by_the_argument_dataclass(method):
    with pytest.raises(ValueError, match="n_steps must be at least 2 for method=riemann_left"):
        methods.build_args(method, {"method": "riemann_left", "n_steps": 1})
    methods.build_args(method, {"method": "gausslegendre", "n_steps": 1})  # one Gauss-Legendre point is fine


def test_unknown_quadrature_names_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown integration method 'riemann'; use one of gausslegendre, "
                                         "riemann_left, riemann_right, riemann_middle, riemann_trapezoid"):
        methods.build_args("integrated_gradients", {"method": "riemann"})


def test_riemann_rule_with_one_step_on_the_command_line(capsys, no_loading):
    assert main(["attribute", PROMPT, "--method", "integrated_gradients", "--method-arg", "method=riemann_left",
                 "--method-arg", "n_steps=1"]) == 2
    assert "n_steps must be at least 2 for method=riemann_left" in one_error_line(capsys)


# ---------------------------------------------------------------- 3. generation arguments


@pytest.mark.parametrize(("arg", "message"), [
    ("max_new_tokens=-1", "generation argument max_new_tokens must be an integer at least 1, not -1"),
    ("max_new_tokens=0", "max_new_tokens must be an integer at least 1, not 0"),
    ("max_new_tokens=many", "max_new_tokens must be an integer at least 1, not 'many'"),
    ("num_beams=0", "num_beams must be an integer at least 1, not 0"),
    ("temperature=0", "temperature must be a number greater than 0, not 0"),
    ("top_p=1.5", "top_p must be a number in (0, 1], not 1.5"),
    ("num_return_sequences=2", "num_return_sequences must be an integer 1"),
    ("do_sample=maybe", "do_sample must be true or false, not 'maybe'"),
])
@pytest.mark.parametrize("command", ["attribute", "attribute-dataset"])
def test_bad_generation_args_are_refused_before_anything_loads(command, arg, message, capsys, no_loading, tmp_path):
    where = [PROMPT] if command == "attribute" else ["--data", str(tmp_path / "d.jsonl"), "--store",
                                                      str(tmp_path / "s.zarr"), "--max-new-tokens", "2"]
    if arg.startswith("max_new_tokens") and command == "attribute-dataset":
        where.remove("--max-new-tokens")
        where.remove("2")
    assert main([command, *where, "--generation-arg", arg]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "s.zarr").exists()


def test_generation_args_are_checked_by_the_python_api(tiny):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer at least 1, not -1"):
        tiny("gpt2").attribute(PROMPT, generation_args={"max_new_tokens": -1}, show_progress=False)
    assert check_generation_args({"max_new_tokens": 3, "temperature": 0.7, "do_sample": True, "foo": "x"})


# ---------------------------------------------------------------- 4. typed method and step function arguments


@pytest.mark.parametrize(("text", "value"), [("no", False), ("No", False), ("off", False), ("0", False),
                                             ("false", False), ("yes", True), ("ON", True), ("1", True),
                                             ("true", True)])
def test_bool_words_are_read_as_bools(text, value):
    assert methods.parse_args("saliency", {"abs": text}) == {"abs": value}
    assert steps.parse_step_args("probability", {"logprob": text}) == {"logprob": value}


def test_a_bool_that_is_not_a_bool_word_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"saliency argument abs must be true or false \(true/false, yes/no, "
                                         r"on/off, 1/0\), not 'maybe'"):
        methods.parse_args("saliency", {"abs": "maybe"})
    with pytest.raises(ValueError, match="probability argument logprob must be true or false"):
        steps.parse_step_args("probability", {"logprob": "nope"})


def test_python_strings_are_not_bools():
    with pytest.raises(ValueError, match="saliency argument abs must be true or false, not 'no'"):
        methods.build_args("saliency", {"abs": "no"})
    with pytest.raises(ValueError, match="probability argument logprob must be true or false, not 'no'"):
        steps.check_step_args("probability", {"logprob": "no"})


def test_python_api_refuses_a_string_bool(tiny):
    with pytest.raises(ValueError, match="abs must be true or false, not 'no'"):
        tiny("gpt2", "saliency", abs="no")
    with pytest.raises(ValueError, match="logprob must be true or false, not 'no'"):
        tiny("gpt2").attribute(PROMPT, attributed_fn_args={"logprob": "no"}, generation_args={"max_new_tokens": 1},
                               show_progress=False)
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['top_q'\] for step function 'top_p_size'"):
        tiny("gpt2").attribute(PROMPT, step_scores=["top_p_size"], step_scores_args={"top_p_size": {"top_q": 0.5}},
                               generation_args={"max_new_tokens": 1}, show_progress=False)


@pytest.mark.parametrize(("method", "texts", "expected"), [
    ("integrated_gradients", {"n_steps": "8", "internal_batch_size": "none"}, {"n_steps": 8,
                                                                                "internal_batch_size": None}),
    ("integrated_gradients", {"internal_batch_size": "4", "method": "riemann_trapezoid"},
     {"internal_batch_size": 4, "method": "riemann_trapezoid"}),
    ("gradient_shap", {"stdevs": "0.5", "seed": "7"}, {"stdevs": 0.5, "seed": 7}),
    ("layer_gradient_x_activation", {"target_layer": "transformer.h.0.mlp"}, {"target_layer": "transformer.h.0.mlp"}),
    ("layer_gradient_x_activation", {"target_layer": '["a", "b"]'}, {"target_layer": ("a", "b")}),
    ("value_zeroing", {"layers": "null"}, {"layers": None}),
    ("reagent", {"replacer": "uniform", "keep_ratio": "none"}, {"replacer": "uniform", "keep_ratio": None}),
])
def test_method_args_are_read_against_their_field_types(method, texts, expected):
    assert methods.parse_args(method, texts) == expected


@pytest.mark.parametrize(("method", "texts", "message"), [
    ("integrated_gradients", {"n_steps": "8.5"}, "n_steps must be an integer, not '8.5'"),
    ("integrated_gradients", {"internal_batch_size": "all"}, "internal_batch_size must be an integer or None"),
    ("gradient_shap", {"stdevs": "inf"}, "stdevs must be a finite number, not 'inf'"),
    ("integrated_gradients", {"n_step": "3"}, r"Unknown argument\(s\) \['n_step'\]"),
])
def test_ill_typed_method_args_name_the_valid_values(method, texts, message):
    with pytest.raises(ValueError, match=message):
        methods.parse_args(method, texts)


def test_python_method_args_are_type_checked():
    with pytest.raises(ValueError, match="n_steps must be an integer, not True"):
        methods.build_args("integrated_gradients", {"n_steps": True})
    with pytest.raises(ValueError, match="n_steps must be an integer, not 4.0"):
        methods.build_args("integrated_gradients", {"n_steps": 4.0})
    assert methods.build_args("gradient_shap", {"stdevs": 1}).stdevs == 1  # an int is a number
    assert methods.build_args("layer_gradient_x_activation", {"target_layer": ["a", "b"]}).target_layer == ["a", "b"]


def test_type_helpers_refuse_what_they_do_not_parse():
    assert parse_text("x", "3", int | None) == 3 and parse_text("x", "None", int | None) is None
    assert check_value("x", None, int | None) is None
    with pytest.raises(ValueError, match="x must be a list of strings, not"):
        check_value("x", [1], tuple[str, ...])
    assert parse_text("x", "b", Literal["a", "b"]) == "b"
    with pytest.raises(ValueError, match="x must be one of 'a', 'b', not 'c'"):
        parse_text("x", "c", Literal["a", "b"])
    with pytest.raises(ValueError, match="x must be one of 'a', 'b', not 'c'"):
        check_value("x", "c", Literal["a", "b"])


def test_step_function_without_annotations_reads_json(monkeypatch):
    def untyped(ctx, scale=1):
        return ctx.logits[:, 0] * scale

    monkeypatch.setitem(steps.STEP_FUNCTIONS, "untyped", steps.StepFunction(untyped))
    assert steps.parse_step_args("untyped", {"scale": "2.5"}) == {"scale": 2.5}
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['size'\].*Valid arguments: scale"):
        steps.parse_step_args("untyped", {"size": "2"})


def test_no_is_false_end_to_end(model_dir, tmp_path, capsys):
    out_path = tmp_path / "out.json"
    assert main(["attribute", PROMPT, "--model", model_dir, "--max-new-tokens", "1", "--method-arg", "abs=no",
                 "--attributed-fn-arg", "logprob=no", "--step-scores", "top_p_size", "--step-score-arg",
                 "top_p_size.top_p=0.5", "--output", str(out_path), "--no-show", "--quiet"]) == 0, capsys.readouterr()
    info = distattr.load(out_path).info
    assert info["attribution_args"] == {"abs": False}
    assert info["attributed_fn_args"] == {"logprob": False}
    assert info["step_scores_args"] == {"top_p_size": {"top_p": 0.5}}


@pytest.mark.parametrize(("argv", "message"), [
    (["--method-arg", "abs=maybe"], "saliency argument abs must be true or false (true/false, yes/no, on/off, "
                                    "1/0), not 'maybe'"),
    (["--attributed-fn-arg", "logprob=perhaps"], "probability argument logprob must be true or false"),
    (["--attributed-fn-arg", "logpro=no"], "Unknown argument(s) ['logpro'] for step function 'probability'. "
                                           "Valid arguments: logprob"),
    (["--step-scores", "top_p_size", "--step-score-arg", "top_p_size.top_p=high"],
     "top_p_size argument top_p must be a finite number, not 'high'"),
])
def test_ill_typed_arguments_on_the_command_line(argv, message, capsys, no_loading):
    assert main(["attribute", PROMPT, *argv]) == 2
    assert message in one_error_line(capsys)


# ---------------------------------------------------------------- 5. --step-scores swallowing the text


def test_step_scores_give_back_the_text_they_swallowed(model_dir, tmp_path, capsys):
    out_path = tmp_path / "out.json"
    code = main(["attribute", "--step-scores", "probability", "entropy", PROMPT, "--model", model_dir,
                 "--max-new-tokens", "1", "--output", str(out_path), "--no-show", "--quiet"])
    assert code == 0, capsys.readouterr().err
    out = distattr.load(out_path)
    assert out.info["step_scores"] == ["probability", "entropy"]
    assert len(out) == 1 and set(out[0].step_scores) == {"probability", "entropy"}


def test_step_scores_keep_the_texts_order_and_dashes_still_work():
    args = cli.build_parser().parse_args(["attribute", "a b", "--step-scores", "probability", "c d"])
    assert cli._input_texts(args) == ["a b", "c d"] and args.step_scores == ["probability"]
    args = cli.build_parser().parse_args(["attribute", "--step-scores", "probability", "--", "word"])
    assert cli._input_texts(args) == ["word"] and args.step_scores == ["probability"]


def test_an_unknown_one_word_step_score_is_still_an_error(capsys, no_loading):
    assert main(["attribute", PROMPT, "--step-scores", "probabilty"]) == 2
    assert "Unknown step function 'probabilty'" in one_error_line(capsys)


def test_missing_text_after_a_list_option_says_where_it_went(capsys, no_loading):
    assert main(["attribute", "--generated-texts", PROMPT + " paris"]) == 2
    assert "--generated-texts took every text after it: put the input texts first or after '--'" in \
        one_error_line(capsys)


# ---------------------------------------------------------------- 6. --max-length beyond the context


def test_max_length_beyond_the_context_is_named():
    with pytest.raises(PlanError, match="--max-length 16384 is longer than smollm2-135m's context of 8192 tokens"):
        plan("smollm2-135m", "1x80GiB", None, "integrated_gradients", 16384, 64)


def test_max_length_beyond_the_context_on_the_command_line(capsys):
    assert main(["plan", "--model", "smollm2-135m", "--max-length", "16384", "--devices", "1x80GiB"]) == 2
    assert one_error_line(capsys) == ("distattr: error: --max-length 16384 is longer than smollm2-135m's context of "
                                      "8192 tokens")


# ---------------------------------------------------------------- 7. attribute-dataset without Ray


@pytest.mark.parametrize("module", ["ray", "zarr"])
def test_attribute_dataset_without_the_dist_extra_says_what_to_install(module, monkeypatch, capsys, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "the cat"}\n')
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    code = main(["attribute-dataset", "--data", str(tmp_path / "d.jsonl"), "--store", str(tmp_path / "s.zarr"),
                 "--max-new-tokens", "2", "--quiet"])
    assert code == 2
    assert one_error_line(capsys) == \
        "distattr: error: attribute-dataset needs Ray and Zarr: pip install 'distattr[dist]'"
    assert not (tmp_path / "s.zarr").exists()


# ---------------------------------------------------------------- 8. exit statuses and --debug


@pytest.mark.parametrize(("error", "status", "line"), [
    (ValueError("bad value"), 2, "distattr: error: bad value"),
    (FileNotFoundError("no such file: x.txt"), 2, "distattr: error: no such file: x.txt"),
    (ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"), 2,
     "distattr: error: this needs matplotlib, which is not installed: pip install 'distattr[viz]'"),
    (OSError(errno.ENOSPC, "No space left on device"), 1, "distattr: error: [Errno 28] No space left on device"),
    (MemoryError("out of memory"), 1, "distattr: error: out of memory"),
    (KeyError("lm_head"), 1, "distattr: internal error: KeyError: 'lm_head' (rerun with --debug for the traceback)"),
    (TypeError("unsupported operand"), 1,
     "distattr: internal error: TypeError: unsupported operand (rerun with --debug for the traceback)"),
    (AssertionError("Torch not compiled with CUDA enabled"), 1,
     "distattr: internal error: AssertionError: Torch not compiled with CUDA enabled (rerun with --debug for the "
     "traceback)"),
])
def test_exit_status_and_line_of_each_kind_of_error(error, status, line, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_methods", fail)
    assert main(["methods"]) == status
    assert one_error_line(capsys) == line
    with pytest.raises(type(error)):
        main(["--debug", "methods"])


def test_storage_failures_are_runtime_failures(monkeypatch, capsys):
    from distattr.store import StorageFatal, StoreBusy

    for error in (StorageFatal("the disk is full: free space and rerun"), StoreBusy("another driver holds it")):
        monkeypatch.setattr(cli, "cmd_methods", lambda args, error=error: (_ for _ in ()).throw(error))
        assert main(["methods"]) == 1
        assert one_error_line(capsys) == f"distattr: error: {error}"


def test_a_stopped_dataset_job_is_a_runtime_failure(monkeypatch, capsys):
    from distattr.jobs import JobStopped

    monkeypatch.setattr(cli, "cmd_methods", lambda args: (_ for _ in ()).throw(JobStopped("no actor can be placed")))
    assert main(["methods"]) == 1
    assert one_error_line(capsys) == "distattr: error: no actor can be placed"


@pytest.mark.parametrize(("module", "name", "argv"), [
    ("distattr.cli", "cmd_attribute", ["attribute", "x"]),
    ("distattr.cli.dataset", "cmd_attribute_dataset", ["attribute-dataset", "--data", "d", "--store", "s"]),
    ("distattr.cli", "cmd_plan", ["plan", "--model", "m", "--devices", "1x80GiB"]),
    ("distattr.cli.stats", "cmd_stats", ["stats", "store"]),
    ("distattr.cli.casestudy", "cmd_cat", ["case-study", "cat", "--output", "o"]),
    ("distattr.cli.casestudy", "cmd_gender_bias", ["case-study", "gender-bias", "--output", "o"]),
    ("distattr.cli", "cmd_methods", ["methods"]),
    ("distattr.cli", "cmd_step_functions", ["step-functions"]),
])
def test_every_subcommand_goes_through_the_error_handling(module, name, argv, monkeypatch, capsys):
    def fail(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(importlib.import_module(module), name, fail)
    assert main(argv) == 1
    assert one_error_line(capsys) == \
        "distattr: internal error: RuntimeError: boom (rerun with --debug for the traceback)"
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", *argv])


def test_an_existing_output_file_is_kept_unless_forced(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("mine")
    args = ["attribute", "--model", tiny_dir("gpt2"), "--max-new-tokens", "2", "--output", str(out), "--no-show",
            "--quiet", "the cat"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"distattr: error: --output {out} exists; pass --force to replace it" in err.splitlines()
    assert "Loading" not in err  # refused before the model loads
    assert out.read_text() == "mine"
    assert main([*args, "--force"]) == 0
    assert distattr.load(out)[0].target_ids  # replaced by a real result


def test_plan_with_no_room_for_one_row_of_a_tied_head_model_says_so(capsys):
    # SmolLM2 ties lm_head to embed_tokens: the placement names a module whose weights are counted with its owner
    assert main(["plan", "--model", "smollm2-135m", "--max-length", "8192", "--devices", "1x3GiB",
                 "--recompute", "never"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("distattr: error: not even one row of 8192 tokens fits")
