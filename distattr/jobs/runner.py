"""The driver of a dataset job: survey the data, create (or resume) the store, run the units on Ray actors.

Reading top to bottom: :func:`run_job` surveys the data (validation, fingerprint, bounds, per-unit digests),
connects to Ray, asks the actors' :class:`~distattr.jobs.pool.Pool` for a live replica to probe the store's
shape, creates or checks the store and takes its lease, then streams units through the pool (the driver never
holds results: actors write them; every dispatched unit is checked against the survey first) and marks the
store complete when every unit is done. What happens when actors or nodes are lost is the pool's business.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

from ..models.loading import context_length
from ..store import io as store_io
from ..store import lease as store_lease
from ..store.layout import Schema
from ..viz.progress import Progress
from .actor import JobSpec, Report, Task
from .data import Fields, Rows, records
from .plan import Survey, checked_units, plan_units, sizer, survey
from .pool import Generate, JobStalled, JobStopped, Pool, Resources

LEASE_REFRESH_S = 30.0  # seconds between two heartbeats of the store's lease

__all__ = ["JobStalled", "JobStopped", "Resources", "Summary", "connect", "run_job"]


@dataclass(frozen=True)
class Summary:
    """The end of a job."""

    store: str
    examples: int
    units: int
    skipped_units: int  # already done in the store (resumed job)
    steps: int  # attributed target tokens written by this run
    retried: int  # tasks handed back to the queue after their actor was lost or retired, or they failed
    failures: tuple[tuple[int, int, str], ...] = field(default_factory=tuple)  # (unit, part, error): given up
    failed_examples: tuple[tuple[int, str, str], ...] = field(default_factory=tuple)  # (index, id, message)
    lost_actors: int = 0
    storage_retries: int = 0  # transient store errors retried
    wall_s: float = 0.0
    complete: bool = False

    def lines(self) -> list[str]:
        rate = self.steps / self.wall_s if self.wall_s else 0.0
        state = "complete" if self.complete else "INCOMPLETE"
        if self.failed_examples:
            state += f", {len(self.failed_examples)} examples failed"
        out = [f"store: {self.store} ({state})",
               f"examples: {self.examples} in {self.units} units ({self.skipped_units} already done)",
               f"attributed tokens: {self.steps} in {self.wall_s:.1f} s ({rate:.1f} tokens/s)",
               f"actors lost: {self.lost_actors}; tasks requeued: {self.retried}; storage retries: "
               f"{self.storage_retries}",
               f"failed units: {len(self.failures)}"]
        out += [f"  unit {u} part {p}: {msg}" for u, p, msg in self.failures[:20]]
        if self.failed_examples:
            out.append(f"failed examples: {len(self.failed_examples)}")
            out += [f"  example {i} ({example_id!r}): {msg}" for i, example_id, msg in self.failed_examples[:20]]
            if len(self.failed_examples) > 20:
                out.append(f"  ... and {len(self.failed_examples) - 20} more (Store.failures lists them all)")
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


def run_job(job: JobSpec, data, fields: Fields, resources: Resources | None = None, *, address: str | None = None,
            new_store: bool = False, progress: bool = True) -> Summary:
    """Attribute every example of ``data`` into the store ``job.store`` (see :func:`distattr.attribute_dataset`).

    Raises :class:`JobStopped` (:class:`JobStalled`) when the job cannot go on; the store stays resumable."""
    started = time.perf_counter()
    resources = resources or Resources()
    rows = data if isinstance(data, Rows) else Rows(data)
    _check_store_path(job)
    store_lease.check_free(job.store, job.storage_options)  # before a long survey: a live job holds it
    tokenizer, config = _tokenizer(job)
    add_special = not job.options.skip_special_tokens
    max_new = job.options.generation_args.get("max_new_tokens")
    size = sizer(tokenizer, bool(config.is_encoder_decoder), add_special, max_new, context_length(config))
    info = survey(records(rows, fields), size, job.plan)
    say = (lambda message: _say(progress, message))
    say(f"{info.count} examples in {info.n_units} units ({info.n_split} split by steps); "
        f"fingerprint {info.fingerprint[:12]}")

    connect(address, num_cpus=max(resources.actors * resources.num_cpus, 1))
    bar = Progress("attributing", info.count, "ex", leave=True, enabled=progress)
    heartbeat = _Heartbeat()
    pool = Pool(job, resources, say=lambda message: bar.write(f"distattr: {message}"),
                tick=lambda: (heartbeat(), bar.set_status(pool.state())))
    lease = None
    try:
        probe = pool.call_live("probe", next(records(rows, fields)))
        schema = _schema(info, probe, job)
        identity = _identity(job, fields, info, probe)
        group, done = _open_or_create(job, schema, identity, _provenance(job, probe), new_store, info)
        lease = store_lease.acquire(job.store, job.storage_options)
        if lease.took_over:
            say(f"took over the store's lease from a driver that stopped ({lease.took_over})")
        heartbeat.lease = lease
        work = _Work(checked_units(plan_units(records(rows, fields), size, job.plan), info), done)
        counts = pool.drain(work, done=lambda key: bool(group["done"][key]),
                            on_report=lambda report: _show_report(bar, report), on_targets=_part_tasks)
        bar.close()
        failed = tuple(store_io.failures(group, schema))
        complete = not counts.failures and bool(store_io.done_units(group, schema).all())
        summary = Summary(store=job.store, examples=info.count, units=info.n_units, skipped_units=work.skipped,
                          steps=counts.steps, retried=counts.requeued, failures=tuple(counts.failures),
                          failed_examples=failed, lost_actors=counts.lost, storage_retries=counts.storage_retries,
                          wall_s=time.perf_counter() - started, complete=complete)
        attrs = group.attrs.asdict()
        provenance = {**attrs["provenance"], "finished": store_io.now_utc(), "summary": asdict(summary)}
        group.attrs.update({"status": "complete" if complete else "writing", "provenance": provenance})
        return summary
    finally:
        bar.close()
        pool.shutdown()
        if lease is not None:
            lease.release()


def _check_store_path(job: JobSpec) -> None:
    """Anything at the store path must be a distattr store, even with ``new_store``: never delete other data. A
    relative path under ``ray job submit`` would live in the job's working directory, which Ray deletes."""
    url = job.store
    if "://" not in url and not os.path.isabs(os.path.expanduser(url)) and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        raise ValueError(f"--store {url} is relative to the job's working directory, which Ray deletes when the job "
                         "ends: give an absolute path that every node reaches, or a URL such as s3://bucket/run.zarr")
    if store_io.exists(url, job.storage_options):
        store_io.read_header(url, job.storage_options)  # raises when it is not a distattr store


