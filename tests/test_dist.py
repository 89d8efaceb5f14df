"""attribute_dataset on a real Ray cluster (one head node per session, 127.0.0.1, isolated network): values equal
to single-process attribution, inputs in every format, resume, identity checks, lost actors and drivers, job
submission, S3-compatible stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from raycluster import VENV_BIN, actor_pids, free_port, ray_env

import distattr
from distattr.engine import generate_targets
from distattr.jobs.data import DataError
from distattr.options import AttributeOptions
from distattr.store import StoreError, open_store

WORDS = ("the", "cat", "is", "in", "the", "house", "and", "the", "dog", "was", "on", "a", "big", "red", "tower",
         "in", "paris")


def prompts(n: int) -> list[dict]:
    return [{"prompt": " ".join(WORDS[i % 7 : i % 7 + 2 + i % 6]), "uid": f"ex-{i}"} for i in range(n)]


@pytest.fixture(scope="module")
def folders(tiny_dir):
    """Tiny GPT-2 and T5 models saved as folders (each actor loads its own replica)."""
    return {kind: tiny_dir(kind) for kind in ("gpt2", "t5")}


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference(folder: str, rows: list[dict], method: str = "saliency", generation_args=None, **kwargs):
    """One-process attributions of ``rows``; None for an example whose generation is empty (nothing to attribute)."""
    model = distattr.load_model(folder, method)
    texts = [r["prompt"] for r in rows]
    if generation_args is None:
        return list(model.attribute(texts, show_progress=False, **kwargs).sequences)
    targets = generate_targets(model.loaded, texts, AttributeOptions(method=method, generation_args=generation_args))
    n_src = [len(model.tokenizer(t)["input_ids"]) for t in texts]
    keep = [i for i in range(len(rows)) if len(targets[i]) > n_src[i]]
    out = model.attribute([texts[i] for i in keep], generation_args=generation_args, show_progress=False, **kwargs)
    by_index = dict(zip(keep, out.sequences, strict=True))
    return [by_index.get(i) for i in range(len(rows))]


def assert_same(store, rows, ref, atol=1e-5):
    assert len(store) == len(rows)
    for i, expected in enumerate(ref):
        got = store[i].sequences[0]
        assert store[i].info["example_id"] == rows[i]["uid"]
        if expected is None:  # nothing generated: stored with its tokens and no steps
            assert got.attr_pos_end == got.attr_pos_start and got.target_ids == got.source_ids
            continue
        assert got.target_ids == expected.target_ids
        assert got.target_tokens == expected.target_tokens
        assert (got.attr_pos_start, got.attr_pos_end) == (expected.attr_pos_start, expected.attr_pos_end)
        for name in ("source_attributions", "target_attributions"):
            a, b = getattr(got, name), getattr(expected, name)
            assert (a is None) == (b is None), name
            if a is not None:
                np.testing.assert_allclose(a, b, atol=atol, equal_nan=True)
        assert set(got.step_scores) == set(expected.step_scores)
        for k in got.step_scores:
            np.testing.assert_allclose(got.step_scores[k], expected.step_scores[k], atol=atol)


def slots_used(url: str) -> np.ndarray:
    import zarr

    index = zarr.open_group(url, mode="r")["example_index"][:]
    return np.sort(index[index >= 0])


@pytest.mark.slow
def test_two_actors_with_split_examples_equal_one_process(ray_head, folders, tmp_path):
    rows = prompts(30)
    url = str(tmp_path / "run.zarr")
    summary = distattr.attribute_dataset(
        folders["gpt2"], rows, url, "saliency", max_new_tokens=5, id_field="uid", actors=2, unit_size=4,
        split_steps=2, step_scores=["probability", "entropy"], show_progress=False)
    assert summary.complete and not summary.failures
    store = open_store(url)
    assert store.complete and store.identity["n_examples"] == 30
    assert slots_used(url).tolist() == list(range(30))  # every example once: nothing lost, nothing duplicated
    ref = reference(folders["gpt2"], rows, generation_args={"max_new_tokens": 5},
                    step_scores=["probability", "entropy"])
    assert sum(r is not None for r in ref) >= 25
    assert_same(store, rows, ref)
    assert store.get("ex-7").info["example_index"] == 7


@pytest.mark.slow
def test_encoder_decoder_and_constrained_targets(ray_head, folders, tmp_path):
    rows = [{**r, "target": " ".join(reversed(r["prompt"].split()))} for r in prompts(9)]
    url = str(tmp_path / "t5.zarr")
    summary = distattr.attribute_dataset(folders["t5"], rows, url, "input_x_gradient", target_field="target",
                                         id_field="uid", actors=1, unit_size=4, attribute_target=True,
                                         show_progress=False)
    assert summary.complete
    model = distattr.load_model(folders["t5"], "input_x_gradient")
    ref = model.attribute([r["prompt"] for r in rows], [r["target"] for r in rows], attribute_target=True,
                          show_progress=False).sequences
    assert_same(open_store(url), rows, ref)


@pytest.mark.slow
def test_resume_skips_finished_units_and_refuses_another_job(ray_head, folders, tmp_path):
    rows = prompts(12)
    url = str(tmp_path / "resume.zarr")
    args = dict(max_new_tokens=3, id_field="uid", unit_size=4, show_progress=False)
    first = distattr.attribute_dataset(folders["gpt2"], rows, url, "saliency", **args)
    assert first.complete and first.skipped_units == 0
    again = distattr.attribute_dataset(folders["gpt2"], rows, url, "saliency", **args)
    assert again.complete and again.skipped_units == again.units and again.steps == 0
    with pytest.raises(StoreError, match="different job.*method"):
        distattr.attribute_dataset(folders["gpt2"], rows, url, "input_x_gradient", **args)
    with pytest.raises(StoreError, match="dataset_fingerprint"):
        distattr.attribute_dataset(folders["gpt2"], prompts(13), url, "saliency", **args)
    replaced = distattr.attribute_dataset(folders["gpt2"], rows, url, "input_x_gradient", new_store=True, **args)
    assert replaced.complete and open_store(url).identity["method"] == "input_x_gradient"


@pytest.mark.slow
def test_actor_killed_mid_job_is_replaced_and_nothing_is_lost(ray_head, folders, tmp_path):
    rows = prompts(16)
    url = str(tmp_path / "kill.zarr")
    kwargs = dict(max_new_tokens=6, id_field="uid", actors=2, unit_size=2, split_steps=None,
                  method_args={"n_steps": 100}, show_progress=False)
    result = {}

    def run():
        result["summary"] = distattr.attribute_dataset(folders["gpt2"], rows, url, "integrated_gradients", **kwargs)

    job = threading.Thread(target=run)
    job.start()
    killed = _kill_one_actor_after_first_unit(url, job)
    job.join(timeout=600)
    summary = result["summary"]
    assert killed, "the job ended before an actor could be killed"
    assert summary.complete and summary.retried >= 1 and not summary.failures
    assert slots_used(url).tolist() == list(range(16))
    ref = reference(folders["gpt2"], rows, "integrated_gradients", generation_args={"max_new_tokens": 6},
                    n_steps=100)
    assert_same(open_store(url), rows, ref, atol=1e-4)


def _kill_one_actor_after_first_unit(url: str, job: threading.Thread) -> bool:
    deadline = time.time() + 300
    while time.time() < deadline and job.is_alive():
        if os.path.isdir(os.path.join(url, "done", "c")) and actor_pids():
            os.kill(actor_pids()[0], signal.SIGKILL)
            return True
        time.sleep(0.05)
    return False


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "distattr", "attribute-dataset", *args]


@pytest.mark.slow
def test_driver_killed_then_rerun_resumes(ray_head, folders, tmp_path):
    rows = prompts(16)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    url = str(tmp_path / "driver.zarr")
    cmd = _cli("--model", folders["gpt2"], "--method", "integrated_gradients", "--method-arg", "n_steps=100",
               "--data", str(data), "--id-field", "uid", "--max-new-tokens", "4", "--store", url,
               "--unit-size", "2", "--address", ray_head.address,
               "--token-budget", "64")  # small batches: slow enough to be killed mid-job
    driver = subprocess.Popen(cmd, env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        done = os.path.join(url, "done", "c")
        if os.path.isdir(done) and sum(len(files) for _, _, files in os.walk(done)) >= 2:
            break
        time.sleep(0.05)
    assert driver.poll() is None, f"the driver ended before it could be killed:\n{driver.communicate()[0]}"
    driver.kill()
    driver.wait()
    assert not open_store(url).complete
    rerun = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    skipped = int(rerun.stderr.split(" already done")[0].rsplit("(", 1)[1])
    assert skipped >= 2
    assert slots_used(url).tolist() == list(range(16))
    ref = reference(folders["gpt2"], rows, "integrated_gradients", generation_args={"max_new_tokens": 4},
                    n_steps=100)
    assert_same(open_store(url), rows, ref, atol=1e-4)


@pytest.mark.slow
def test_ray_job_submit(ray_head, folders, tmp_path):
    rows = prompts(6)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    url = str(tmp_path / "job.zarr")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard,
           "--working-dir", root, "--", "python", "-m", "launch.attribute_dataset", "--model", folders["gpt2"],
           "--data", str(data), "--id-field", "uid", "--max-new-tokens", "3", "--actors", "2", "--store", url]
    done = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    store = open_store(url)
    assert store.complete and len(store) == 6
    ref = reference(folders["gpt2"], rows, generation_args={"max_new_tokens": 3})
    assert_same(store, rows, ref)


@pytest.mark.slow
def test_store_on_s3_compatible_server(ray_head, folders, s3_server):
    rows = prompts(8)
    url = "s3://distattr-test/run.zarr"
    summary = distattr.attribute_dataset(folders["gpt2"], rows, url, "saliency", max_new_tokens=3, id_field="uid",
                                         unit_size=4, storage_options=s3_server, show_progress=False)
    assert summary.complete
    store = open_store(url, storage_options=s3_server)
    ref = reference(folders["gpt2"], rows, generation_args={"max_new_tokens": 3})
    assert_same(store, rows, ref)
    again = distattr.attribute_dataset(folders["gpt2"], rows, url, "saliency", max_new_tokens=3, id_field="uid",
                                       unit_size=4, storage_options=s3_server, show_progress=False)
    assert again.skipped_units == again.units


def test_cluster_address_that_does_not_answer(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "the cat"}) + "\n")
    done = subprocess.run(_cli("--data", str(data), "--max-new-tokens", "2", "--store", str(tmp_path / "s.zarr"),
                               "--address", f"127.0.0.1:{free_port()}"), env=ray_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1  # a runtime failure (the cluster is down or elsewhere), not a malformed command
    assert "no Ray cluster answers at" in done.stderr
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "the cat"}\n{"text": "a dog"}\n', "row 1: missing field 'prompt'"),
    ('{"prompt": "the cat"}\n{"prompt": "  "}\n', "row 1: field 'prompt' is empty"),
    ('{"prompt": 3}\n', "must be a string, not int"),
    ('{"prompt": "the cat"}\nnot json\n', "line 2 is not valid JSON"),
    ('{"prompt": "a", "uid": "x"}\n{"prompt": "b", "uid": "x"}\n', "duplicate example id 'x'"),
    ("", "no examples"),
])
def test_bad_data_is_refused_before_anything_runs(tmp_path, content, message):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    done = subprocess.run(_cli("--data", str(data), "--max-new-tokens", "2", "--id-field", "uid",
                               "--store", str(tmp_path / "s.zarr")) if "uid" in content else
                          _cli("--data", str(data), "--max-new-tokens", "2", "--store", str(tmp_path / "s.zarr")),
                          env=ray_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_store_path_that_is_not_a_store_is_left_alone(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "the cat"}) + "\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    for extra in ((), ("--new-store",)):  # --new-store replaces stores, never other data
        done = subprocess.run(_cli("--data", str(data), "--max-new-tokens", "2", "--store", str(other), *extra),
                              env=ray_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 2
        assert "is not a distattr store" in done.stderr
        assert (other / "keep.txt").read_text() == "mine"


def test_unreadable_and_missing_files(tmp_path):
    from distattr.jobs.data import Fields, Rows, records

    with pytest.raises(DataError, match="not found"):
        Rows(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(records(Rows(bad), Fields()))
    odd = tmp_path / "data.xml"
    odd.write_text("<a/>")
    with pytest.raises(DataError, match="unknown data format .xml"):
        list(Rows(odd))


def test_every_input_format_gives_the_same_records(tmp_path):
    import datasets
    import pandas as pd

    from distattr.jobs.data import Fields, Rows, records

    rows = [{"prompt": r["prompt"], "uid": r["uid"], "topic": i % 3} for i, r in enumerate(prompts(7))]
    frame = pd.DataFrame(rows)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    fields = Fields(text="prompt", id="uid", keep=("topic",))
    expected = list(records(Rows(rows), fields))
    sources = ["d.jsonl", "d.json", "d.csv", "d.parquet", "hf"]
    for name in sources:
        got = list(records(Rows(tmp_path / name), fields))
        assert [(r.id, r.text, r.meta) for r in got] == [(r.id, r.text, r.meta) for r in expected], name
    got = list(records(Rows(datasets.Dataset.from_list(rows)), fields))
    assert [r.id for r in got] == [r.id for r in expected]


@pytest.mark.slow
def test_ray_data_input_and_xarray_view(ray_head, folders, tmp_path):
    import ray

    rows = prompts(10)
    url = str(tmp_path / "rd.zarr")
    summary = distattr.attribute_dataset(folders["gpt2"], ray.data.from_items(rows), url, "saliency",
                                         max_new_tokens=3, id_field="uid", unit_size=4, step_scores=["probability"],
                                         show_progress=False)
    assert summary.complete
    store = open_store(url)
    ds = store.to_xarray()
    assert list(ds.example_id.values) == [r["uid"] for r in rows]
    mean = float(ds.score_probability.mean().compute())
    direct = np.nanmean(np.concatenate([store[i].sequences[0].step_scores["probability"] for i in range(10)]))
    assert mean == pytest.approx(direct, rel=1e-6)


def test_save_outputs_round_trip_without_ray(tiny, tmp_path):
    from distattr.store import save_outputs

    model = tiny("llama", "attention")
    out = model.attribute(["the cat is in the house", "a dog"], generation_args={"max_new_tokens": 3},
                          step_scores=["probability"], show_progress=False)
    save_outputs(str(tmp_path / "s.zarr"), out, ids=["a", "b"], unit_size=1)
    store = open_store(str(tmp_path / "s.zarr"))
    assert store.complete and len(store) == 2 and store.schema.dims == ("layer", "head")
    for i, expected in enumerate(out.sequences):
        got = store[i].sequences[0]
        assert got.target_tokens == expected.target_tokens and got.dim_labels == expected.dim_labels
        np.testing.assert_array_equal(got.target_attributions, expected.target_attributions)
        np.testing.assert_array_equal(got.step_scores["probability"], expected.step_scores["probability"])
    assert store.get("b").info["text"] == "a dog"
    ds = store.to_xarray()
    assert ds.target_attributions.dims == ("example", "target_token", "step", "layer", "head")
    with pytest.raises(ValueError, match="unique ids"):
        save_outputs(str(tmp_path / "t.zarr"), out, ids=["x", "x"])
