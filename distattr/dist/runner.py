"""The driver of a dataset job: plan units, create (or resume) the store, feed Ray actors, retry lost work.

Reading top to bottom: :func:`run_job` connects to Ray, surveys the data (validation, fingerprint, bounds),
starts the actors, probes the store's shape, creates or checks the store, then streams units to the actors
with at most ``in_flight`` tasks each (the driver never holds results: actors write them), replaces actors
that die and resubmits their units, and marks the store complete when every unit is written.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

from ..store import io as store_io
from ..store.layout import Schema
from .actor import PERFORMANCE_ARGS, Attributor, JobSpec, Report, Task
from .data import Fields, Rows, records
from .plan import Survey, Unit, plan_units, sizer, survey


@dataclass(frozen=True)
class Resources:
    """Ray resources: ``actors`` replicas, each with ``num_cpus`` and ``num_gpus`` (None: one GPU per actor when
    the cluster has GPUs, else the CPU)."""

    actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float | None = None
    in_flight: int = 2  # tasks queued per actor: one running, one ready
    max_retries: int = 3  # resubmissions of a unit whose actor died


@dataclass(frozen=True)
class Summary:
    """The end of a job."""

    store: str
    examples: int
    units: int
    skipped_units: int  # already done in the store (resumed job)
    steps: int  # attributed target tokens written by this run
    retried: int  # tasks resubmitted after an actor died
    failures: tuple[tuple[int, int, str], ...] = field(default_factory=tuple)  # (unit, part, error)
    wall_s: float = 0.0
    complete: bool = False

    def lines(self) -> list[str]:
        rate = self.steps / self.wall_s if self.wall_s else 0.0
        out = [f"store: {self.store} ({'complete' if self.complete else 'INCOMPLETE'})",
               f"examples: {self.examples} in {self.units} units ({self.skipped_units} already done)",
               f"attributed tokens: {self.steps} in {self.wall_s:.1f} s ({rate:.1f} tokens/s)",
               f"tasks retried after a lost actor: {self.retried}",
               f"failed units: {len(self.failures)}"]
        out += [f"  unit {u} part {p}: {msg}" for u, p, msg in self.failures[:20]]
        return out


# ---------------------------------------------------------------- Ray connection


def connect(address: str | None, num_cpus: float | None = None) -> None:
    """Join the cluster at ``address`` ("auto", "host:port", "ray://host:port"), the one ``ray job submit`` runs
    in (``RAY_ADDRESS``), or start a local one on 127.0.0.1."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(num_cpus=int(num_cpus) if num_cpus else None, _node_ip_address="127.0.0.1",
                 include_dashboard=False, log_to_driver=True)
        return
    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as err:
        raise ConnectionError(f"no Ray cluster answers at {address!r}: {err}") from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port or (10001 if parsed.scheme == "ray" else 6379)
    if parsed.scheme in ("http", "https"):
        raise ValueError(f"{address!r} is a dashboard address; give the cluster's GCS address (host:6379), or "
                         "submit with 'ray job submit --address http://...'")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise ConnectionError(f"no Ray cluster answers at {address!r} ({host}:{port}: {err.strerror or err})") \
            from None


# ---------------------------------------------------------------- the job


def run_job(job: JobSpec, data, fields: Fields, resources: Resources = Resources(), *, address: str | None = None,
            new_store: bool = False, progress: bool = True) -> Summary:
    """Attribute every example of ``data`` into the store ``job.store`` (see :func:`distattr.attribute_dataset`)."""
    started = time.perf_counter()
    rows = Rows(data)
    _check_store_path(job, new_store)
    tokenizer, enc_dec = _tokenizer(job)
    add_special = not job.attribute_args.get("skip_special_tokens", False)
    max_new = (job.attribute_args.get("generation_args") or {}).get("max_new_tokens")
    size = sizer(tokenizer, enc_dec, add_special, max_new)
    info = survey(records(rows, fields), size, job.plan)
    _say(progress, f"{info.count} examples in {info.n_units} units ({info.n_split} split by steps); "
                   f"fingerprint {info.fingerprint[:12]}")

    connect(address, num_cpus=max(resources.actors * resources.num_cpus, 1))
    pool = _Pool(job, resources)
    try:
        first = next(records(rows, fields))
        probe = pool.probe(first)
        schema = _schema(info, probe, job)
        identity = _identity(job, fields, info, probe)
        group, done = _open_or_create(job, schema, identity, _provenance(job, probe), new_store)
        plan = _Work(records(rows, fields), size, job, done)
        summary = pool.drain(plan, info, progress)
    finally:
        pool.shutdown()
    complete = not summary.failures and len(store_io.done_cells(group, schema)) == plan.cells
    summary = dataclasses.replace(summary, complete=complete, wall_s=time.perf_counter() - started, store=job.store,
                                  skipped_units=plan.skipped)
    attrs = group.attrs.asdict()
    provenance = {**attrs["provenance"], "finished": store_io.now_utc(), "summary": asdict(summary)}
    group.attrs.update({"status": "complete" if complete else "writing", "provenance": provenance})
    return summary


