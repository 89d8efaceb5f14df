"""The model replica of a dataset job: a plain class that Ray runs as an actor (one per GPU or CPU slot).

It loads the model once, then attributes work units and writes each straight into the store; the driver only
gets a small :class:`Report` back. One bad example never fails its unit: a batch that raises is retried one
example at a time, and an example that still fails (or whose scores are not finite) is stored as failed with
its message. A model client that stops answering (a Petals swarm) is rebuilt up to :data:`REBUILDS` times;
after that the task raises :class:`ReplicaError` and the driver retires this replica.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..engine import encode_text, generate_targets, resolve_positions
from ..options import AttributeOptions
from ..results import SequenceAttribution
from ..store.faults import RetryCount
from ..store.io import (
    SlotFailure,
    SlotResult,
    open_group,
    stored_targets,
    write_part,
    write_part_failure,
    write_targets,
)
from ..store.layout import Schema
from .data import Record
from .plan import PlanConfig, Unit

REBUILDS = 2  # new model clients (e.g. Petals client processes) an actor tries before it gives up


class ReplicaError(RuntimeError):
    """This replica's model cannot compute any more (its client was rebuilt and still fails): retire it."""


@dataclass(frozen=True)
class JobSpec:
    """What every actor needs: how to load the model, how to attribute, and where the store is."""

    model: str
    store: str
    options: AttributeOptions = AttributeOptions()
    load_args: dict = field(default_factory=dict)  # load_model keywords: dtype, revision, quantization...
    storage_options: dict | None = None
    plan: PlanConfig = PlanConfig()
    threads: int | None = None  # torch intra-op threads per actor (None: the actor's CPU share)
    log_dir: str | None = None  # also append each actor's log to LOG_DIR/actor-<rank>.log
    plugins: tuple[str, ...] = ()  # modules imported by each actor before it loads the model
    extensions: bytes = b""  # custom methods and step functions, cloudpickled (see distattr.jobs.extensions)

    @property
    def method(self) -> str:
        return self.options.method


@dataclass(frozen=True)
class Task:
    """A unit, or one part of a split unit with its example's target ids (generated once, beforehand)."""

    unit: Unit
    part: int = 0
    target_ids: tuple[int, ...] | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.unit.id, self.part)


@dataclass(frozen=True)
class Report:
    """What a finished task tells the driver."""

    unit: int
    part: int
    examples: int
    steps: int
    seconds: float
    rank: int
    pid: int
    storage_retries: int = 0  # transient store errors retried while writing
    failed: tuple[tuple[int, str, str], ...] = ()  # (example index, id, message) of examples stored as failed


