"""The model replica of a dataset job: a plain class that Ray runs as an actor (one per GPU or CPU slot).

It loads the model once, then attributes work units and writes each straight into the store; the driver only
gets a small :class:`Report` back.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from ..engine import AttributeConfig, encode_text, generate_targets, resolve_positions
from ..results import SequenceAttribution
from ..store.io import SlotResult, open_group, write_part
from ..store.layout import Schema
from .data import Record
from .plan import PlanConfig, Unit

# attribute() options that change only speed or memory, not the values (excluded from the store identity)
PERFORMANCE_ARGS = ("token_budget", "steps_per_row", "batch_size")


@dataclass(frozen=True)
class JobSpec:
    """What every actor needs: how to load the model, how to attribute, and where the store is."""

    model: str
    method: str
    store: str
    method_args: dict = field(default_factory=dict)
    load_args: dict = field(default_factory=dict)  # load_model keywords: dtype, revision, quantization...
    attribute_args: dict = field(default_factory=dict)  # AttributionModel.attribute keywords
    storage_options: dict | None = None
    plan: PlanConfig = PlanConfig()
    threads: int | None = None  # torch intra-op threads per actor (None: the actor's CPU share)
    log_dir: str | None = None  # also append each actor's log to LOG_DIR/actor-<rank>.log


@dataclass(frozen=True)
class Task:
    """A unit, or one part of a split unit with its example's target ids (generated once, beforehand)."""

    unit: Unit
    part: int = 0
    target_ids: tuple[int, ...] | None = None


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