def _check_store_path(job: JobSpec, new_store: bool) -> None:
    """Anything at the store path must be a distattr store, even with ``new_store``: never delete other data."""
    if store_io.exists(job.store, job.storage_options):
        store_io.read_header(job.store, job.storage_options)  # raises when it is not a distattr store


def _tokenizer(job: JobSpec):
    from transformers import AutoConfig, AutoTokenizer

    from ..models.loading import resolve_folder

    if not isinstance(job.model, str):
        raise TypeError("attribute_dataset needs the model as a name or path (each actor loads its own replica)")
    folder, _ = resolve_folder(job.model)
    revision = job.load_args.get("revision")
    config = AutoConfig.from_pretrained(folder, revision=revision)
    return AutoTokenizer.from_pretrained(folder, revision=revision), bool(config.is_encoder_decoder)


@dataclass(frozen=True)
class _Generate:
    """Generate the target of a split unit's example once; then its parts run as tasks with those ids."""

    unit: Unit
    parts: tuple[int, ...]


class _Work:
    """The tasks still to do, streamed from the plan; counts the done cells a complete store must have."""

    def __init__(self, recs, size, job: JobSpec, done: set[tuple[int, int]]):
        self.recs, self.size, self.job, self.done = recs, size, job, done
        self.cells = self.skipped = 0

    def __iter__(self) -> Iterator[Task | _Generate]:
        for unit in plan_units(self.recs, self.size, self.job.plan):
            self.cells += unit.n_parts
            parts = tuple(p for p in range(unit.n_parts) if (unit.id, p) not in self.done)
            if not parts:
                self.skipped += 1
            elif unit.n_parts == 1:
                yield Task(unit=unit)
            else:
                yield _Generate(unit=unit, parts=parts)


def _schema(info: Survey, probe: dict, job: JobSpec) -> Schema:
    steps_chunk = min(info.max_steps, job.plan.split_steps or info.max_steps)
    return Schema(n_units=info.n_units, unit_size=job.plan.unit_size, max_source=info.max_source,
                  max_target=info.max_target, max_steps=info.max_steps, steps_chunk=steps_chunk,
                  source_attributions=probe["source_attributions"], target_attributions=probe["target_attributions"],
                  dims=tuple(probe["dims"]), dim_sizes=tuple(probe["dim_sizes"]),
                  dim_labels=tuple(tuple(x) for x in probe["dim_labels"]),
                  step_scores=tuple(job.attribute_args.get("step_scores", ()) or ()), deltas=probe["deltas"])


def _identity(job: JobSpec, fields: Fields, info: Survey, probe: dict) -> dict:
    """Everything the stored values depend on; a store is only resumed by a job with the same identity."""
    value_args = {k: v for k, v in job.attribute_args.items() if k not in PERFORMANCE_ARGS}
    load_args = {k: v for k, v in job.load_args.items() if k not in ("device", "device_map", "max_memory")}
    if "model_kwargs" in load_args:  # where offloaded weights live does not change the values
        load_args["model_kwargs"] = {k: v for k, v in load_args["model_kwargs"].items() if k != "offload_folder"}
    return {"model": job.model, "model_class": probe["model"]["model_class"],
            "model_config_hash": probe["model"]["model_config_hash"], "load_args": load_args,
            "method": job.method, "method_args": job.method_args, "attribute_args": value_args,
            "fields": asdict(fields), "dataset_fingerprint": info.fingerprint, "n_examples": info.count,
            "plan": asdict(job.plan)}


def _provenance(job: JobSpec, probe: dict) -> dict:
    from ..api import versions

    return {"model": probe["model"], "versions": versions(), "created": store_io.now_utc(), "command": " ".join(sys.argv),
            "performance_args": {k: job.attribute_args.get(k) for k in PERFORMANCE_ARGS}}


def _open_or_create(job: JobSpec, schema: Schema, identity: dict, provenance: dict, new_store: bool):
    if new_store or not store_io.exists(job.store, job.storage_options):
        group = store_io.create(job.store, schema, identity, provenance, job.storage_options, overwrite=new_store)
        return group, set()
    attrs = store_io.read_header(job.store, job.storage_options)
    diff = store_io.identity_differences(attrs["identity"], identity)
    if diff:
        raise store_io.StoreError(f"{job.store} was written by a different job and cannot be resumed: "
                                  + "; ".join(diff[:6]) + ". Use another store path, or --new-store to replace it.")
    if attrs.get("status") == "creating":
        raise store_io.StoreError(f"{job.store} was interrupted while being created; use --new-store to replace it")
    group = store_io.open_group(job.store, "r+", job.storage_options)
    group.attrs.update({"status": "writing"})
    return group, store_io.done_cells(group, Schema.from_json(attrs["schema"]))


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"distattr: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- actors