class Attributor:
    """One model replica. Ray wraps it: ``ray.remote(Attributor).options(num_cpus=..., num_gpus=...)``."""

    def __init__(self, job: JobSpec, rank: int, num_cpus: float = 1.0):
        import torch

        self.job, self.rank = job, rank
        torch.set_num_threads(job.threads or max(1, int(num_cpus)))
        self.log = _logger(rank, job.log_dir)
        self.model = None  # loaded by ready(): a placed actor answers ping() at once, however long loading takes
        self._group = None
        self._schema: Schema | None = None

    def _load(self) -> None:
        """Load (or reload, with a new client) the model."""
        from ..api import load_model

        load_args = dict(self.job.load_args)
        if _gpu_ids() and "device" not in load_args and "device_map" not in load_args:
            load_args["device"] = "cuda"
        started = time.perf_counter()
        old = getattr(self, "model", None)
        if old is not None:  # stop the old model's remote client processes (Petals) before starting new ones
            for module in old.model.modules():
                client = getattr(module, "client", None)
                if callable(getattr(client, "close", None)):
                    client.close()
        self._register_methods()
        self.model = load_model(self.job.model, self.job.method, method_args=self.job.options.method_args,
                                **load_args)
        self.token_budget = self.job.options.token_budget
        if self.token_budget is None:  # the planner sizes the row batches from this replica's device memory
            from ..planner import token_budget_for

            self.token_budget = token_budget_for(self.model.model)
        self.log.info("actor %d (pid %d) loaded %s in %.1f s; %d tokens per batch", self.rank, os.getpid(),
                      self.job.model, time.perf_counter() - started, self.token_budget)

    def _register_methods(self) -> None:
        """The job's plugins and custom methods and step functions, known here before the model loads."""
        import cloudpickle

        from .. import methods, steps

        methods.load_plugins(self.job.plugins)
        if not self.job.extensions:
            return
        found = cloudpickle.loads(self.job.extensions)
        for name, entry in found["methods"].items():
            methods.register_method(name, entry.run, entry.args, kind=entry.kind, summary=entry.summary,
                                    cost=entry.cost, remote=entry.remote, replace=True)
        for name, entry in found["steps"].items():
            steps.register_step_function(entry.fn, name, merge=entry.merge, contrastive=entry.contrastive,
                                         overwrite=True)

    def ping(self) -> int:
        """Answers as soon as Ray has placed this actor (before its model is loaded): its pid."""
        return os.getpid()

    def ready(self) -> dict:
        """Load the model (the first time) and say where this replica runs."""
        if self.model is None:
            self._load()
        return {"host": socket.gethostname(), "pid": os.getpid(), "rank": self.rank}

    def probe(self, record: Record) -> dict:
        """Attribute a short piece of one example to learn the store's shape: extra dims, source matrices,
        deltas; plus the model's description."""
        from ..models.loading import describe

        options = self.job.options
        if record.target is not None:
            target = record.target
        else:  # two generated tokens are enough to learn the shapes; an empty generation gets one filler token
            short = dataclasses.replace(options, generation_args={"max_new_tokens": 2})
            (target,) = generate_targets(self.model.loaded, [record.text], short)
            if len(target) <= self._first_step(record):
                filler = self.model.tokenizer.unk_token_id
                target = [*target, filler if filler is not None else self.model.tokenizer.eos_token_id]
        probe = dataclasses.replace(options, generation_args={}, attr_pos_start=None, attr_pos_end=None)
        out = self.model.attribute([record.text], [target], show_progress=False, options=probe,
                                   contrast_targets=[record.contrast] if record.contrast else None)
        seq = out.sequences[0]
        return {"dims": list(seq.dims), "dim_labels": [list(x) for x in seq.dim_labels],
                "dim_sizes": list(seq.target_attributions.shape[2:] if seq.target_attributions is not None
                                  else seq.source_attributions.shape[2:]),
                "source_attributions": seq.source_attributions is not None,
                "target_attributions": seq.target_attributions is not None,
                "deltas": seq.deltas is not None, "model": describe(self.model.loaded)}

    def generate(self, records: Sequence[Record]) -> list[list[int]]:
        """The target ids of ``records`` (generated with the job's generation arguments)."""
        return generate_targets(self.model.loaded, [r.text for r in records], self.job.options)

    def generate_unit(self, unit: Unit) -> list[int] | None:
        """The target ids of a split unit's example: read back from the store when an earlier run generated them
        (so a resumed job attributes the same generation, even when sampling), else generated here once and
        stored before any part runs. None: generation failed and the example is stored as failed."""
        return self._with_rebuilds(self._generate_unit, unit)

    def run(self, task: Task) -> Report:
        """Attribute a unit (or one part of a split unit), write it to the store, mark it done."""
        return self._with_rebuilds(self._run, task)

    # ------------------------------------------------------------ internals

    def _with_rebuilds(self, fn: Callable, arg):
        """``fn(arg)``, rebuilding the model's client when it stops answering (at most :data:`REBUILDS` times)."""
        for attempt in range(REBUILDS + 1):
            try:
                return fn(arg)
            except Exception as err:
                if not _replica_fault(err):
                    raise
                if attempt == REBUILDS:
                    raise ReplicaError(f"the model failed {attempt + 1} times, with a new client each time: "
                                       f"{_one_line(err)}") from None
                self.log.warning("actor %d: the model stopped answering (%s); rebuilding it (%d of %d)", self.rank,
                                 _one_line(err), attempt + 1, REBUILDS)
                self._load()
        raise AssertionError("unreachable")

    def _generate_unit(self, unit: Unit) -> list[int] | None:
        group, schema = self._store()
        stored = stored_targets(group, schema, unit.id)
        if stored is not None:
            return stored
        (record,) = unit.records
        counter = RetryCount()
        failures: dict[int, str] = {}
        generated = _each_alone([0], lambda js: self.generate([record]), failures)
        if failures:
            failure = self._failure(0, record, failures[0])
            write_part(group, schema, unit.id, 0, unit.n_parts, [], failures=[failure], counter=counter)
            for part in range(1, unit.n_parts):
                write_part_failure(group, schema, unit.id, part, failures[0], counter=counter)
            self.log.info("unit %d: generation failed (%s)", unit.id, failures[0])
            return None
        ids = list(generated[0])
        seq = self._empty_sequence(record, ids)
        write_targets(group, schema, unit.id, SlotResult(
            slot=0, index=record.index, example_id=record.id, meta=_meta(record, self._decode(ids)), seq=seq,
            attr_pos=self._attr_range(record, ids), column=0), counter=counter)
        return ids

    def _run(self, task: Task) -> Report:
        started = time.perf_counter()
        group, schema = self._store()
        unit, counter = task.unit, RetryCount()
        self.log.info("start unit %d part %d/%d", unit.id, task.part, unit.n_parts)
        if unit.n_parts == 1:
            results, failures = self._whole(unit)
            write_part(group, schema, unit.id, 0, 1, results, failures=failures, counter=counter)
        else:
            try:
                results = self._part(unit, task.part, list(task.target_ids or ()), schema.steps_chunk)
                failures = []
            except Exception as err:
                if _replica_fault(err):
                    raise
                (record,) = unit.records
                failures = [self._failure(0, record, _one_line(err))]
                results = []
            if failures and task.part > 0:  # later parts never write the example's slot arrays
                write_part_failure(group, schema, unit.id, task.part, failures[0].error, counter=counter)
            else:
                write_part(group, schema, unit.id, task.part, unit.n_parts, results, failures=failures,
                           counter=counter)
        steps = sum(r.seq.attr_pos_end - r.seq.attr_pos_start for r in results)
        seconds = time.perf_counter() - started
        examples = len(unit.records) if task.part == 0 else 0
        self.log.info("unit %d part %d/%d: %d examples (%d failed), %d steps in %.2f s", unit.id, task.part,
                      unit.n_parts, examples, len(failures), steps, seconds)
        return Report(unit=unit.id, part=task.part, examples=examples, steps=steps, seconds=seconds, rank=self.rank,
                      pid=os.getpid(), storage_retries=counter.retries,
                      failed=tuple((f.index, f.example_id, f.error) for f in failures))

    def _store(self):
        if self._group is None:
            self._group = open_group(self.job.store, "r+", self.job.storage_options)
            self._schema = Schema.from_json(self._group.attrs["schema"])
        return self._group, self._schema

    def _attribute(self, records: Sequence[Record], targets, **extra):
        options = dataclasses.replace(self.job.options, token_budget=self.token_budget, **extra)
        contrasts = [r.contrast for r in records] if records[0].contrast is not None else None
        return self.model.attribute([r.text for r in records], targets, contrast_targets=contrasts,
                                    show_progress=False, options=options)

    def _whole(self, unit: Unit) -> tuple[list[SlotResult], list[SlotFailure]]:
        """Attribute a unit's examples together. Targets are generated first, so that an example whose
        generation is empty is stored as such (no steps). When the batch raises, each example runs alone, so that
        only the examples at fault are stored as failed."""
        records = unit.records
        errors: dict[int, str] = {}
        every = list(range(len(records)))
        if records[0].target is not None:
            targets = {j: records[j].target for j in every}
        else:
            targets = _each_alone(every, lambda js: self.generate([records[j] for j in js]), errors)
        empty = {j for j, t in targets.items() if not isinstance(t, str) and len(t) <= self._first_step(records[j])}
        todo = [j for j in targets if j not in empty]

        def attribute(js: list[int]) -> list:
            out = self._attribute([records[j] for j in js], [targets[j] for j in js])
            return list(zip(out.sequences, out.info["generated_texts"], strict=True))

        done = _each_alone(todo, attribute, errors)
        for j, (seq, _) in list(done.items()):
            problem = _non_finite(seq)
            if problem:
                errors[j] = problem
                del done[j]
        for j in empty:
            done[j] = (self._empty_sequence(records[j], targets[j]), self._decode(targets[j]))
        results = [SlotResult(slot=j, index=records[j].index, example_id=records[j].id,
                              meta=_meta(records[j], text), seq=seq, attr_pos=(seq.attr_pos_start, seq.attr_pos_end),
                              column=0) for j, (seq, text) in sorted(done.items())]
        failures = [self._failure(j, records[j], errors[j]) for j in sorted(errors)]
        return results, failures

    def _part(self, unit: Unit, part: int, target_ids: list[int], width: int) -> list[SlotResult]:
        """Attribute steps ``[part * width, (part + 1) * width)`` of a split unit's one example."""
        (record,) = unit.records
        if len(target_ids) <= self._first_step(record):  # nothing generated: part 0 records the empty example
            if part > 0:
                return []
            seq = self._empty_sequence(record, target_ids)
            return [SlotResult(slot=0, index=record.index, example_id=record.id,
                               meta=_meta(record, self._decode(target_ids)), seq=seq,
                               attr_pos=(seq.attr_pos_start, seq.attr_pos_end), column=0)]
        first, last = self._attr_range(record, target_ids)
        start = first + part * width
        if start >= last:  # the generation stopped before this part's steps: nothing to write
            return []
        out = self._attribute(unit.records, [target_ids], attr_pos_start=start, attr_pos_end=min(start + width, last))
        seq = out.sequences[0]
        problem = _non_finite(seq)
        if problem:
            raise ValueError(problem)
        return [SlotResult(slot=0, index=record.index, example_id=record.id,
                           meta=_meta(record, out.info["generated_texts"][0]), seq=seq, attr_pos=(first, last),
                           column=part * width)]

    def _attr_range(self, record: Record, target_ids: list[int]) -> tuple[int, int]:
        """The example's whole attributed range of target positions (empty for an empty generation)."""
        first = self._first_step(record)
        if len(target_ids) <= first:
            return first, first
        options = self.job.options
        return resolve_positions(options.attr_pos_start, options.attr_pos_end, len(target_ids), first)

    def _failure(self, slot: int, record: Record, error: str) -> SlotFailure:
        return SlotFailure(slot=slot, index=record.index, example_id=record.id, meta=_meta(record, ""), error=error)

    def _decode(self, ids) -> str:
        return self.model.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _source_ids(self, record: Record) -> list[int]:
        add_special = not self.job.options.skip_special_tokens
        return encode_text(self.model.tokenizer, record.text, add_special)

    def _first_step(self, record: Record) -> int:
        """The first target position that can be attributed (the prompt length for decoder-only models)."""
        return 1 if self.model.is_encoder_decoder else len(self._source_ids(record))

    def _empty_sequence(self, record: Record, target_ids: list[int]) -> SequenceAttribution:
        """An example with nothing generated (or not attributed yet): its tokens, no attributed steps."""
        tokenizer = self.model.tokenizer
        source_ids = self._source_ids(record)
        start = self._first_step(record)
        return SequenceAttribution(
            source_tokens=tuple(tokenizer.convert_ids_to_tokens(source_ids)),
            target_tokens=tuple(tokenizer.convert_ids_to_tokens(list(target_ids))), source_ids=tuple(source_ids),
            target_ids=tuple(target_ids), source_attributions=None, target_attributions=None, step_scores={},
            attr_pos_start=start, attr_pos_end=start)