def _tokenizer(job: JobSpec):
    """The tokenizer and config of the job's model (the survey sizes examples with them)."""
    from transformers import AutoConfig, AutoTokenizer

    from ..models.loading import resolve_folder

    if not isinstance(job.model, str):
        raise TypeError("attribute_dataset needs the model as a name or path (each actor loads its own replica)")
    folder, _ = resolve_folder(job.model)
    revision = job.load_args.get("revision")
    config = AutoConfig.from_pretrained(folder, revision=revision)
    return AutoTokenizer.from_pretrained(folder, revision=revision), config


class _Heartbeat:
    """Refreshes the store's lease every :data:`LEASE_REFRESH_S` seconds (called on every tick of the pool)."""

    def __init__(self):
        self.lease = None
        self.last = time.monotonic()

    def __call__(self) -> None:
        if self.lease is not None and time.monotonic() - self.last >= LEASE_REFRESH_S:
            self.lease.refresh()
            self.last = time.monotonic()


class _Work:
    """The tasks still to do, streamed from the plan (units already done in the store are skipped)."""

    def __init__(self, units, done: set[tuple[int, int]]):
        self.units, self.done = units, done
        self.skipped = 0

    def __iter__(self) -> Iterator[Task | Generate]:
        for unit in self.units:
            parts = tuple(p for p in range(unit.n_parts) if (unit.id, p) not in self.done)
            if not parts:
                self.skipped += 1
            elif unit.n_parts == 1:
                yield Task(unit=unit)
            else:
                yield Generate(unit=unit, parts=parts)


def _part_tasks(item: Generate, target_ids: list[int] | None) -> list[Task]:
    """The parts of a split unit, once its target is known (None: its generation failed, stored as such)."""
    if target_ids is None:
        return []
    return [Task(unit=item.unit, part=p, target_ids=tuple(target_ids)) for p in item.parts]


def _schema(info: Survey, probe: dict, job: JobSpec) -> Schema:
    steps_chunk = min(info.max_steps, job.plan.split_steps or info.max_steps)
    return Schema(n_units=info.n_units, unit_size=job.plan.unit_size, max_source=info.max_source,
                  max_target=info.max_target, max_steps=info.max_steps, steps_chunk=steps_chunk,
                  source_attributions=probe["source_attributions"], target_attributions=probe["target_attributions"],
                  dims=tuple(probe["dims"]), dim_sizes=tuple(probe["dim_sizes"]),
                  dim_labels=tuple(tuple(x) for x in probe["dim_labels"]),
                  step_scores=tuple(job.options.step_scores), deltas=probe["deltas"])


def _identity(job: JobSpec, fields: Fields, info: Survey, probe: dict) -> dict:
    """Everything the stored values depend on; a store is only resumed by a job with the same identity."""
    from ..models.identity import model_identity

    load_args = {k: v for k, v in job.load_args.items() if k not in ("device", "device_map", "max_memory")}
    if "model_kwargs" in load_args:  # where offloaded weights live does not change the values
        load_args["model_kwargs"] = {k: v for k, v in load_args["model_kwargs"].items() if k != "offload_folder"}
    return {"model": job.model, "model_class": probe["model"]["model_class"],
            "model_config_hash": probe["model"]["model_config_hash"],
            "model_files": model_identity(job.model, job.load_args.get("revision")), "load_args": load_args,
            **job.options.identity(),
            "fields": asdict(fields), "dataset_fingerprint": info.fingerprint, "n_examples": info.count,
            "plan": asdict(job.plan)}


def _provenance(job: JobSpec, probe: dict) -> dict:
    """How the store was made: the model as loaded, versions, time, performance arguments and the command line with
    its credentials redacted (see :func:`~distattr.cli.dataset.redact_command`); storage options, data options and
    the environment are never written."""
    from ..api import versions
    from ..redaction import redact_command

    return {"model": probe["model"], "versions": versions(), "created": store_io.now_utc(),
            "command": redact_command(sys.argv), "performance_args": job.options.speed()}


def _open_or_create(job: JobSpec, schema: Schema, identity: dict, provenance: dict, new_store: bool, info: Survey):
    if new_store or not store_io.exists(job.store, job.storage_options):
        group = store_io.create(job.store, schema, identity, provenance, job.storage_options, overwrite=new_store,
                                unit_parts=info.unit_parts)
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


def _show_report(bar: Progress, report: Report) -> None:
    """A finished task on the driver's progress (examples done, attributed tokens per second), its failed
    examples as lines; the actors' state is the progress's status (:meth:`Pool.state`, every tick)."""
    for index, example_id, message in report.failed:
        bar.write(f"distattr: example {index} ({example_id!r}) failed: {message}")
    bar(report.examples, report.steps)
