"""``distattr attribute-dataset``: the command line of :func:`distattr.attribute_dataset` (also run by
``launch/attribute_dataset.py`` under ``ray job submit``)."""

from __future__ import annotations

import argparse
import sys

from ..redaction import scrub, secret_values
from .common import (
    UsageError,
    add_attribution_arguments,
    add_model_arguments,
    attribution_options,
    classify_error,
    fsspec_options,
    model_options,
)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``attribute-dataset`` on the ``distattr`` subcommand parser."""
    p = sub.add_parser(
        "attribute-dataset", help="attribute a whole dataset on Ray actors into a Zarr store",
        description="Attribute every example of a dataset on Ray actors (a local Ray on 127.0.0.1, the cluster of "
                    "'ray job submit', or --address); results stream into a Zarr store. Rerunning the same command "
                    "resumes: finished units are skipped.",
    )
    add_dataset_arguments(p)
    add_attribution_arguments(p)
    add_model_arguments(p)  # quantization and device maps, applied by every actor to its replica
    p.set_defaults(func=cmd_attribute_dataset)
    return p


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="PATH|URL",
                   help="JSONL, JSON, CSV or Parquet file (a local path or an fsspec URL such as s3://bucket/d.jsonl, "
                        "streamed), or a folder saved by datasets.save_to_disk")
    p.add_argument("--split", metavar="NAME", help="the split of a saved DatasetDict (train, test, ...)")
    p.add_argument("--data-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for reading a --data URL, repeatable (e.g. anon=true); VALUE env:NAME reads "
                        "the environment variable NAME in the driver (keeps secrets off the command line)")
    p.add_argument("--text-field", default="prompt", metavar="NAME", help="field of the input text (default: prompt)")
    p.add_argument("--target-field", metavar="NAME", help="field of a target to attribute instead of generating")
    p.add_argument("--contrast-field", metavar="NAME", help="field of the contrastive target (contrast_* functions)")
    p.add_argument("--id-field", metavar="NAME", help="field of a unique example id (default: the row number)")
    p.add_argument("--keep-field", action="append", default=[], metavar="NAME",
                   help="copy this field into each example's metadata, repeatable")
    p.add_argument("--store", required=True, metavar="PATH|URL",
                   help="Zarr store: a local path or an fsspec URL such as s3://bucket/run.zarr")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option of the store, repeatable (e.g. endpoint_url=http://127.0.0.1:9000); VALUE "
                        "env:NAME reads the environment variable NAME in the driver (e.g. secret=env:AWS_SECRET)")
    p.add_argument("--new-store", action="store_true", help="replace an existing store instead of resuming it")
    p.add_argument("--actors", type=int, default=1, metavar="N", help="model replicas (default: 1)")
    p.add_argument("--num-cpus", type=float, default=1.0, metavar="N", help="CPUs per actor (default: 1)")
    p.add_argument("--num-gpus", type=float, default=None, metavar="N",
                   help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster (auto, host:port, ray://...); default: the 'ray job submit' cluster, else a "
                        "local Ray on 127.0.0.1")
    p.add_argument("--unit-size", type=int, default=16, metavar="N", help="examples per work unit (default: 16)")
    p.add_argument("--split-steps", type=int, default=64, metavar="N",
                   help="split examples with more attributed steps into parts of N steps run by different actors "
                        "(0: never; default: 64)")
    p.add_argument("--max-retries", type=int, default=3, metavar="N",
                   help="resubmissions of a unit whose actor was lost or whose task failed (default: 3)")
    p.add_argument("--stall-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="stop with an error when no actor has been alive for this long (no node can host one, "
                        "every node lost); the store stays resumable (default: 600)")
    p.add_argument("--log-dir", metavar="DIR", help="also write each actor's log to DIR/actor-<rank>.log")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress and no summary")


def cmd_attribute_dataset(args) -> int:
    from ..jobs import JobStopped, attribute_dataset

    options = attribution_options(args)
    if args.actors < 1 or args.unit_size < 1 or args.split_steps < 0 or args.max_retries < 0:
        raise UsageError("--actors and --unit-size must be at least 1; --split-steps and --max-retries at least 0")
    if args.stall_timeout <= 0:
        raise UsageError("--stall-timeout must be positive (seconds)")
    if not options.generation_args.get("max_new_tokens") and not args.target_field:
        raise UsageError("give --max-new-tokens (the store is sized from it) or --target-field")
    load_args = {k: v for k, v in model_options(args).items() if v is not None}
    data_options = fsspec_options(args.data_option, "--data-option")
    storage_options = fsspec_options(args.storage_option, "--storage-option")
    hidden = secret_values(args.data_option, data_options) | secret_values(args.storage_option, storage_options)
    try:
        summary = attribute_dataset(
            args.model, args.data, args.store, text_field=args.text_field,
            target_field=args.target_field, contrast_field=args.contrast_field, id_field=args.id_field,
            keep_fields=args.keep_field, split=args.split, data_options=data_options, actors=args.actors,
            num_cpus=args.num_cpus, num_gpus=args.num_gpus, address=args.address, new_store=args.new_store,
            unit_size=args.unit_size, split_steps=args.split_steps or None, storage_options=storage_options,
            load_args=load_args, options=options, plugins=args.plugin, max_retries=args.max_retries,
            stall_timeout=args.stall_timeout, log_dir=args.log_dir, show_progress=not args.quiet)
    except JobStopped as err:  # the job cannot go on; what it wrote stays and a rerun resumes
        print(f"distattr: error: {scrub(str(err), hidden)}", file=sys.stderr)
        return 1
    except Exception as err:  # main() reports it; but an error that quotes an option (s3fs, botocore) hides it here
        if getattr(args, "debug", False):
            raise
        status, message = classify_error(err)
        if scrub(message, hidden) == " ".join(message.split()):
            raise
        print(f"distattr: {scrub(message, hidden)}", file=sys.stderr)
        return status
    if not args.quiet:
        print(scrub("\n".join(summary.lines()), hidden, one_line=False), file=sys.stderr)
    return 0 if summary.complete else 1
