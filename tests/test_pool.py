"""The actor pool of dataset jobs (distattr/jobs/pool.py) on the session's real Ray cluster, with stand-in
replicas whose faults the tests choose: actors that fail at once, die, or cannot be placed; tasks that hit a full
store. The model-level paths (the replica's own retries) are tested on a real Attributor without Ray."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from distattr.jobs.actor import JobSpec, ReplicaError, Report, Task
from distattr.jobs.plan import Unit
from distattr.jobs.pool import RETIRE_AFTER, JobStalled, JobStopped, Pool, Resources

JOB = JobSpec(model="stand-in", store="unused")


def replica_class(record_dir: str, behaviour: dict[int, str]):
    """A stand-in replica: ``behaviour[rank]`` is "fail" (raise at once), "replica" (raise ReplicaError) or "full"
    (raise StorageFatal); ``behaviour["any"]``: "die3" (the first replica to run unit 3 exits its process),
    "noload" (loading the model fails), "noinit" (the constructor raises), "slowload" (loading takes 25 s). Others
    work for 0.1 s a task. Every task leaves a file ``<rank>-<unit>-<n>`` in ``record_dir``. Built in a function
    so that Ray ships it by value."""

    class StandIn:
        def __init__(self, job, rank, num_cpus=1.0):
            if behaviour.get("any") == "noinit":
                raise ModuleNotFoundError("No module named 'notebook_only'")
            self.rank, self.n = rank, 0

        def ping(self):
            return os.getpid()

        def ready(self):
            if behaviour.get("any") == "noload":
                raise OSError("model folder not found: /nowhere")
            if behaviour.get("any") == "slowload":
                time.sleep(25)
            return {"host": "here", "pid": os.getpid(), "rank": self.rank}

        def run(self, task):
            from distattr.store.faults import StorageFatal

            self.n += 1
            Path(record_dir, f"{self.rank}-{task.unit.id}-{self.n}").touch()
            what = behaviour.get(self.rank)
            if what == "fail":
                raise RuntimeError("this replica is broken")
            if what == "replica":
                raise ReplicaError("the model client failed 3 times")
            if what == "full":
                raise StorageFatal("the store's disk is full (No space left on device)")
            if behaviour.get("any") == "die3" and task.unit.id == 3 and not Path(record_dir, "died").exists():
                Path(record_dir, "died").touch()
                os._exit(1)
            time.sleep(0.1)
            return Report(unit=task.unit.id, part=0, examples=1, steps=2, seconds=0.1, rank=self.rank,
                          pid=os.getpid())

    return StandIn


def drain(tmp_path, behaviour, n_units=10, done=lambda key: False, **resources):
    messages: list[str] = []
    pool = Pool(JOB, Resources(**{"actors": 2, **resources}), say=messages.append,
                actor_class=replica_class(str(tmp_path), behaviour))
    reports: list[Report] = []
    try:
        counts = pool.drain([Task(unit=Unit(id=u, records=())) for u in range(n_units)], done=done,
                            on_report=reports.append, on_targets=lambda item, ids: [])
    finally:
        pool.shutdown()
    return counts, reports, messages


def tasks_of(tmp_path, rank: int) -> int:
    return sum(1 for p in tmp_path.iterdir() if p.name.startswith(f"{rank}-"))


def test_an_actor_that_fails_at_once_is_retired_not_fed_faster(ray_head, tmp_path):
    counts, reports, messages = drain(tmp_path, {0: "fail"})
    assert sorted(r.unit for r in reports) == list(range(10))  # every unit done once, by working replicas
    assert not counts.failures
    assert any("actor 0" in m and "retired after 3 failed task(s)" in m for m in messages), messages
    # retired after RETIRE_AFTER failures in a row; at most one more task was queued on it meanwhile
    assert tasks_of(tmp_path, 0) <= RETIRE_AFTER + 1
    assert counts.lost == 1 and counts.requeued >= RETIRE_AFTER


def test_a_replica_error_retires_the_actor_at_once(ray_head, tmp_path):
    counts, reports, messages = drain(tmp_path, {0: "replica"})
    assert sorted(r.unit for r in reports) == list(range(10))
    assert tasks_of(tmp_path, 0) <= 2  # its first failure retired it (in_flight = 2)
    assert any("actor 0" in m and "retired after 1 failed task(s)" in m for m in messages), messages


def test_a_full_store_stops_the_job_at_once(ray_head, tmp_path):
    with pytest.raises(JobStopped, match="the store refuses writes: StorageFatal: the store's disk is full"):
        drain(tmp_path, {0: "full", 1: "full"}, n_units=50)
    assert sum(1 for _ in tmp_path.iterdir()) <= 4  # no unit after the first answers (2 actors x in_flight 2)


def test_a_lost_actors_tasks_move_unless_the_store_has_them(ray_head, tmp_path):
    # the actor running unit 3 dies; the stand-in store already has unit 3's done marker, so it is not redone,
    # and the task queued behind it on that actor goes to a live one
    counts, reports, messages = drain(tmp_path, {"any": "die3"}, n_units=12, done=lambda key: key == (3, 0))
    assert (tmp_path / "died").exists()
    assert sorted(r.unit for r in reports) == [u for u in range(12) if u != 3]
    assert counts.lost == 1 and any("was lost" in m for m in messages), messages
    assert not counts.failures


def test_no_placeable_actor_stops_with_one_line_that_says_why(ray_head, tmp_path):
    started = time.monotonic()
    with pytest.raises(JobStalled) as stalled:
        drain(tmp_path, {}, actors=1, num_cpus=64, stall_timeout=2)
    message = str(stalled.value)
    assert "\n" not in message and time.monotonic() - started < 30
    assert "no live actor for" in message and "no node can host an actor with num_cpus=64" in message
    assert "1 alive node(s): CPU 2 GPU 0" in message and "resumable" in message


def test_an_unreachable_actor_is_killed_and_confirmed_dead(ray_head, tmp_path):
    import ray
    from ray.exceptions import ActorDiedError

    from distattr.jobs.pool import Replica

    pool = Pool(JOB, Resources(actors=1), say=lambda m: None, actor_class=replica_class(str(tmp_path), {}))
    try:
        replica = pool.replicas[0]
        ray.get(replica.ready, timeout=60)
        pool._on_ready(replica)
        assert isinstance(replica, Replica) and replica.live
        pool._retire(replica, "was unreachable", unreachable=True)
        with pytest.raises(ActorDiedError):  # gone for good before its work moves
            ray.get(replica.handle.ready.remote(), timeout=10)
        assert len(pool.replicas) == 1 and pool.replicas[0] is not replica  # a replacement was requested
    finally:
        pool.shutdown()


# ---------------------------------------------------------------- the replica's own retries (no Ray)


def test_a_model_client_that_stops_answering_is_rebuilt_then_given_up(tiny_dir, tmp_path, monkeypatch):
    import torch

    from distattr.jobs import actor as actor_module
    from distattr.models.petals import PetalsUnavailable

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # an actor sets its process's threads: not ours
    replica = actor_module.Attributor(JobSpec(model=tiny_dir("gpt2"), store="unused"), rank=0)
    loads = []
    monkeypatch.setattr(replica, "_load", lambda: loads.append(1))
    answers = iter([PetalsUnavailable("the Petals worker exited"), "ok"])

    def flaky(task):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(replica, "_run", flaky)
    assert replica.run(None) == "ok" and len(loads) == 1  # one new client, then it worked

    def dead(task):
        raise PetalsUnavailable("timed out after 30 s")

    monkeypatch.setattr(replica, "_run", dead)
    loads.clear()
    with pytest.raises(ReplicaError, match="failed 3 times, with a new client each time"):
        replica.run(None)
    assert len(loads) == actor_module.REBUILDS

    def bad_example(task):
        raise ValueError("the target does not start with its prompt")

    monkeypatch.setattr(replica, "_run", bad_example)
    loads.clear()
    with pytest.raises(ValueError):  # not the client's fault: no rebuild
        replica.run(None)
    assert not loads


def test_actors_that_cannot_load_the_model_stop_the_job_with_its_error(ray_head, tmp_path):
    with pytest.raises(JobStopped, match=r"actors could not load the model \(4 tries\): OSError: model folder not "
                                         "found: /nowhere"):
        drain(tmp_path, {"any": "noload"}, max_retries=3)


def test_actors_whose_constructor_raises_stop_the_job_too_not_a_stall(ray_head, tmp_path):
    started = time.monotonic()
    with pytest.raises(JobStopped, match=r"actors could not load the model \(3 tries\):.*notebook_only"):
        drain(tmp_path, {"any": "noinit"}, max_retries=2, stall_timeout=300)
    assert time.monotonic() - started < 120


def test_a_slow_model_load_is_not_a_stall(ray_head, tmp_path):
    # placed actors that are still loading (25 s here, 15 min for a 70B model) keep the stall clock stopped; the
    # stall timeout leaves 10 s for Ray to start the actors' processes on a busy machine
    counts, reports, _ = drain(tmp_path, {"any": "slowload"}, n_units=4, stall_timeout=10)
    assert sorted(r.unit for r in reports) == [0, 1, 2, 3]
