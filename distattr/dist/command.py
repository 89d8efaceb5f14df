"""``distattr attribute-dataset``: the command line of :func:`distattr.attribute_dataset` (also run by
``launch/attribute_dataset.py`` under ``ray job submit``)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence

REDACTED = "***"
ENV_PREFIX = "env:"  # --storage-option secret=env:NAME reads $NAME in the driver
# the flags whose values are fsspec options: KEY=VALUE pairs that may hold credentials
OPTION_FLAGS = ("--storage-option", "--data-option")
_SECRET_ENDINGS = ("key", "secret", "token", "password", "passwd", "pwd", "credential", "credentials", "auth", "sas",
                   "sig", "signature")
_SECRET_PARTS = ("secret", "passw", "credential")
_NOT_SECRET = frozenset({"token-budget", "token_budget"})  # distattr's own numbers, not credentials
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")
_URL_QUERY = re.compile(r"([?&]([^=&#\s]+)=)([^&#\s]*)")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``attribute-dataset`` on the ``distattr`` subcommand parser."""
    from ..cli import add_attribution_arguments, add_model_arguments

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
    from ..cli import UsageError, attribution_options, classify_error, model_options
    from . import JobStopped, attribute_dataset

    options = attribution_options(args)
    method_args = options.pop("method_args")
    if args.actors < 1 or args.unit_size < 1 or args.split_steps < 0 or args.max_retries < 0:
        raise UsageError("--actors and --unit-size must be at least 1; --split-steps and --max-retries at least 0")
    if args.stall_timeout <= 0:
        raise UsageError("--stall-timeout must be positive (seconds)")
    if not options["generation_args"].get("max_new_tokens") and not args.target_field:
        raise UsageError("give --max-new-tokens (the store is sized from it) or --target-field")
    load_args = {k: v for k, v in model_options(args).items() if v is not None}
    data_options = fsspec_options(args.data_option, "--data-option")
    storage_options = fsspec_options(args.storage_option, "--storage-option")
    hidden = secret_values(args.data_option, data_options) | secret_values(args.storage_option, storage_options)
    try:
        summary = attribute_dataset(
            args.model, args.data, args.store, args.method, text_field=args.text_field,
            target_field=args.target_field, contrast_field=args.contrast_field, id_field=args.id_field,
            keep_fields=args.keep_field, split=args.split, data_options=data_options, actors=args.actors,
            num_cpus=args.num_cpus, num_gpus=args.num_gpus, address=args.address, new_store=args.new_store,
            unit_size=args.unit_size, split_steps=args.split_steps or None, storage_options=storage_options,
            load_args=load_args, method_args=method_args, max_retries=args.max_retries,
            stall_timeout=args.stall_timeout, log_dir=args.log_dir, show_progress=not args.quiet, **options)
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


# ---------------------------------------------------------------- secrets: never printed, never stored


def fsspec_options(items: list[str] | None, flag: str) -> dict | None:
    """``--storage-option`` / ``--data-option`` pairs as fsspec options, None when there are none. A value
    ``env:NAME`` is the environment variable ``NAME`` of this process (a string, as it is), so that a secret need
    not be on the command line (which ``ray job submit`` echoes and the store's provenance records, redacted).

    Raises :class:`~distattr.cli.UsageError` (one line, exit status 2) when the variable is not set."""
    from ..cli import UsageError, parse_pairs

    options = parse_pairs(items, flag)
    for key, value in options.items():
        if isinstance(value, str) and value.startswith(ENV_PREFIX):
            name = value[len(ENV_PREFIX):]
            if not name:
                raise UsageError(f"{flag} {key}={value}: give the name of an environment variable after {ENV_PREFIX}")
            if name not in os.environ:
                raise UsageError(f"{flag} {key}={value}: the environment variable {name} is not set")
            options[key] = os.environ[name]
    return options or None


