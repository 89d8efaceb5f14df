"""Dataset-wide attribution on Ray actors, streamed into a Zarr store (:func:`attribute_dataset`)."""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Iterator, Sequence

from .. import methods, steps
from ..models.loading import portable_load_args
from ..options import AttributeOptions
from .actor import JobSpec
from .data import DataError, Fields, Rows
from .plan import PlanConfig
from .pool import JobStalled, JobStopped, Resources
from .runner import Summary, run_job


def attribute_dataset(
    model: str,
    data,
    store: str,
    method: str | None = None,
    *,
    max_new_tokens: int | None = None,
    text_field: str = "prompt",
    target_field: str | None = None,
    contrast_field: str | None = None,
    id_field: str | None = None,
    keep_fields: Sequence[str] = (),
    split: str | None = None,
    data_options: dict | None = None,
    actors: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float | None = None,
    address: str | None = None,
    new_store: bool = False,
    unit_size: int = 16,
    split_steps: int | None = 64,
    storage_options: dict | None = None,
    load_args: dict | None = None,
    method_args: dict | None = None,
    options: AttributeOptions | None = None,
    plugins: Sequence[str] = (),
    max_retries: int = 3,
    stall_timeout: float = 600.0,
    log_dir: str | None = None,
    show_progress: bool = True,
    **kwargs,
) -> Summary:
    """Attribute every example of a dataset on Ray actors; results stream into a Zarr store.

    Args:
        model: a model name or path each actor loads (``"smollm2-135m"``, a folder, a hub id).
        data: a JSONL/JSON/CSV/Parquet file, a saved ``datasets`` folder, a ``datasets.Dataset``, a
            ``ray.data.Dataset`` or a list of dicts.
        store: the Zarr store, a local path or an fsspec URL (``s3://bucket/run.zarr`` with ``storage_options``).
            An existing store of the same job is resumed (finished units are skipped); one of another job is
            refused unless ``new_store`` replaces it.
        method: the attribution method (default: ``options.method``, else saliency); ``method_args`` its arguments.
        max_new_tokens: generation length (sizes the store); needed unless ``target_field`` is given.
        text_field / target_field / contrast_field / id_field: the row fields holding the input text, the
            target to attribute instead of generating, the contrastive target, and a unique example id
            (default: the row position). ``keep_fields`` are copied into each example's metadata.
        split: the split of a saved ``DatasetDict``; data_options: fsspec options for a ``data`` URL.
        actors / num_cpus / num_gpus: model replicas and the Ray resources of each (``num_gpus=None``: one GPU
            per actor when the cluster has GPUs, else the CPU).
        address: a Ray cluster ("auto", "host:port", "ray://..."); None: the ``ray job submit`` cluster, else a
            local one on 127.0.0.1.
        unit_size: examples per work unit (and per chunk of the store); split_steps: examples with more
            attributed steps are split into parts of this many steps that run on different actors (None: never).
        load_args: ``load_model`` keywords (``dtype``, ``revision``, ``quantization``...).
        max_retries: resubmissions of a unit whose actor was lost (or whose task failed).
        stall_timeout: seconds without any live actor (none placeable, every node lost) after which the job
            stops with :class:`JobStalled`; the store stays resumable.
        log_dir: also write each actor's log to ``log_dir/actor-<rank>.log``.
        options: an :class:`~distattr.options.AttributeOptions`; ``**kwargs`` (any of its fields:
            ``step_scores``, ``attributed_fn``, ``generation_args``, ``token_budget``...) replace its fields. The
            speed-only ones (``token_budget``, ``steps_per_row``, ``batch_size``, a method's
            ``internal_batch_size``) may change when a job resumes; the others make the store's identity.
        plugins: modules every actor imports before loading its model (they register custom methods or step
            functions, see :func:`distattr.register_method`); a method registered in this process is also sent
            to the actors.
    Returns:
        a :class:`Summary`; read the results with :func:`distattr.open_store`.
    Raises:
        JobStopped: the job cannot go on (no actor placeable for ``stall_timeout`` seconds, a store that refuses
            writes); everything written so far stays, and the same call resumes.
        DataError: ``data`` is a generator or another one-shot iterator (the job reads the data twice).
        ValueError: a ``load_args`` value has no JSON form (see :func:`~distattr.models.loading.portable_load_args`:
            a ``torch.dtype`` or a ``BitsAndBytesConfig`` as ``quantization`` is converted, other objects refused).
    """
    _check_rereadable(data)
    load_args = portable_load_args(dict(load_args or {}))
    methods.load_plugins(plugins)
    given = dict(kwargs)
    if method is not None:
        given["method"] = method
    if method_args is not None:
        given["method_args"] = dict(method_args)
    opts = AttributeOptions.from_kwargs(given, options)
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        opts = dataclasses.replace(opts, generation_args={**opts.generation_args, "max_new_tokens": max_new_tokens})
    opts.check()  # before any actor loads a model
    job = JobSpec(model=model, store=str(store), options=opts, load_args=load_args, storage_options=storage_options,
                  plan=PlanConfig(unit_size=unit_size, split_steps=split_steps), log_dir=log_dir,
                  plugins=tuple(plugins), extensions=extensions(opts))
    fields = Fields(text=text_field, target=target_field, contrast=contrast_field, id=id_field,
                    keep=tuple(keep_fields))
    resources = Resources(actors=actors, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                          stall_timeout=stall_timeout)
    rows = Rows(data, storage_options=data_options, split=split)
    return run_job(job, rows, fields, resources, address=address, new_store=new_store, progress=show_progress)


def extensions(options: AttributeOptions) -> bytes:
    """The job's method and step functions that are not built in (registered in this process by a plugin or a
    notebook), pickled for the actors, which register them before loading the model. Functions from modules outside
    an installed package (``site-packages``: a notebook, a script, a plugin file) are pickled by value, so the
    actors need not import them; the actors still import ``plugins`` by name (what else a plugin sets up).
    Unpickled in the actor's ``ready()``, so a failure is a model-loading failure (counted, reported, retried)."""
    import cloudpickle

    found = {"methods": {}, "steps": {}}
    if options.method not in methods.BUILTIN_METHODS:
        found["methods"][options.method] = methods.get_method(options.method)
    for name in (options.attributed_fn, *options.step_scores):
        if name not in steps.BUILTIN_STEP_FUNCTIONS:
            found["steps"][name] = steps.get_step_function(name)
    for entry in [*found["methods"].values(), *found["steps"].values()]:
        for fn in (getattr(entry, "run", None), getattr(entry, "fn", None), getattr(entry, "remote", None)):
            module = sys.modules.get(getattr(fn, "__module__", "") or "")
            where = str(getattr(module, "__file__", "") or "")
            if module is not None and module.__name__.partition(".")[0] != "distattr" and \
                    not any(part in where for part in ("site-packages", "dist-packages")):
                cloudpickle.register_pickle_by_value(module)
    return cloudpickle.dumps(found) if found["methods"] or found["steps"] else b""


def _check_rereadable(data) -> None:
    """Refuse data that can be read only once: the job reads it twice (a survey, then the dispatch)."""
    if isinstance(data, Iterator):
        kind = type(data).__name__
        what = "a generator" if isinstance(data, types.GeneratorType) else f"a one-shot iterator ({kind})"
        raise DataError(f"data is {what}, which can be read only once; the job reads the data twice (a survey, then "
                        "the dispatch): pass a list, a file path or URL, a datasets.Dataset or a ray.data.Dataset")


__all__ = ["DataError", "Fields", "JobStalled", "JobStopped", "PlanConfig", "Resources", "Summary",
           "attribute_dataset"]