class Attributor:
    """One model replica. Ray wraps it: ``ray.remote(Attributor).options(num_cpus=..., num_gpus=...)``."""

    def __init__(self, job: JobSpec, rank: int, num_cpus: float = 1.0):
        import torch

        from ..api import load_model

        self.job, self.rank = job, rank
        torch.set_num_threads(job.threads or max(1, int(num_cpus)))
        self.log = _logger(rank, job.log_dir)
        load_args = dict(job.load_args)
        if _gpu_ids() and "device" not in load_args and "device_map" not in load_args:
            load_args["device"] = "cuda"
        started = time.perf_counter()
        self.model = load_model(job.model, job.method, method_args=job.method_args, **load_args)
        self.token_budget = job.attribute_args.get("token_budget")
        if self.token_budget is None:  # the planner sizes the row batches from this replica's device memory
            from ..planner import token_budget_for

            self.token_budget = token_budget_for(self.model.model)
        self.log.info("actor %d (pid %d) loaded %s in %.1f s; %d tokens per batch", rank, os.getpid(), job.model,
                      time.perf_counter() - started, self.token_budget)
        self._group = None
        self._schema: Schema | None = None

    def pid(self) -> int:
        return os.getpid()

    def probe(self, record: Record) -> dict:
        """Attribute a short piece of one example to learn the store's shape: extra dims, source matrices,
        deltas; plus the model's description."""
        from ..models.loading import describe

        args = dict(self.job.attribute_args)
        args.pop("generation_args", None)
        if record.target is not None:
            target = record.target
        else:  # two generated tokens are enough to learn the shapes; an empty generation gets one filler token
            cfg = AttributeConfig(method=self.job.method, generation_args={"max_new_tokens": 2},
                                  skip_special_tokens=bool(args.get("skip_special_tokens", False)))
            (target,) = generate_targets(self.model.loaded, [record.text], cfg)
            if len(target) <= self._first_step(record):
                filler = self.model.tokenizer.unk_token_id
                target = [*target, filler if filler is not None else self.model.tokenizer.eos_token_id]
        args.pop("attr_pos_start", None)
        args.pop("attr_pos_end", None)
        out = self.model.attribute([record.text], [target], show_progress=False,
                                   contrast_targets=[record.contrast] if record.contrast else None, **args)
        seq = out.sequences[0]
        return {"dims": list(seq.dims), "dim_labels": [list(x) for x in seq.dim_labels],
                "dim_sizes": list(seq.target_attributions.shape[2:] if seq.target_attributions is not None
                                  else seq.source_attributions.shape[2:]),
                "source_attributions": seq.source_attributions is not None,
                "target_attributions": seq.target_attributions is not None,
                "deltas": seq.deltas is not None, "model": describe(self.model.loaded)}

    def generate(self, records: tuple[Record, ...]) -> list[list[int]]:
        """The target ids of examples attributed in parts (generated here once, so all parts agree)."""
        cfg = AttributeConfig(method=self.job.method, generation_args=dict(self.job.attribute_args.get(
            "generation_args", {}) or {}), skip_special_tokens=bool(self.job.attribute_args.get(
                "skip_special_tokens", False)))
        return generate_targets(self.model.loaded, [r.text for r in records], cfg)

    def run(self, task: Task) -> Report:
        """Attribute a unit (or one part of a split unit), write it to the store, mark it done."""
        started = time.perf_counter()
        group, schema = self._store()
        unit = task.unit
        if unit.n_parts == 1:
            results = self._whole(unit)
        else:
            results = self._part(unit, task.part, list(task.target_ids or ()), schema.steps_chunk)
        write_part(group, schema, unit.id, task.part, unit.n_parts, results)
        steps = sum(r.seq.attr_pos_end - r.seq.attr_pos_start for r in results)
        seconds = time.perf_counter() - started
        self.log.info("unit %d part %d/%d: %d examples, %d steps in %.2f s", unit.id, task.part, unit.n_parts,
                      len(unit.records) if task.part == 0 else 0, steps, seconds)
        return Report(unit=unit.id, part=task.part, examples=len(unit.records) if task.part == 0 else 0,
                      steps=steps, seconds=seconds, rank=self.rank, pid=os.getpid())

    # ------------------------------------------------------------ internals

    def _store(self):
        if self._group is None:
            self._group = open_group(self.job.store, "r+", self.job.storage_options)
            self._schema = Schema.from_json(self._group.attrs["schema"])
        return self._group, self._schema

    def _attribute(self, records: tuple[Record, ...], targets, **extra):
        args = {**self.job.attribute_args, "token_budget": self.token_budget, **extra}
        contrasts = [r.contrast for r in records] if records[0].contrast is not None else None
        return self.model.attribute([r.text for r in records], targets, contrast_targets=contrasts,
                                    show_progress=False, **args)

    def _whole(self, unit: Unit) -> list[SlotResult]:
        """Attribute a unit's examples together. Targets are generated first, so that an example whose
        generation is empty is stored as such (no steps) instead of failing the whole unit."""
        records = unit.records
        targets = [r.target for r in records] if records[0].target is not None else self.generate(records)
        empty = {j for j, (r, t) in enumerate(zip(records, targets, strict=True))
                 if not isinstance(t, str) and len(t) <= self._first_step(r)}
        keep = [j for j in range(len(records)) if j not in empty]
        sequences, generated = {}, {}
        if keep:
            out = self._attribute(tuple(records[j] for j in keep), [targets[j] for j in keep])
            sequences = dict(zip(keep, out.sequences, strict=True))
            generated = dict(zip(keep, out.info["generated_texts"], strict=True))
        for j in empty:
            sequences[j] = self._empty_sequence(records[j], targets[j])
            generated[j] = self.model.tokenizer.decode(targets[j], skip_special_tokens=True)
        return [SlotResult(slot=j, index=r.index, example_id=r.id, meta=_meta(r, generated[j]), seq=sequences[j],
                           attr_pos=(sequences[j].attr_pos_start, sequences[j].attr_pos_end), column=0)
                for j, r in enumerate(records)]

    def _part(self, unit: Unit, part: int, target_ids: list[int], width: int) -> list[SlotResult]:
        """Attribute steps ``[part * width, (part + 1) * width)`` of a split unit's one example."""
        (record,) = unit.records
        args = self.job.attribute_args
        if len(target_ids) <= self._first_step(record):  # nothing generated: part 0 records the empty example
            if part > 0:
                return []
            seq = self._empty_sequence(record, target_ids)
            text = self.model.tokenizer.decode(target_ids, skip_special_tokens=True)
            return [SlotResult(slot=0, index=record.index, example_id=record.id, meta=_meta(record, text), seq=seq,
                               attr_pos=(seq.attr_pos_start, seq.attr_pos_end), column=0)]
        first, last = resolve_positions(args.get("attr_pos_start"), args.get("attr_pos_end"), len(target_ids),
                                        self._first_step(record))
        start = first + part * width
        if start >= last:  # the generation stopped before this part's steps: nothing to write
            return []
        out = self._attribute(unit.records, [target_ids], attr_pos_start=start, attr_pos_end=min(start + width, last))
        seq = out.sequences[0]
        return [SlotResult(slot=0, index=record.index, example_id=record.id,
                           meta=_meta(record, out.info["generated_texts"][0]), seq=seq, attr_pos=(first, last),
                           column=part * width)]

    def _source_ids(self, record: Record) -> list[int]:
        add_special = not self.job.attribute_args.get("skip_special_tokens", False)
        return encode_text(self.model.tokenizer, record.text, add_special)

    def _first_step(self, record: Record) -> int:
        """The first target position that can be attributed (the prompt length for decoder-only models)."""
        return 1 if self.model.is_encoder_decoder else len(self._source_ids(record))

    def _empty_sequence(self, record: Record, target_ids: list[int]) -> SequenceAttribution:
        """An example with nothing generated: its tokens, no attributed steps."""
        tokenizer = self.model.tokenizer
        source_ids = self._source_ids(record)
        start = self._first_step(record)
        return SequenceAttribution(
            source_tokens=tuple(tokenizer.convert_ids_to_tokens(source_ids)),
            target_tokens=tuple(tokenizer.convert_ids_to_tokens(list(target_ids))), source_ids=tuple(source_ids),
            target_ids=tuple(target_ids), source_attributions=None, target_attributions=None, step_scores={},
            attr_pos_start=start, attr_pos_end=start)


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
