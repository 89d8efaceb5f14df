"""The ``distattr`` command line.

``distattr attribute TEXT [TEXT ...] [options]`` explains each generated token of each input and prints
the heatmaps (``--output`` writes the JSON result, ``--html`` a self-contained page, ``--png`` a figure).
``distattr methods`` and ``distattr step-functions`` list what can be used.
``distattr case-study cat | gender-bias`` reproduces the Inseq paper's case studies (:mod:`distattr.casestudies`).
``distattr stats STORE`` computes dataset-wide statistics of a Zarr store (:mod:`distattr.cli.stats`).

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

from ..configs import SHIPPED_CONFIGS
from ..logs import LOG_LEVELS
from ..logs import configure as configure_logging
from ..options import split_pairs
from .common import (
    INTERRUPTED,
    SWALLOWED,
    USAGE_ERROR,
    Parser,
    UsageError,
    add_attribution_arguments,
    add_model_arguments,
    attribution_options,
    classify_error,
    model_options,
    output_path,
    parse_pairs,
    parse_value,
    with_dataset_extra,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="distattr", description="Fast feature attribution for generative language models.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    parser.add_argument("--verbose", "-v", action="count", default=0,
                        help="log what distattr does: -v info, -vv debug (default: warnings only)")
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, help="the distattr logger's level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

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

    from .dataset import add_parser as add_dataset_parser

    dataset = add_dataset_parser(sub)
    dataset.set_defaults(func=with_dataset_extra(dataset.get_default("func")))
    from .casestudy import add_parser as add_case_study_parser

    add_case_study_parser(sub)  # distattr case-study cat | gender-bias
    from .stats import add_parser as add_stats_parser

    add_stats_parser(sub)  # distattr stats STORE
    plan = sub.add_parser(
        "plan", help="plan a run without loading weights: device map, memory per device, batch and passes",
        description="Build the model from its config on the meta device (no weights) and print the device map, the "
                    "weights and activations per device, the rows per batch that fit and the passes the method needs.")
    plan.add_argument("--model", "-m", required=True,
                      help=f"shipped config ({', '.join(SHIPPED_CONFIGS)}), a "
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
    plan.add_argument("--recompute", default="auto", choices=("auto", "always", "never"),
                      help="plan block-wise recomputation in the backward: auto (when a row does not fit otherwise, "
                           "as attribute does), always or never (default: %(default)s)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)
    sub.add_parser("methods", help="list the attribution methods").set_defaults(func=cmd_methods)
    sub.add_parser("step-functions", help="list the step functions").set_defaults(func=cmd_step_functions)
    return parser


VERBOSITY = ("warning", "info", "debug")  # the log level of no -v, -v, -vv
GLOBAL_FLAGS = ("--debug", "--verbose", "-v", "-vv", "-vvv")


def global_options_first(argv: list[str]) -> list[str]:
    """``--debug``, ``-v``/``--verbose`` and ``--log-level LEVEL`` moved before the subcommand: they are accepted
    anywhere on the line (as "rerun with --debug" suggests), up to a ``--`` that ends the options."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg in GLOBAL_FLAGS or arg.startswith("--log-level="):
            front.append(arg)
        elif arg == "--log-level" and i + 1 < len(argv):
            front += argv[i : i + 2]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0 ok, 2 usage error, 1 runtime failure or internal error,
    130 interrupted (see the module docstring). With ``--debug`` errors are raised, traceback and all."""
    parser = build_parser()
    argv = global_options_first(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    try:
        args = parser.parse_args(argv)
        configure_logging(args.log_level or VERBOSITY[min(args.verbose, len(VERBOSITY) - 1)])
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


def cmd_attribute(args) -> int:

    texts = _input_texts(args)
    _check_count(args.generated_texts, len(texts), "--generated-texts")
    _check_count(args.contrast_targets, len(texts), "--contrast-targets")
    options = attribution_options(args)
    if (options.contrast_targets_alignments is not None or options.contrast_alignment_model is not None) \
            and not args.contrast_targets:
        raise UsageError("--contrast-alignment and --contrast-alignment-model need --contrast-targets")
    load_options = model_options(args)
    json_path, html_path = output_path(args.output, "--output"), output_path(args.html, "--html")
    if json_path is not None and json_path.exists() and not args.force:  # before the model loads
        raise UsageError(f"--output {json_path} exists; pass --force to replace it")
    png_path = output_path(args.png, "--png")
    if png_path is not None:
        from ..viz.plot import require_matplotlib

        try:
            require_matplotlib()  # fail before loading the model
        except ImportError as err:
            raise UsageError(f"--png: {err}") from None

    from ..api import load_model

    _status(args, f"Loading {args.model} ...")
    model = load_model(args.model, options.method, method_args=options.method_args, **load_options)
    out = model.attribute(texts, args.generated_texts, contrast_targets=args.contrast_targets, options=options,
                          show_progress=not args.quiet)
    normalize, rescale = not (args.raw or args.rescale), args.rescale
    if json_path is not None:
        out.save(json_path, overwrite=args.force)
        _status(args, f"Saved the result to {json_path}")
    if html_path is not None:
        from ..viz.html import render_html

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
    from ..methods import METHODS

    rows = []
    for name in sorted(METHODS):
        spec = METHODS[name]
        fields = [f"{f.name}={f.default!r}" for f in dataclasses.fields(spec.args)
                  if f.default is not dataclasses.MISSING]
        rows.append((name, spec.kind, spec.summary + (f"  [{', '.join(fields)}]" if fields else "")))
    return _columns(rows)


def step_function_lines() -> list[str]:
    """One line per step function: name, ``contrastive`` flag, first docstring line."""
    from ..steps import STEP_FUNCTIONS

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
    from ..methods import METHODS, parse_args
    from ..planner import plan

    texts = split_pairs(args.method_arg, "--method-arg")
    method_args = parse_args(args.method, texts) if args.method in METHODS else \
        {key: parse_value(text) for key, text in texts.items()}  # the planner names the methods it plans
    result = plan(args.model, args.devices, args.quantization, args.method, args.max_length, args.generated,
                  dtype=args.dtype, method_args=method_args, examples=args.examples,
                  double_quant=not args.no_double_quant, steps_per_row=args.steps_per_row, reserve=args.reserve,
                  recompute=args.recompute)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


def cmd_methods(args) -> int:
    print("\n".join(method_lines()))
    return 0


def cmd_step_functions(args) -> int:
    print("\n".join(step_function_lines()))
    return 0


__all__ = ["UsageError", "build_parser", "classify_error", "main", "parse_pairs", "parse_value"]
