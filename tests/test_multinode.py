"""Dataset jobs on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head without CPUs and worker
raylets on 127.0.0.1, in the tests' loopback-only namespace) that lose and gain nodes while they run.

Each test runs tests/multinode.py in a subprocess (this session is connected to another cluster), which starts
the nodes, runs ``distattr attribute-dataset`` against them and removes or adds nodes when the store has a given
number of done markers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NETWORK_ISOLATED
from multinode import started_units
from raycluster import ray_env
from test_dist import assert_same, prompts, reference, slots_used, write_jsonl

from distattr.store import open_store

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not NETWORK_ISOLATED, reason="Ray clusters run only in an isolated network namespace")]
HARNESS = Path(__file__).with_name("multinode.py")


@pytest.fixture(scope="module")
def gpt2(tiny_dir):
    return tiny_dir("gpt2")


def scenario(tmp_path: Path, **spec) -> dict:
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, str(HARNESS), str(path)], env=ray_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def job(gpt2: str, data: Path, store: str, logs: Path, *extra: str, n_steps: int = 100) -> list[str]:
    """IG on a tiny GPT-2: units of 2 examples that take long enough to lose or add a node mid-job (a 64-token
    budget: many batches per unit, whatever the machine's memory makes the default)."""
    return ["--model", gpt2, "--method", "integrated_gradients", "--method-arg", f"n_steps={n_steps}",
            "--data", str(data), "--token-budget", "64",
            "--id-field", "uid", "--max-new-tokens", "6", "--store", store, "--unit-size", "2", "--split-steps", "0",
            "--log-dir", str(logs), *extra]


def test_a_job_survives_a_lost_node_with_every_example_once(gpt2, tmp_path):
    rows = prompts(16)
    data, store, logs = write_jsonl(tmp_path / "d.jsonl", rows), str(tmp_path / "lost.zarr"), tmp_path / "logs"
    result = scenario(tmp_path, nodes=[1, 1], store=store, logs=str(logs),
                      events=[{"after_done": 1, "after_working": 2, "remove": [1]}],  # both actors busy
                      command=job(gpt2, data, store, logs, "--actors", "2", "--stall-timeout", "120", n_steps=300))
    (run,) = result["runs"]
    assert run["returncode"] == 0, run["stderr"][-3000:]
    assert re.search(r"actor \d .*was lost", run["stderr"]), run["stderr"][-3000:]
    assert "(complete)" in run["stderr"]
    assert slots_used(store).tolist() == list(range(16))  # every example once
    ref = reference(gpt2, rows, "integrated_gradients", generation_args={"max_new_tokens": 6}, n_steps=300)
    assert_same(open_store(store), rows, ref, atol=1e-4)
    started = started_units(logs)
    assert set(started) == {(u, 0) for u in range(8)}
    twice = sum(n - 1 for n in started.values())
    assert twice <= 2  # at most the tasks the lost actor held (in_flight = 2)


def test_every_node_lost_stops_with_one_line_then_a_new_node_resumes(gpt2, tmp_path):
    rows = prompts(12)
    data, store, logs = write_jsonl(tmp_path / "d.jsonl", rows), str(tmp_path / "all.zarr"), tmp_path / "logs"
    result = scenario(tmp_path, nodes=[1], store=store,
                      events=[{"after_done": 1, "remove": [0]}, {"after_exit": True, "add": 1}],
                      command=job(gpt2, data, store, logs, "--actors", "1", "--stall-timeout", "8"))
    stopped, resumed = result["runs"]
    assert stopped["returncode"] == 1, stopped["stderr"][-3000:]
    errors = [line for line in stopped["stderr"].splitlines() if line.startswith("distattr: error:")]
    assert len(errors) == 1 and "Traceback" not in stopped["stderr"]
    assert "no live actor for" in errors[0] and "no node can host an actor with num_cpus=1" in errors[0]
    assert "rerun the same command" in errors[0]
    lost_at = result["events"][0]["t"]
    assert stopped["t_end"] - lost_at < 8 + 30  # the stall timeout, plus detection and shutdown
    assert resumed["returncode"] == 0, resumed["stderr"][-3000:]
    skipped = int(resumed["stderr"].split(" already done")[0].rsplit("(", 1)[1])
    assert skipped >= 1  # what the stopped run wrote was kept
    assert open_store(store).complete and slots_used(store).tolist() == list(range(12))
    ref = reference(gpt2, rows, "integrated_gradients", generation_args={"max_new_tokens": 6}, n_steps=100)
    assert_same(open_store(store), rows, ref, atol=1e-4)


def test_a_node_added_mid_job_gets_work(gpt2, tmp_path):
    rows = prompts(32)  # one actor alone needs ~30 s: the second node and its actor (~5 s) come well before the end
    data, store, logs = write_jsonl(tmp_path / "d.jsonl", rows), str(tmp_path / "grow.zarr"), tmp_path / "logs"
    result = scenario(tmp_path, nodes=[1], store=store, events=[{"after_done": 1, "add": 1}],
                      command=job(gpt2, data, store, logs, "--actors", "2", n_steps=400))
    (run,) = result["runs"]
    assert run["returncode"] == 0, run["stderr"][-3000:]
    assert "actor 1 ready" in run["stderr"]
    by_actor = {log.name: len(re.findall(r"start unit", log.read_text())) for log in logs.glob("actor-*.log")}
    assert by_actor.get("actor-1.log", 0) >= 1, by_actor  # the actor placed on the new node attributed units
    assert slots_used(store).tolist() == list(range(32))