def secret_name(name: str) -> bool:
    """Whether an option key or flag looks like it holds a credential: one of its words (split at anything but
    letters and digits) ends with key, secret, token, password, passwd, pwd, credential(s), auth, sas, sig or
    signature (``key``, ``access_key``, ``session_token``, ``sas_token``, ``hf_token``, ``apikey``), or it contains
    secret, passw or credential anywhere (``aws_secret_access_key``). ``--token-budget`` is distattr's own."""
    name = name.strip().lstrip("-").lower()
    if name in _NOT_SECRET:
        return False
    words = [w for w in re.split(r"[^a-z0-9]+", name) if w]
    return any(part in name for part in _SECRET_PARTS) or any(w.endswith(_SECRET_ENDINGS) for w in words)


def secret_values(items: list[str] | None, options: dict | None) -> set[str]:
    """The strings of ``options`` that must never be printed: values of keys that look secret (also inside nested
    dicts such as ``client_kwargs``) and every value read from the environment (``items``: the raw pairs)."""
    from_env = {item.partition("=")[0].strip() for item in items or [] if item.partition("=")[2].startswith(ENV_PREFIX)}
    out: set[str] = set()

    def walk(value, secret: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, secret or secret_name(str(k)))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, secret)
        elif secret and isinstance(value, str | int) and not isinstance(value, bool) and len(str(value)) >= 4:
            out.add(str(value))

    for key, value in (options or {}).items():
        walk(value, secret_name(key) or key in from_env)
    return out


def scrub(text: str, hidden: Iterable[str], *, one_line: bool = True) -> str:
    """``text`` with every string of ``hidden`` replaced by ``***`` (and folded to one line unless ``one_line``
    is false)."""
    for value in sorted(hidden, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return " ".join(text.split()) if one_line else text


def redact_command(argv: Sequence[str]) -> str:
    """``argv`` as one shell-quoted line without credentials, for the store's provenance: the value of a flag that
    looks secret (``--hf-token X``, ``--password=X``), of ``KEY=VALUE`` pairs whose key does (``--storage-option
    secret=X``, ``--data-option=token=X``, ``--model-kwarg api_key=X``, a JSON value with such a key), passwords in
    URLs (``ftp://user:X@host``) and secret-looking URL query parameters (``?sig=X``) become ``***``; ``env:NAME``
    references stay (they hold no secret)."""
    import shlex

    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("-"):  # the value of --hf-token X
            out.append(arg if arg.startswith(ENV_PREFIX) else REDACTED)
        elif arg.startswith("--") and "=" in arg:
            flag, _, value = arg.partition("=")
            secret = secret_name(flag) and not value.startswith(ENV_PREFIX)
            out.append(f"{flag}={REDACTED if secret else _redact_value(value)}")
        else:
            out.append(_redact_value(arg))
        hide_next = arg.startswith("--") and "=" not in arg and secret_name(arg)
    # shell-quoted where needed, but a redaction alone does not call for quotes: --storage-option secret=***
    return " ".join(arg if shlex.quote(arg.replace(REDACTED, "x")) == arg.replace(REDACTED, "x") else shlex.quote(arg)
                    for arg in out)


def _redact_value(value: str) -> str:
    """One argument: a ``KEY=VALUE`` pair (the key a name), or anything else that may hold a URL."""
    key, sep, rest = value.partition("=")
    if sep and re.fullmatch(r"[A-Za-z_][\w.-]*", key):
        if rest.startswith(ENV_PREFIX):
            return value
        if secret_name(key) or (rest[:1] in "{[" and rest and _holds_secret_key(rest)):
            return f"{key}={REDACTED}"
        return f"{key}={_redact_url(rest)}"
    return _redact_url(value)


def _holds_secret_key(text: str) -> bool:
    """Whether a JSON (or JSON-like) value has a key that looks secret."""
    try:
        value = json.loads(text)
    except ValueError:
        return any(secret_name(word) for word in re.findall(r"[A-Za-z_][\w-]*", text))

    def walk(item) -> bool:
        if isinstance(item, dict):
            return any(secret_name(str(k)) or walk(v) for k, v in item.items())
        return isinstance(item, list) and any(walk(v) for v in item)

    return walk(value)


def _redact_url(text: str) -> str:
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    return _URL_QUERY.sub(lambda m: f"{m.group(1)}{REDACTED}" if secret_name(m.group(2)) else m.group(0), text)
