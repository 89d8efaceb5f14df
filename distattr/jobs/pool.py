"""The actors of a dataset job and the shared work queue they pull from.

A job wants ``Resources.actors`` replicas. Each replica is *pending* (requested; Ray has not placed it, or its
model is still loading) or *live* (its ``ready()`` call answered). Only live replicas get work, at most
``in_flight`` tasks each; the rest waits in one queue that every live replica draws from. So:

* a replica lost with its node (``ActorDiedError``) or cut off (``ActorUnavailableError``: it may still be running,
  so it is killed and confirmed dead first) hands its unfinished tasks back to the front of the queue, and any
  live replica takes them. Tasks whose ``done`` marker is already in the store are not redone;
* a replacement is requested at once and stays pending until some node can host it; the job never waits on it.
  Replicas that become placeable later (a node joins, an autoscaler adds one) join the job, up to the target;
* every wait has a deadline (:data:`TICK` seconds); when no replica has been live or placed (a placed one answers
  ``ping()`` while it loads its model, however long that takes) for ``stall_timeout`` seconds, the job stops
  with :class:`JobStalled`, one line saying what could not be placed and why;
* a replica whose tasks keep failing (three in a row), or whose model client broke for good
  (:class:`~distattr.jobs.actor.ReplicaError`), is retired: killed, replaced, its tasks requeued. A storage
  error that retrying cannot fix (:class:`~distattr.store.faults.StorageFatal`) stops the job at once.

The store is the truth about what is done, so a stopped job is resumed by running it again.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .actor import Attributor, JobSpec, ReplicaError, Report, Task
from .plan import Unit

TICK = 1.0  # seconds: the longest any wait of the driver blocks before it looks at the job again
RETIRE_AFTER = 3  # consecutive failed tasks that retire a replica
CONFIRM_DEAD_S = 30.0  # how long to wait for a killed, unreachable replica to be reported dead


class JobStopped(RuntimeError):
    """The job cannot go on (no actor can be placed, the store refuses writes); the store stays resumable."""


class JobStalled(JobStopped):
    """No actor was alive for ``stall_timeout`` seconds."""


@dataclass(frozen=True)
class Resources:
    """Ray resources: ``actors`` replicas, each with ``num_cpus`` and ``num_gpus`` (None: one GPU per actor when
    the cluster has GPUs, else the CPU)."""

    actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float | None = None
    in_flight: int = 2  # tasks queued per actor: one running, one ready
    max_retries: int = 3  # resubmissions of a unit whose actor was lost or whose task failed
    stall_timeout: float = 600.0  # seconds without any live actor before the job stops

    def __post_init__(self):
        if self.actors < 1 or self.in_flight < 1 or self.max_retries < 0:
            raise ValueError("actors and in_flight must be at least 1, max_retries at least 0")
        if self.stall_timeout <= 0:
            raise ValueError("stall_timeout must be positive (seconds)")


@dataclass(frozen=True)
class Generate:
    """Generate (or read back from the store) the target of a split unit's example; then its parts run as tasks
    with those ids."""

    unit: Unit
    parts: tuple[int, ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.unit.id, self.parts[0])


Item = Task | Generate


@dataclass
class Replica:
    """One actor of the job and the tasks it holds."""

    rank: int
    handle: object
    placed: object  # ObjectRef of handle.ping(): resolves once Ray has placed the actor on a node
    ready: object  # ObjectRef of handle.ready(), submitted after ping: resolves once the model is loaded
    live: bool = False
    is_placed: bool = False  # ping answered: on a node, loading its model
    where: str = ""  # "host pid" once live
    tasks: dict = field(default_factory=dict)  # ObjectRef -> Item
    failures_in_a_row: int = 0


@dataclass
class Counts:
    """What the drain did (the driver turns it into a Summary)."""

    steps: int = 0
    examples: int = 0
    requeued: int = 0  # tasks handed back to the queue after their actor was lost or retired
    lost: int = 0  # actors lost (died, unreachable, retired)
    storage_retries: int = 0
    failures: list[tuple[int, int, str]] = field(default_factory=list)  # (unit, part, error): tasks given up


class Pool:
    """The replicas of a job, the queue of its tasks, and the loop that runs one against the other."""

    def __init__(self, job: JobSpec, resources: Resources, say: Callable[[str], None],
                 tick: Callable[[], None] = lambda: None, actor_class: type = Attributor):
        """``actor_class``: the replica class Ray runs (:class:`Attributor`; tests give stand-ins)."""
        import ray

        self.job, self.resources, self.say, self.tick = job, resources, say, tick
        gpus = resources.num_gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            say("actors use one GPU each" if gpus else "actors use the CPU: the cluster has no GPU now (pass "
                "--num-gpus 1 when an autoscaler adds GPU nodes)")
        self.options = {"num_cpus": resources.num_cpus, "num_gpus": gpus, "max_restarts": 0}
        self.remote = ray.remote(actor_class)
        self.replicas: list[Replica] = []
        self.next_rank = self.start_failures = 0
        self.counts = Counts()
        self.no_live_since: float | None = time.monotonic()  # since when no replica is live or placed
        self.last_refusal = ""
        self._top_up()

    # ------------------------------------------------------------ replicas

    @property
    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.live]

    @property
    def pending(self) -> list[Replica]:
        return [r for r in self.replicas if not r.live]

    def state(self) -> str:
        loading = sum(r.is_placed for r in self.pending)
        return (f"actors: {len(self.live)} live, {loading} loading, {len(self.pending) - loading} pending, "
                f"{self.counts.lost} lost")

    def _top_up(self) -> None:
        """Request replicas until live + pending reaches the target."""
        while len(self.replicas) < self.resources.actors:
            handle = self.remote.options(**self.options).remote(self.job, self.next_rank, self.resources.num_cpus)
            placed = handle.ping.remote()  # an actor runs its calls in order: ping answers first, then ready
            self.replicas.append(Replica(rank=self.next_rank, handle=handle, placed=placed,
                                         ready=handle.ready.remote()))
            self.next_rank += 1

    def _on_ready(self, replica: Replica) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            info = ray.get(replica.ready, timeout=TICK * 30)
        except RayActorError as err:
            if "creation task" in str(err):  # its constructor raised (e.g. the job could not be unpickled there)
                self._start_failed(replica, err)
                return
            self.replicas.remove(replica)
            self.counts.lost += 1
            self.say(f"actor {replica.rank} was lost before it was ready; requesting another")
            self._top_up()
            return
        except RayTaskError as err:  # loading the model failed: every replica may fail the same way
            self._start_failed(replica, err)
            return
        replica.live, replica.where = True, f"{info['host']} pid {info['pid']}"
        self.say(f"actor {replica.rank} ready on {replica.where} ({self.state()})")

    def _start_failed(self, replica: Replica, err: Exception) -> None:
        """A replica could not start or load the model: count it (every replica may fail the same way; the job stops
        after ``max_retries`` of them, with the error) and request another."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(replica.handle, no_restart=True)
        self.replicas.remove(replica)
        self.start_failures += 1
        message = self.last_refusal = _first_error_line(err)
        if self.start_failures > self.resources.max_retries:
            raise JobStopped(f"actors could not load the model ({self.start_failures} tries): {message}") from None
        self.say(f"actor {replica.rank} could not load the model ({message}); trying another")
        self._top_up()

    def _retire(self, replica: Replica, reason: str, unreachable: bool = False) -> list[Item]:
        """Kill a replica (confirmed dead when it was only unreachable), request a replacement, and return the
        tasks it held."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(replica.handle, no_restart=True)
        if unreachable:
            _confirm_dead(replica.handle)
        self.replicas.remove(replica)
        self.counts.lost += 1
        held = list(replica.tasks.values())
        replica.tasks.clear()
        self.say(f"actor {replica.rank} ({replica.where or 'not started'}) {reason}; {len(held)} task(s) go back to "
                 f"the queue ({self.state()})")
        self._top_up()
        return held

    def shutdown(self) -> None:
        import ray

        for replica in self.replicas:
            with contextlib.suppress(Exception):
                ray.kill(replica.handle, no_restart=True)
        self.replicas.clear()

    # ------------------------------------------------------------ calls with deadlines

    def call_live(self, method: str, *args):
        """Run one call on some live replica (waiting for one, within the stall timeout); a replica lost during
        the call is replaced and the call goes to another."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        while True:
            self._wait_for_events()
            if not self.live:
                continue
            replica = self.live[0]
            ref = getattr(replica.handle, method).remote(*args)
            while True:
                try:
                    return ray.get(ref, timeout=TICK)
                except GetTimeoutError:
                    self.tick()
                    self._check_pending()
                except RayActorError as err:
                    self._retire(replica, f"was lost ({_first_error_line(err)})",
                                 unreachable=_unreachable(err))
                    break

    def _check_pending(self) -> None:
        """Pick up replicas that were placed or became ready, without blocking."""
        import ray

        pending = [r.ready for r in self.pending]
        if pending:
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
            for replica in [r for r in self.pending if r.ready in ready]:
                self._on_ready(replica)
        unplaced = [r.placed for r in self.pending if not r.is_placed]
        if unplaced:
            placed, _ = ray.wait(unplaced, num_returns=len(unplaced), timeout=0)
            for replica in self.pending:
                replica.is_placed = replica.is_placed or replica.placed in placed
        self._check_stall()

    def _wait_for_events(self) -> None:
        """Block at most one tick for a pending replica to become ready."""
        import ray

        pending = [r.ready for r in self.pending]
        if pending:
            ray.wait(pending, num_returns=1, timeout=TICK)
        else:
            time.sleep(TICK / 10)
        self.tick()
        self._check_pending()

    def _check_stall(self) -> None:
        """Stop when no replica has been live or placed (loading its model) for the stall timeout."""
        if self.live or any(r.is_placed for r in self.replicas):
            self.no_live_since = None
            return
        if self.no_live_since is None:
            self.no_live_since = time.monotonic()
            return
        waited = time.monotonic() - self.no_live_since
        if waited > self.resources.stall_timeout:
            raise JobStalled(f"no live actor for {waited:.0f} s: {self._placement_problem()}; the store is "
                             "resumable: rerun the same command once the cluster has room")

    def _placement_problem(self) -> str:
        """Why pending replicas are not placed, from the nodes' resources (one clause)."""
        import ray

        want = {"CPU": self.options["num_cpus"], "GPU": self.options["num_gpus"]}
        ask = f"num_cpus={want['CPU']:g}" + (f" and num_gpus={want['GPU']:g}" if want["GPU"] else "")
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
        except Exception as err:  # the GCS itself may be gone
            return f"no node can host an actor with {ask} (the cluster does not answer: {type(err).__name__})"
        fits = [n for n in nodes if all(n.get("Resources", {}).get(k, 0) >= v for k, v in want.items() if v)]
        if not fits:
            sizes = ", ".join(f"CPU {n['Resources'].get('CPU', 0):g} GPU {n['Resources'].get('GPU', 0):g}"
                              for n in nodes[:4]) or "none"
            return f"no node can host an actor with {ask} ({len(nodes)} alive node(s): {sizes})"
        return (f"{len(fits)} node(s) could host an actor with {ask} but their resources are taken, or the actors "
                f"fail while loading the model{': ' + self.last_refusal if self.last_refusal else ''}")

    # ------------------------------------------------------------ the loop

    def drain(self, work: Iterable[Item], done: Callable[[tuple[int, int]], bool],
              on_report: Callable[[Report], None], on_targets: Callable[[Generate, list[int]], Iterable[Task]]) \
            -> Counts:
        """Run every item of ``work`` on live replicas. ``done(key)`` says whether a (unit, part) is marked done in
        the store (checked before a lost replica's task is redone); ``on_targets`` turns a finished
        :class:`Generate` into the tasks of its parts."""
        import ray

        pending: Iterator[Item] = iter(work)
        queue: deque[Item] = deque()  # requeued and split-part tasks go first
        attempts: dict[tuple[int, int], int] = {}
        exhausted = False

        def take() -> Item | None:
            nonlocal exhausted
            if queue:
                return queue.popleft()
            if exhausted:
                return None
            item = next(pending, None)
            exhausted = item is None
            return item

        def requeue(items: list[Item], why: str) -> None:
            for item in reversed(items):
                if isinstance(item, Task) and done(item.key):
                    continue  # written before its actor was lost: not redone
                attempts[item.key] = attempts.get(item.key, 0) + 1
                if attempts[item.key] > self.resources.max_retries:
                    self.counts.failures.append((*item.key, f"{why} {attempts[item.key]} times; giving up"))
                    continue
                self.counts.requeued += 1
                queue.appendleft(item)

        while True:
            for replica in self.live:  # refill: every live replica keeps in_flight tasks
                while len(replica.tasks) < self.resources.in_flight:
                    item = take()
                    if item is None:
                        break
                    call = replica.handle.generate_unit if isinstance(item, Generate) else replica.handle.run
                    replica.tasks[call.remote(item.unit if isinstance(item, Generate) else item)] = item
            flying = {ref: replica for replica in self.live for ref in replica.tasks}
            if not flying and not queue and exhausted:
                return self.counts
            watched = [*flying, *(r.ready for r in self.pending)]
            ready, _ = ray.wait(watched, num_returns=1, timeout=TICK) if watched else ([], [])
            if not watched:
                time.sleep(TICK / 10)
            for ref in ready:
                if ref in flying:
                    self._on_result(flying[ref], ref, queue, requeue, on_report, on_targets)
            self._check_pending()
            self.tick()

    def _on_result(self, replica: Replica, ref, queue: deque, requeue, on_report, on_targets) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        from ..store.faults import StorageFatal

        item = replica.tasks.pop(ref)
        try:
            result = ray.get(ref, timeout=TICK * 30)
        except RayActorError as err:
            held = [item, *self._retire(replica, f"was lost ({_first_error_line(err)})",
                                        unreachable=_unreachable(err))]
            requeue(held, "its actor was lost")
            return
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, StorageFatal):
                raise JobStopped(f"the store refuses writes: {_first_error_line(err)}") from None
            replica.failures_in_a_row += 1
            message = _first_error_line(err)
            if isinstance(cause, ReplicaError) or replica.failures_in_a_row >= RETIRE_AFTER:
                held = self._retire(replica, f"is retired after {replica.failures_in_a_row} failed task(s) "
                                             f"({message})")
                requeue([item, *held], "it failed")
            else:
                requeue([item], "it failed")
                self.say(f"unit {item.key[0]} part {item.key[1]} failed on actor {replica.rank}: {message}")
            return
        replica.failures_in_a_row = 0
        if isinstance(item, Generate):
            queue.extendleft(reversed(list(on_targets(item, list(result)))))
        else:
            self.counts.steps += result.steps
            self.counts.examples += result.examples
            self.counts.storage_retries += result.storage_retries
            on_report(result)


def _unreachable(err: BaseException) -> bool:
    """``ActorUnavailableError``: the actor may still be running (a network partition, a restarting node)."""
    from ray.exceptions import ActorUnavailableError

    return isinstance(err, ActorUnavailableError)


def _confirm_dead(handle, limit: float = CONFIRM_DEAD_S) -> None:
    """After ``ray.kill``: wait until calls to the actor fail with ``ActorDiedError`` (so its work can move
    without two live actors writing the same unit), at most ``limit`` seconds."""
    import ray
    from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            ray.get(handle.ping.remote(), timeout=TICK)
        except ActorDiedError:
            return
        except (RayActorError, GetTimeoutError):
            time.sleep(TICK / 2)
            continue
        with contextlib.suppress(Exception):  # it answered: it is alive after all, kill it again
            ray.kill(handle, no_restart=True)


def _first_error_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    text = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {text[-1].strip() if text else ''}"[:300]