def _each_alone(items: list[int], fn: Callable[[list[int]], list], errors: dict[int, str]) -> dict[int, object]:
    """``fn`` over every item at once; if that raises, over each item alone, so that one bad example fails only
    itself (its message goes to ``errors``). A fault of the replica itself is raised, never blamed on an example."""
    if not items:
        return {}
    try:
        return dict(zip(items, fn(items), strict=True))
    except Exception as err:
        if _replica_fault(err):
            raise
        if len(items) == 1:
            errors[items[0]] = _one_line(err)
            return {}
    out = {}
    for j in items:
        try:
            (out[j],) = fn([j])
        except Exception as err:
            if _replica_fault(err):
                raise
            errors[j] = _one_line(err)
    return out


def _non_finite(seq: SequenceAttribution) -> str | None:
    """A message when the attributed region of ``seq`` holds NaN or inf (target matrices are NaN by design
    above the diagonal: position ``i`` explains step ``c`` only for ``i < attr_pos_start + c``)."""
    steps = seq.attr_pos_end - seq.attr_pos_start
    arrays = {"step score " + k: np.asarray(v, dtype=np.float64) for k, v in seq.step_scores.items()}
    if seq.source_attributions is not None:
        arrays["source attributions"] = np.asarray(seq.source_attributions, dtype=np.float64)
    if seq.target_attributions is not None:
        matrix = np.asarray(seq.target_attributions, dtype=np.float64)
        rows = np.arange(matrix.shape[0])[:, None] < (seq.attr_pos_start + np.arange(steps))[None, :]
        arrays["target attributions"] = matrix[rows]
    if seq.deltas is not None:
        arrays["deltas"] = np.asarray(seq.deltas, dtype=np.float64)
    bad = {name: int((~np.isfinite(a)).sum()) for name, a in arrays.items()}
    bad = {name: n for name, n in bad.items() if n}
    if not bad:
        return None
    return "non-finite scores (" + ", ".join(f"{n} in the {name}" for name, n in bad.items()) + ")"


def _replica_fault(err: BaseException) -> bool:
    """Whether ``err`` means this replica's model cannot answer (a Petals client or swarm that stopped
    answering), not that an example is bad."""
    from ..models.petals import is_unavailable

    return is_unavailable(err)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _meta(record: Record, generated_text: str) -> dict:
    meta = {"text": record.text, "generated_text": generated_text}
    if record.target is not None:
        meta["target"] = record.target
    if record.contrast is not None:
        meta["contrast"] = record.contrast
    return {**meta, **dict(record.meta)}


def _gpu_ids() -> list:
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # not inside a Ray worker
        return []


def _logger(rank: int, log_dir: str | None) -> logging.Logger:
    log = logging.getLogger(f"distattr.actor.{rank}")
    log.setLevel(logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler()  # Ray keeps each actor's stderr in its own log file and echoes it
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            file = logging.FileHandler(os.path.join(log_dir, f"actor-{rank}.log"))
            file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(file)
    return log
