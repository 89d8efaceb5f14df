"""The ``distattr`` command line, run in-process on a tiny model saved to disk."""

import json
import subprocess
import sys

import pytest

import distattr
from distattr.cli import main, parse_pairs, parse_value
from distattr.methods import METHODS
from distattr.steps import STEP_FUNCTIONS


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return tiny_dir("gpt2")


def test_attribute_writes_json_html_and_prints_heatmaps(model_dir, tmp_path, capsys):
    json_path, html_path = tmp_path / "out.json", tmp_path / "sub" / "out.html"
    code = main(["attribute", "the cat is in the", "a dog", "--model", model_dir, "--max-new-tokens", "3",
                 "--method", "integrated_gradients", "--method-arg", "n_steps=4", "--method-arg", "method=riemann_left",
                 "--step-scores", "probability", "entropy", "--output", str(json_path), "--html", str(html_path),
                 "--png", str(tmp_path / "fig.png")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = distattr.load(json_path)
    assert len(out) == 2
    for seq in out:
        assert set(seq.step_scores) == {"probability", "entropy"}
        assert len(seq.step_scores["probability"]) == 3
    assert out.info["attribution_method"] == "integrated_gradients"
    assert out.info["attribution_args"] == {"n_steps": 4, "method": "riemann_left"}
    assert out.info["generation_args"] == {"max_new_tokens": 3}
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "https://" not in page and "entropy" in page
    assert "Example 1 · Target" in captured.out and "probability" in captured.out
    assert f"Saved the result to {json_path}" in captured.err
    figures = [tmp_path / "fig-0.png", tmp_path / "fig-1.png"]  # one per input
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in figures)
    assert f"Wrote {figures[0]}, {figures[1]}" in captured.err


def test_attribute_options_reach_the_library(model_dir, tmp_path, capsys):
    json_path = tmp_path / "out.json"
    code = main(["attribute", "the cat is in", "--model", model_dir, "--generated-texts", "the cat is in the city",
                 "--attributed-fn", "contrast_prob_diff", "--attributed-fn-arg", "logprob=true",
                 "--contrast-targets", "the cat is in a house", "--step-scores", "top_p_size",
                 "--step-score-arg", "top_p_size.top_p=0.5", "--attr-pos-start", "5", "--token-budget", "64",
                 "--output", str(json_path), "--no-show", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == "" and captured.err == ""  # --no-show --quiet
    out = distattr.load(json_path)
    info = out.info
    assert info["attributed_fn"] == "contrast_prob_diff" and info["attributed_fn_args"] == {"logprob": True}
    assert info["contrast_targets"] == ["the cat is in a house"]
    assert info["step_scores_args"] == {"top_p_size": {"top_p": 0.5}}
    assert info["constrained_decoding"] is True
    seq = out[0]
    assert seq.attr_pos_start == 5 and seq.generated_tokens == ("city",)


def test_methods_and_step_functions_are_listed(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(METHODS)
    assert any("n_steps=50" in line for line in lines)
    assert main(["step-functions"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(STEP_FUNCTIONS)
    assert all(len(line.split()) > 1 for line in lines)  # each has a description


def test_values_are_json_when_they_parse():
    assert parse_pairs(["n_steps=8", "abs=false", "target_layer=model.layers.0.mlp", "x=[1, 2]", "s=", "t=True"],
                       "--method-arg") == {"n_steps": 8, "abs": False, "target_layer": "model.layers.0.mlp",
                                           "x": [1, 2], "s": "", "t": True}
    assert parse_value('"8"') == "8" and parse_value("1e-3") == 0.001 and parse_value("None") is None


@pytest.mark.parametrize(("argv", "message"), [
    (["attribute", "x", "--method", "nope"], "Unknown attribution method 'nope'"),
    (["attribute", "x", "--method-arg", "n_steps"], "--method-arg expects key=value, got 'n_steps'"),
    (["attribute", "x", "--method-arg", "n_steps=4"], "Unknown argument(s) ['n_steps'] for method 'saliency'"),
    (["attribute", "x", "--step-scores", "nope"], "Unknown step function 'nope'"),
    (["attribute", "x", "--attributed-fn", "nope"], "Unknown step function 'nope'"),
    (["attribute", "x", "y", "--generated-texts", "x z"], "--generated-texts: got 1 value(s) for 2 input(s)"),
    (["attribute", "x", "--contrast-targets", "a", "b"], "--contrast-targets: got 2 value(s) for 1 input(s)"),
    (["attribute"], "no input text given"),
    (["attribute", "x", "--inputs-file", "/nonexistent/inputs.txt"], "inputs file not found"),
    (["attribute", "x", "--model", "./no/such/model"], "Model folder not found: ./no/such/model"),
    (["attribute", "x", "--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
    (["attribute", "x", "--dtype", "float8"], "argument --dtype: invalid choice"),
    (["attribute", "x", "--device", "gpu9"], "--device: 'gpu9' is not a device"),
    (["attribute", "x", "--step-score-arg", "top_p=0.5"], "--step-score-arg expects name.key=value"),
    (["attribute", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading ")]
    assert len(lines) == 1 and lines[0].startswith("distattr: error: ") and message in lines[0], err


def test_library_errors_after_loading_are_clean(model_dir, capsys):
    # decoder-only generated texts must start with the input: the engine's ValueError becomes a clean exit 2
    assert main(["attribute", "the cat", "--model", model_dir, "--generated-texts", "a dog", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distattr: error: ") and len(err.strip().splitlines()) == 1


def test_output_to_a_folder_is_refused(tmp_path, capsys):
    assert main(["attribute", "x", "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distattr", "methods"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "saliency" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "distattr", "attribute", "x", "--method", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("distattr: error:") and "Traceback" not in proc.stderr
    assert json.loads(json.dumps(proc.stderr))  # plain text
