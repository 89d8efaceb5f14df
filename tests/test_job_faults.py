"""Dataset jobs against the faults of a real run, on the session's Ray cluster: a driver killed between two parts
of a sampled generation, two drivers on one store, an example that cannot be attributed, one longer than the
model's context, a disk that fills up, and an S3 server that throttles."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from multinode import done_count
from raycluster import ray_env
from test_dist import assert_same, prompts, reference, slots_used, write_jsonl

import distattr
from distattr.store import io as store_io
from distattr.store import open_store
from distattr.store.layout import Schema

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpt2(tiny_dir):
    return tiny_dir("gpt2")


def cli(ray_head, *args: str) -> list[str]:
    return [sys.executable, "-m", "distattr", "attribute-dataset", *args, "--address", ray_head.address]


def start_until(cmd: list[str], ready, limit: float = 300) -> subprocess.Popen:
    """Start a driver and return it once ``ready()`` holds (it must still be running)."""
    driver = subprocess.Popen(cmd, env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + limit
    while time.time() < deadline and driver.poll() is None and not ready():
        time.sleep(0.05)
    assert driver.poll() is None, f"the driver ended too early:\n{driver.communicate()[0][-3000:]}"
    return driver


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("distattr: error:")]


def test_a_resumed_split_example_keeps_its_sampled_generation(ray_head, gpt2, tmp_path):
    rows = prompts(3)
    data, store = write_jsonl(tmp_path / "d.jsonl", rows), str(tmp_path / "sampled.zarr")
    cmd = cli(ray_head, "--model", gpt2, "--method", "integrated_gradients", "--method-arg", "n_steps=300",
              "--token-budget", "64",  # small batches: slow enough to be killed between two parts
              "--data", str(data), "--id-field", "uid", "--max-new-tokens", "6", "--split-steps", "2",
              "--generation-arg", "do_sample=true", "--store", store)
    driver = start_until(cmd, lambda: done_count(store) >= 1)
    driver.kill()  # between two parts of the first example: its generation is stored, not all of its parts
    driver.wait()
    group = store_io.open_group(store, "r")
    schema = Schema.from_json(group.attrs["schema"])
    done = store_io.done_cells(group, schema)
    partly = [u for u in range(schema.n_units) if 0 < sum((u, p) in done for p in range(3)) < 3]
    assert partly, f"the driver was not stopped between two parts (done: {sorted(done)})"
    first = {u: store_io.stored_targets(group, schema, u) for u in partly}
    assert all(first.values())
    rerun = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    store_ = open_store(store)
    assert store_.complete and slots_used(store).tolist() == [0, 1, 2]
    model = distattr.load_model(gpt2, "integrated_gradients", method_args={"n_steps": 300})
    for unit, ids in first.items():
        index = int(store_io.open_group(store, "r")["example_index"][unit * schema.unit_size])
        got = store_[index].sequences[0]
        assert list(got.target_ids) == ids  # the resumed parts attributed the generation of the first run
        expected = model.attribute([rows[index]["prompt"]], [ids], show_progress=False).sequences[0]
        np.testing.assert_allclose(got.target_attributions, expected.target_attributions, atol=1e-4,
                                   equal_nan=True)


def test_a_second_driver_is_refused_and_a_dead_drivers_lease_is_taken_over(ray_head, gpt2, tmp_path):
    rows = prompts(48)  # long enough (~1 min in 64-token batches) for the two refused drivers to run meanwhile
    data, store = write_jsonl(tmp_path / "d.jsonl", rows), str(tmp_path / "leased.zarr")
    cmd = cli(ray_head, "--model", gpt2, "--method", "integrated_gradients", "--method-arg", "n_steps=500",
              "--token-budget", "64",
              "--data", str(data), "--id-field", "uid", "--max-new-tokens", "6", "--unit-size", "2", "--store", store)
    first = start_until(cmd, lambda: (Path(store) / "lease.json").exists())
    try:
        for extra in ((), ("--new-store",)):
            second = subprocess.run(cmd + list(extra), env=ray_env(), capture_output=True, text=True, timeout=300)
            assert second.returncode == 1, second.stderr[-2000:]  # a runtime condition: the store is busy
            (line,) = error_lines(second.stderr)
            assert "is in use by another driver (host" in line and f"pid {first.pid}" in line
        assert first.poll() is None and (Path(store) / "lease.json").exists()  # the first driver was left alone
    finally:
        first.kill()
        first.wait()
    third = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "took over the store's lease" in third.stderr and f"pid {first.pid}" in third.stderr
    assert open_store(store).complete and not (Path(store) / "lease.json").exists()


def test_one_bad_example_is_stored_as_failed_and_the_job_completes(ray_head, gpt2, tmp_path):
    rows = [{**r, "target": r["prompt"] + " and more"} for r in prompts(6)]
    rows[2]["target"] = "something else entirely"  # a decoder-only target must start with its prompt
    url = str(tmp_path / "bad.zarr")
    summary = distattr.attribute_dataset(gpt2, rows, url, "saliency", target_field="target", id_field="uid",
                                         unit_size=3, show_progress=False)
    assert summary.complete and not summary.failures
    ((index, example_id, message),) = summary.failed_examples
    assert (index, example_id) == (2, "ex-2") and "must start with its input" in message
    assert "complete, 1 examples failed" in summary.lines()[0]
    store = open_store(url)
    assert store.complete and store.failures == [(2, "ex-2", message)]
    with pytest.raises(KeyError, match="failed"):
        store[2]
    good = [i for i in range(6) if i != 2]
    model = distattr.load_model(gpt2, "saliency")
    ref = model.attribute([rows[i]["prompt"] for i in good], [rows[i]["target"] for i in good],
                          show_progress=False).sequences
    for i, expected in zip(good, ref, strict=True):
        np.testing.assert_allclose(store[i].sequences[0].target_attributions, expected.target_attributions,
                                   atol=1e-5, equal_nan=True)
    assert list(store.to_xarray().example_id.values) == [f"ex-{i}" for i in good]


def test_an_example_longer_than_the_context_is_refused_before_anything_runs(ray_head, gpt2, tmp_path):
    rows = prompts(3) + [{"prompt": " ".join(["tower"] * 200), "uid": "long"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    done = subprocess.run(cli(ray_head, "--model", gpt2, "--data", str(data), "--id-field", "uid",
                              "--max-new-tokens", "4", "--store", str(tmp_path / "s.zarr")),
                          env=ray_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = error_lines(done.stderr)
    assert "longer than the model's context of 128 tokens" in line and "id 'long'" in line
    assert not (tmp_path / "s.zarr").exists()


def test_a_full_disk_stops_the_job_at_once_and_keeps_what_was_written(ray_head, gpt2, tmp_path, small_disk):
    disk = small_disk("4m")
    rows = prompts(40)
    data, store = write_jsonl(tmp_path / "d.jsonl", rows), str(disk / "full.zarr")
    cmd = cli(ray_head, "--model", gpt2, "--method", "integrated_gradients", "--method-arg", "n_steps=50",
              "--data", str(data), "--id-field", "uid", "--max-new-tokens", "6", "--unit-size", "1",
              "--store", store)
    driver = start_until(cmd, lambda: done_count(store) >= 2)
    filler = disk / "filler"
    with open(filler, "wb") as out:  # take every byte left
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    at_full = done_count(store)
    stdout, _ = driver.communicate(timeout=300)
    assert driver.returncode == 1, stdout[-3000:]
    (line,) = error_lines(stdout)
    assert "the store refuses writes" in line and "disk is full" in line and "Traceback" not in stdout
    assert done_count(store) <= at_full + 2  # nothing computed after the error but what was in flight
    filler.unlink()
    rerun = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert open_store(store).complete and slots_used(store).tolist() == list(range(40))


def test_an_s3_server_that_throttles_is_retried_and_counted(ray_head, gpt2, s3_server):
    from test_store_integrity import INNER_TRIES, FaultProxy

    proxy = FaultProxy(s3_server["endpoint_url"])
    injected = {"left": INNER_TRIES + 2}

    def take(method: str, path: str) -> bool:  # only the actors' attribution writes, once, a long burst
        if method == "PUT" and "/target_attributions/c/" in path and injected["left"] > 0:
            injected["left"] -= 1
            proxy.injected += 1
            return True
        return False

    proxy.take = take
    options = {**s3_server, "endpoint_url": proxy.url,
               "config_kwargs": {"retries": {"total_max_attempts": 2, "mode": "standard"}}}
    rows = prompts(8)
    try:
        summary = distattr.attribute_dataset(gpt2, rows, "s3://distattr-test/throttled.zarr", "saliency",
                                             max_new_tokens=3, id_field="uid", unit_size=4, storage_options=options,
                                             show_progress=False)
    finally:
        proxy.close()
    assert summary.complete and proxy.injected == INNER_TRIES + 2
    assert summary.storage_retries >= 1
    assert any("storage retries: " + str(summary.storage_retries) in line for line in summary.lines())
    store = open_store("s3://distattr-test/throttled.zarr", storage_options=s3_server)
    assert_same(store, rows, reference(gpt2, rows, generation_args={"max_new_tokens": 3}))
