"""What the ``distattr`` subcommands share: the usage error and one-line error classification, KEY=VALUE
pairs, the attribution and model-loading options, fsspec options with ``env:NAME`` values."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from ..arguments import parse_json_value
from ..options import AttributeOptions, option_fields, option_types, parse_pairs
from ..redaction import ENV_PREFIX

USAGE_ERROR = 2


RUNTIME_FAILURE = 1


INTERRUPTED = 130


EXTRAS = {
    "zarr": ("stats", "Zarr"), "numcodecs": ("stats", "Zarr"), "fsspec": ("stats", "fsspec"), "dask": ("stats", "Dask"),
    "xarray": ("stats", "xarray"), "pandas": ("stats", "pandas"), "scipy": ("stats", "SciPy"),
    "ray": ("dist", "Ray"), "pyarrow": ("dist", "pyarrow"), "datasets": ("dist", "datasets"),
    "s3fs": ("s3", "s3fs"), "gguf": ("embedded", "gguf"), "matplotlib": ("viz", "matplotlib"),
    "bitsandbytes": ("quant", "bitsandbytes"),
}


DATASET_MODULES = ("ray", "zarr")  # what attribute-dataset imports only once its job starts


class UsageError(ValueError):
    """Bad command-line input."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) that raise instead of exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


parse_value = parse_json_value  # the reading of untyped KEY=VALUE values (generation, data and storage options)






class StepScoresAction(argparse.Action):
    """``--step-scores NAME [NAME ...]`` that gives back what is clearly not a name: an unknown name with a space
    in it is the input text that ``nargs='+'`` swallowed (``attribute --step-scores probability "The capital of
    France is"``), so it goes to the input texts (``input_texts``) when the command has them."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..steps import STEP_FUNCTIONS

        names = list(getattr(namespace, self.dest, None) or [])
        has_texts = hasattr(namespace, "input_texts")  # attribute has TEXT arguments, attribute-dataset has not
        for value in values:
            if has_texts and value not in STEP_FUNCTIONS and any(c.isspace() for c in value.strip()):
                setattr(namespace, SWALLOWED, [*getattr(namespace, SWALLOWED, []), value])
            else:
                names.append(value)
        setattr(namespace, self.dest, names)


SWALLOWED = "texts_after_step_scores"  # namespace attribute of the texts StepScoresAction gave back


def add_attribution_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``attribute`` and ``attribute-dataset``: the model, plugins, ``--dtype``,
    ``--max-new-tokens``, and one flag per :class:`~distattr.options.AttributeOptions` field (its help, metavar
    and choices from the field's :class:`~distattr.options.Option`); read back with :func:`attribution_options`."""
    parser.add_argument("--model", "-m", default="smollm2-135m",
                        help="embedded model name, Hugging Face id, local folder or .gguf file (default: %(default)s)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first, repeatable: a plugin that registers methods or step functions "
                             "(dataset jobs import it in every actor too)")
    types = option_types()
    for f, meta in option_fields():
        if meta.flag is None:
            continue
        names = [meta.flag or "--" + f.name.replace("_", "-"), *([meta.short] if meta.short else [])]
        default = "" if f.default in (dataclasses.MISSING, None, False, ()) else f" (default: {f.default})"
        kwargs: dict = {"dest": f.name, "help": meta.help + default}
        if types[f.name] is bool:
            kwargs["action"] = "store_true"
        elif meta.repeat:
            kwargs.update(action="append", metavar=meta.metavar, help=meta.help + ", repeatable")
        elif meta.many:
            kwargs.update(nargs="+", action=StepScoresAction, metavar=meta.metavar)
        else:
            kwargs.update(metavar=meta.metavar, choices=meta.choices,
                          type=int if types[f.name] in (int, int | None) else str)
        parser.add_argument(*names, **kwargs)
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="generation length (wins over --generation-arg max_new_tokens)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"),
                        help="model weights dtype (default float32)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Big-model loading: quantization and device map (read back, with ``--dtype``/``--device`` where the parser
    has them, by :func:`model_options`)."""
    parser.add_argument("--quantization", choices=("nf4", "int8"),
                        help="load the linear layers in 4-bit NF4 or 8-bit (bitsandbytes: pip install "
                             "'distattr[quant]'); gradients still reach the inputs")
    parser.add_argument("--device-map", metavar="auto|DEVICE|JSON",
                        help="spread the model over devices with accelerate: auto (or balanced, sequential, ...), "
                             "one device, or a JSON map such as '{\"model.embed_tokens\": 0, \"model.layers\": 1, "
                             "\"model.norm\": 1, \"lm_head\": \"cpu\"}' (\"disk\" offloads to --offload-folder)")
    parser.add_argument("--max-memory", metavar="DEV=SIZE,...",
                        help="memory per device for the placement, e.g. 0=20GiB,cpu=60GiB (implies --device-map auto)")
    parser.add_argument("--offload-folder", metavar="DIR", help="folder for weights offloaded to disk")


def parse_device_map(text: str | None):
    """``--device-map``: a JSON object ``{module: device}``, an integer accelerator index, or a name (``auto``,
    ``cpu``, ``cuda:1``...)."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as err:
            raise UsageError(f"--device-map: not valid JSON: {err}") from None
        if not all(isinstance(v, int | str) and not isinstance(v, bool) for v in value.values()):
            raise UsageError('--device-map: devices must be integers or names such as "cpu", "cuda:1", "disk"')
        return value
    if not text:
        raise UsageError("--device-map is empty")
    return int(text) if text.isdigit() else text