class _Pool:
    """Actors, the tasks in flight on each, and replacement of dead actors."""

    def __init__(self, job: JobSpec, resources: Resources):
        import ray

        self.job, self.resources = job, resources
        gpus = resources.num_gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.options = {"num_cpus": resources.num_cpus, "num_gpus": gpus, "max_restarts": 0}
        self.remote = ray.remote(Attributor)
        self.next_rank = 0
        self.actors = [self._start() for _ in range(resources.actors)]

    def _start(self):
        actor = self.remote.options(**self.options).remote(self.job, self.next_rank, self.resources.num_cpus)
        self.next_rank += 1
        return actor

    def probe(self, record):
        import ray

        return ray.get(self.actors[0].probe.remote(record))

    def drain(self, work: _Work, info: Survey, progress: bool) -> Summary:
        """Run every task; returns the counts (the caller fills in the store, times and completeness)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        pending = iter(work)
        queue: deque[Task | _Generate] = deque()  # retries and split parts go first
        flying: dict = {}  # ObjectRef -> (Task | _Generate, actor)
        load = {id(a): 0 for a in self.actors}
        attempts: dict[tuple[int, int], int] = {}
        failures: list[tuple[int, int, str]] = []
        bar = _Progress(info.count, progress)
        steps = retried = 0

        def key(item: Task | _Generate) -> tuple[int, int]:
            return (item.unit.id, item.part if isinstance(item, Task) else item.parts[0])

        def refill() -> None:
            for actor in list(self.actors):
                while load[id(actor)] < self.resources.in_flight:
                    item = queue.popleft() if queue else next(pending, None)
                    if item is None:
                        return
                    if isinstance(item, _Generate):
                        ref = actor.generate.remote(item.unit.records)
                    else:
                        ref = actor.run.remote(item)
                    flying[ref] = (item, actor)
                    load[id(actor)] += 1

        def lost(dead) -> None:
            """Replace a dead actor and requeue everything that was queued on it."""
            nonlocal retried
            if id(dead) in load:
                self.actors.remove(dead)
                del load[id(dead)]
                fresh = self._start()
                self.actors.append(fresh)
                load[id(fresh)] = 0
                bar.note(f"an actor died; its work goes to a new actor (rank {self.next_rank - 1})")
            for ref, (item, actor) in list(flying.items()):
                if actor is dead:
                    del flying[ref]
                    requeue(item)

        def requeue(item: Task | _Generate) -> None:
            nonlocal retried
            attempts[key(item)] = attempts.get(key(item), 0) + 1
            if attempts[key(item)] > self.resources.max_retries:
                failures.append((*key(item), f"its actor died {attempts[key(item)]} times; giving up"))
                return
            retried += 1
            queue.appendleft(item)

        refill()
        while flying:
            (ref,), _ = ray.wait(list(flying), num_returns=1)
            item, actor = flying.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError:
                requeue(item)
                lost(actor)
                refill()
                continue
            except RayTaskError as err:  # the work itself failed (bad input, a bug): record it, go on
                load[id(actor)] -= 1
                failures.append((*key(item), _first_error_line(err)))
                bar.note(f"unit {key(item)[0]} part {key(item)[1]} failed: {_first_error_line(err)}")
                refill()
                continue
            load[id(actor)] -= 1
            if isinstance(item, _Generate):
                ids = tuple(result[0])
                queue.extendleft(Task(unit=item.unit, part=p, target_ids=ids) for p in reversed(item.parts))
            elif isinstance(result, Report):
                steps += result.steps
                bar.advance(result.examples, result.steps)
            refill()
        bar.close()
        return Summary(store="", examples=info.count, units=info.n_units, skipped_units=0, steps=steps,
                       retried=retried, failures=tuple(failures))

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def _first_error_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


class _Progress:
    """Examples and tokens per second, ETA: a rich bar on a terminal, else a log line every 15 s."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.examples = self.steps = 0
        self.started = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("attributing"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("examples  {task.fields[rate]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("", total=total, rate="")
            self.bar.start()

    def advance(self, examples: int, steps: int) -> None:
        self.examples += examples
        self.steps += steps
        now = time.perf_counter()
        elapsed = max(now - self.started, 1e-9)
        rate = f"{self.examples / elapsed:.2f} ex/s, {self.steps / elapsed:.1f} tok/s"
        if self.bar is not None:
            self.bar.update(self.task, advance=examples, rate=rate)
        elif self.enabled and (now - self.last >= 15 or self.examples >= self.total):
            self.last = now
            left = (self.total - self.examples) / max(self.examples / elapsed, 1e-9)
            print(f"distattr: {self.examples}/{self.total} examples, {rate}, ETA {left:.0f} s", file=sys.stderr,
                  flush=True)

    def note(self, message: str) -> None:
        if self.enabled:
            (self.bar.console.print if self.bar is not None else lambda m: print(m, file=sys.stderr))(
                f"distattr: {message}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
