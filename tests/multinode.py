"""A multi-node Ray cluster on one host (``ray.cluster_utils.Cluster``: a head and worker raylets), for jobs that
lose and gain nodes while they run. Used by tests/test_multinode.py and benchmarks/bench_node_loss.py.

Runs in its own process (``python tests/multinode.py SCENARIO.json``): a test session is already connected to
another Ray cluster, and a driver can be connected to one cluster only. Must run inside a network namespace with
only ``lo`` (the tests' conftest makes one; the benchmark makes its own), where every node is 127.0.0.1.

A scenario is a JSON object: ``nodes`` (CPUs of each worker node at the start; the head has none, so actors run on
workers only), ``command`` (the ``distattr attribute-dataset`` arguments, without ``--address``), ``store`` (the
store path, watched for done markers) and ``events``: a list of ``{"after_done": N, "remove": [i...]}`` or
``{"after_done": N, "add": CPUS}`` applied once N parts are marked done and, with ``"after_working": K``, K actors
have started a unit (read from ``logs``, the job's ``--log-dir``); ``"after_exit": true`` instead: after the driver
has ended, then the command runs again. Prints one JSON line: per run the exit code, stderr and wall time,
and the times of the events (seconds after ``started_at``, a Unix time).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}


def done_count(store: str) -> int:
    folder = Path(store) / "done" / "c"
    return sum(len(files) for _, _, files in os.walk(folder)) if folder.is_dir() else 0


def started_units(logs: Path) -> dict[tuple[int, int], int]:
    """How many times each (unit, part) was started, over every actor's log (``--log-dir``)."""
    counts: dict[tuple[int, int], int] = {}
    for log in logs.glob("actor-*.log"):
        for unit, part in re.findall(r"start unit (\d+) part (\d+)/", log.read_text()):
            counts[(int(unit), int(part))] = counts.get((int(unit), int(part)), 0) + 1
    return counts


def working_actors(logs: Path) -> int:
    """How many actors have started a unit (their logs in ``--log-dir``)."""
    return sum(1 for log in logs.glob("actor-*.log") if "start unit" in log.read_text())


def run(scenario: dict) -> dict:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": HEALTH})
    workers = [cluster.add_node(num_cpus=n) for n in scenario["nodes"]]
    cluster.wait_for_nodes()
    started, started_at = time.monotonic(), time.time()
    events = list(scenario.get("events", []))
    log: list[dict] = []
    runs: list[dict] = []
    env = {**os.environ, "RAY_ADDRESS": ""}
    command = [sys.executable, "-m", "distattr", "attribute-dataset", *scenario["command"],
               "--address", cluster.address]
    try:
        while True:
            t0 = time.monotonic()
            driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            while driver.poll() is None:
                done = done_count(scenario["store"])
                working = working_actors(Path(scenario["logs"])) if "logs" in scenario else 0
                due = [e for e in events if not e.get("after_exit") and done >= e["after_done"]
                       and working >= e.get("after_working", 0)]
                for event in due:
                    events.remove(event)
                    apply(cluster, workers, event)
                    log.append({**event, "t": time.monotonic() - started})
                time.sleep(0.05)
            out, err = driver.communicate()
            runs.append({"returncode": driver.returncode, "stderr": err, "stdout": out,
                         "wall_s": time.monotonic() - t0, "t_end": time.monotonic() - started})
            after = [e for e in events if e.get("after_exit")]
            if not after:
                break
            for event in after:
                events.remove(event)
                apply(cluster, workers, event)
                log.append({**event, "t": time.monotonic() - started})
            cluster.wait_for_nodes()
    finally:
        cluster.shutdown()
    return {"runs": runs, "events": log, "started_at": started_at}


def apply(cluster, workers: list, event: dict) -> None:
    for index in event.get("remove", []):
        cluster.remove_node(workers[index], allow_graceful=False)
    if "add" in event:
        workers.append(cluster.add_node(num_cpus=event["add"]))


if __name__ == "__main__":
    print(json.dumps(run(json.loads(Path(sys.argv[1]).read_text()))))
