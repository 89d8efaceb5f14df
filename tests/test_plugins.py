"""A custom method end to end outside Python calls: ``--plugin`` on the command line, and a dataset job on Ray whose
actors get the method by its plugin module or, registered in the driver only, by value."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import distattr
from distattr.cli import main

PLUGIN = "plugin_method"  # tests/plugin_method.py registers embedding_norm when imported


def expected_norms(folder: str, text: str, ord: float = 2.0) -> np.ndarray:
    """||E[x_i]||_p of the prompt's tokens, straight from the embedding table."""
    model = distattr.load_model(folder)
    ids = model.tokenizer(text)["input_ids"]
    table = model.model.get_input_embeddings().weight.detach()
    return np.linalg.norm(table[ids].numpy(), ord=ord, axis=-1)


def test_cli_plugin_registers_the_method_before_its_arguments_are_read(tiny_dir, tmp_path, capsys):
    folder = tiny_dir("gpt2")
    out = tmp_path / "out.json"
    code = main(["attribute", "the cat is", "--model", folder, "--plugin", PLUGIN, "--method", "embedding_norm",
                 "--method-arg", "ord=1", "--max-new-tokens", "2", "--output", str(out), "--no-show", "--quiet"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["info"]["attribution_method"] == "embedding_norm" and doc["info"]["attribution_args"] == {"ord": 1.0}
    result = distattr.load(out)
    seq = result[0]
    n_prompt = seq.attr_pos_start
    column = np.asarray(seq.target_attributions)[:n_prompt, 0]
    assert np.allclose(column, expected_norms(folder, "the cat is", ord=1.0), atol=1e-5)


def test_cli_refuses_an_unknown_plugin_in_one_line(capsys):
    code = main(["attribute", "x", "--plugin", "no_such_plugin_module", "--method", "embedding_norm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "Cannot import plugin module 'no_such_plugin_module'" in err


def test_plugin_methods_are_listed(capsys):
    import plugin_method  # noqa: F401  registers embedding_norm

    assert main(["methods"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("embedding_norm "))
    assert "custom" in line and "ord=2.0" in line


@pytest.mark.parametrize("how", ["plugin", "registered"])
def test_dataset_job_runs_a_custom_method_on_ray_actors(ray_head, tiny_dir, tmp_path, how):
    """``plugins=`` makes every actor import the module; a method registered only in the driver (a notebook's) is
    sent to the actors with the job."""
    folder = tiny_dir("gpt2")
    rows = [{"prompt": "the cat is"}, {"prompt": "a dog was on"}]
    url = str(tmp_path / f"{how}.zarr")
    if how == "plugin":
        summary = distattr.attribute_dataset(folder, rows, url, "embedding_norm", plugins=[PLUGIN], max_new_tokens=2,
                                             method_args={"ord": 2.0}, show_progress=False)
    else:
        import plugin_method

        distattr.register_method("embedding_norm_copy", plugin_method.embedding_norm, plugin_method.EmbeddingNormArgs,
                                 replace=True)
        assert "plugin_method" in sys.modules
        summary = distattr.attribute_dataset(folder, rows, url, "embedding_norm_copy", max_new_tokens=2,
                                             show_progress=False)
    assert summary.complete and not summary.failures
    store = distattr.open_store(url)
    for i, row in enumerate(rows):
        seq = store[i][0]
        column = np.asarray(seq.target_attributions)[: seq.attr_pos_start, 0]
        assert np.allclose(column, expected_norms(folder, row["prompt"]), atol=1e-5)