def parse_max_memory(text: str | None) -> dict | None:
    """``--max-memory 0=20GiB,cpu=60GiB`` -> ``{0: "20GiB", "cpu": "60GiB"}``."""
    if text is None:
        return None
    out: dict = {}
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        device, sep, size = item.partition("=")
        if not sep or not device or not size:
            raise UsageError(f"--max-memory expects DEVICE=SIZE pairs such as 0=20GiB,cpu=60GiB; got {item!r}")
        out[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    if not out:
        raise UsageError("--max-memory is empty")
    return out


def model_options(args) -> dict:
    """Keyword arguments of :func:`distattr.load_model` from :func:`add_model_arguments`'s options (and
    ``--dtype``/``--device`` when the parser has them), checked before any model is loaded."""
    from ..models.loading import check_device_map, check_max_memory

    options: dict = {"dtype": getattr(args, "dtype", None), "device": device_option(getattr(args, "device", None))}
    device_map, max_memory = parse_device_map(args.device_map), parse_max_memory(args.max_memory)
    if device_map is not None:
        check_device_map(device_map)
        options["device_map"] = device_map
    if max_memory is not None:
        check_max_memory(max_memory)
        options["max_memory"] = max_memory
    if args.quantization is not None:
        from ..models.quantization import require_bitsandbytes

        try:
            require_bitsandbytes()
        except ImportError as err:
            raise UsageError(f"--quantization {args.quantization}: {err}") from None
        options["quantization"] = args.quantization
    if args.offload_folder is not None:
        if device_map is None and max_memory is None:
            raise UsageError("--offload-folder needs --device-map or --max-memory")
        options["model_kwargs"] = {"offload_folder": args.offload_folder}
    return options


def classify_error(err: Exception) -> tuple[int, str]:
    """The exit status and the one line (after ``distattr: ``) of an exception that ended a command."""
    from ..store.errors import StorageFatal, StoreBusy

    if isinstance(err, ImportError):
        missing = (err.name or "").partition(".")[0]
        if missing in EXTRAS:
            extra, what = EXTRAS[missing]
            return USAGE_ERROR, f"error: this needs {what}, which is not installed: pip install 'distattr[{extra}]'"
        if "pip install" in str(err):  # the library's own "needs X: pip install ..." messages
            return USAGE_ERROR, f"error: {one_line(err)}"
    if isinstance(err, StorageFatal | StoreBusy):  # the storage failed or is held: not the input's fault
        return RUNTIME_FAILURE, f"error: {one_line(err)}"
    if isinstance(err, ValueError | FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return USAGE_ERROR, f"error: {one_line(err)}"  # bad input, or a path given that is not there
    if isinstance(err, OSError | MemoryError) or _is_out_of_memory(err) or \
            (isinstance(err, RuntimeError) and type(err).__module__.startswith("distattr.")):
        return RUNTIME_FAILURE, f"error: {one_line(err)}"  # disk, network, memory, a stopped job
    return RUNTIME_FAILURE, (f"internal error: {type(err).__name__}: {' '.join(str(err).split())} "
                             "(rerun with --debug for the traceback)")


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError)


def one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(str(text).split())
    return text or type(err).__name__


def require_dataset_extra() -> None:
    """Refuse ``attribute-dataset`` before it starts when Ray or Zarr is missing (they are imported only once the
    job runs, after the data is read and the store opened)."""
    import importlib

    for module in DATASET_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UsageError("attribute-dataset needs Ray and Zarr: pip install 'distattr[dist]'") from None


def with_dataset_extra(command):
    """``command`` run only after :func:`require_dataset_extra`."""

    def run(args) -> int:
        require_dataset_extra()
        return command(args)

    return run


def device_option(name: str | None) -> str | None:
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: {name!r} is not a device (e.g. cpu, cuda, cuda:0, mps)") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise UsageError(f"--device {name}: CUDA is not available in this torch build ({torch.__version__}); "
                             "use --device cpu or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is visible (torch.cuda.is_available() is False)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s), numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine or torch build")
    return name


def output_path(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{flag}: {path} is a folder; give a file name")
    return out


def attribution_options(args) -> AttributeOptions:
    """The :class:`~distattr.options.AttributeOptions` of :func:`add_attribution_arguments`'s flags, checked
    (unknown methods, argument names and ill-typed values fail here, before any model is loaded). Plugins are
    imported first, so that their methods and step functions are known."""
    from ..methods import load_plugins

    load_plugins(args.plugin)
    raw = {f.name: getattr(args, f.name) for f, meta in option_fields() if meta.flag is not None}
    defaults = AttributeOptions()
    filled = {name: getattr(defaults, name) if value is None else value for name, value in raw.items()}
    values = {}
    for f, meta in option_fields():
        if raw.get(f.name) is not None:
            values[f.name] = meta.read(raw[f.name], filled) if meta.read is not None else raw[f.name]
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        values["generation_args"] = {**values.get("generation_args", {}), "max_new_tokens": args.max_new_tokens}
    options = AttributeOptions.from_kwargs(values)
    options.check()
    return options


def fsspec_options(items: list[str] | None, flag: str) -> dict | None:
    """``--storage-option`` / ``--data-option`` pairs as fsspec options, None when there are none. A value
    ``env:NAME`` is the environment variable ``NAME`` of this process (a string, as it is), so that a secret need
    not be on the command line (which ``ray job submit`` echoes and the store's provenance records, redacted).

    Raises :class:`~distattr.cli.UsageError` (one line, exit status 2) when the variable is not set."""
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
