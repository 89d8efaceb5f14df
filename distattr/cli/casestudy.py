"""``distattr case-study cat | gender-bias``: the Inseq paper's two case studies, one command each."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``case-study`` (with ``cat`` and ``gender-bias``) on the ``distattr`` subcommand parser."""
    from .common import Parser

    case = sub.add_parser("case-study", help="the Inseq paper's case studies: cat, gender-bias",
                          description="Reproduce a case study of the Inseq paper (Sarti et al. 2023).")
    studies = case.add_subparsers(dest="study", metavar="STUDY", parser_class=Parser)
    case.set_defaults(func=lambda args: _no_study(case))

    cat = studies.add_parser(
        "cat", help="Contrastive Attribution Tracing: where the model recalls facts (layer x position map)",
        description="Layer gradient x activation of p(true object) - p(false object) on every decoder block's MLP "
                    "output, over the facts the model gets right; writes the store, the averaged layer x position "
                    "map as CSV and PNG, and per-fact probabilities to DIR.")
    _common(cat)
    cat.add_argument("--facts", metavar="FILE.json",
                     help="ROME known facts, CounterFact or {prompt, subject, target_true, target_false} records "
                          "(default: ROME's 1,209 known facts, packaged)")
    cat.add_argument("--limit", type=int, metavar="N", help="trace at most N facts (the first that pass the filters)")
    cat.add_argument("--seed", type=int, default=0, help="seed of the false-object choice (default: 0)")
    cat.add_argument("--hidden-reduction", choices=("sum", "vnorm"), default="sum",
                     help="sum: signed sum over the hidden size (default); vnorm: L2 norm")
    cat.add_argument("--layers", nargs="+", metavar="NAME",
                     help="modules to attribute (default: every decoder block's MLP)")
    cat.add_argument("--all-facts", action="store_true", help="also trace facts the model gets wrong")
    cat.add_argument("--batch-size", type=int, default=32, metavar="N", help="facts per batch (default: 32)")
    cat.add_argument("--normalize", action="store_true",
                     help="divide each fact's layer x group map by its largest |value| before averaging (every "
                          "method's map; Spearman per fact does not change)")
    cat.add_argument("--compare", type=_compare_methods, metavar="METHODS",
                     help="also run, on the same facts, a comma list of causal-tracing (ROME: noise on the subject, "
                          "clean MLP outputs restored) and atp (attribution patching, the same corruption); writes "
                          "tracing_map.csv, atp_map.csv, compare_maps.png, agreement.json (Spearman with bootstrap "
                          "intervals, per relation), agreement_facts.csv and fact_maps.npz")
    from ..casestudies.cat import Comparison
    from ..methods.patching import COMPONENTS

    plain = Comparison()
    cat.add_argument("--trace-component", choices=COMPONENTS, metavar="NAME",
                     help=f"with --compare: what is restored, one of {', '.join(COMPONENTS)} "
                          f"(default: {plain.component}, ROME's MLP trace)")
    cat.add_argument("--trace-window", type=int, metavar="N",
                     help=f"with --compare: layers restored together, centred (default: {plain.window})")
    cat.add_argument("--trace-samples", type=int, metavar="N",
                     help=f"with --compare: noise draws averaged (default: {plain.samples}; noise std "
                          f"{plain.noise_scale:g} x the embedding table's)")
    cat.add_argument("--resamples", type=int, metavar="N",
                     help=f"with --compare: bootstrap resamples of the intervals, seeded with --seed "
                          f"(default: {plain.resamples})")
    cat.set_defaults(func=cmd_cat)

    gender = studies.add_parser(
        "gender-bias", help="pronoun probabilities and attributions vs labor statistics (the paper's Table 3.2)",
        description="The Inseq paper's gender-bias study (Table 3.2): fill a template with occupations, score the "
                    "gendered pronoun (probability; saliency, integrated gradients and input x gradient attribution "
                    "of the occupation's first token and of the source pronoun) and correlate each measure with the "
                    "share of women in the occupation (Kendall tau): base case (the pronoun the model produces) "
                    "with |%women - 50|, gender swap (he - she, pair difference) with %women. Integrated "
                    "gradients doubles n_steps per example until every |convergence delta| < 0.05. Decoder-only "
                    "models: 'The {occupation} said that' -> he/she; encoder-decoder models: Turkish "
                    "'O bir {occupation}' translated to English. Writes table_3_2.csv (ours beside the paper's), "
                    "gender_bias_table.md, gender_bias_summary.json, gender_bias_occupations.csv and the results.")
    _common(gender)
    gender.add_argument("--occupations", metavar="SET|FILE.tsv", default="paper",
                        help="paper: the Inseq paper's 49 occupations (default; Turkish terms for encoder-decoder "
                             "models, their English translations otherwise); winogender: WinoGender's 60; or a TSV "
                             "with bls_pct_female and the slot column")
    gender.add_argument("--slot-column", metavar="NAME",
                        help="TSV column filling the template (default: turkish for encoder-decoder models when "
                             "present, else occupation, else english)")
    gender.add_argument("--limit", type=int, metavar="N", help="only the first N occupations (a quick run)")
    gender.add_argument("--template", help="template with {occupation} (default: by model type, see above)")
    gender.add_argument("--methods", nargs="+", metavar="NAME",
                        default=["saliency", "integrated_gradients", "input_x_gradient"],
                        help="attribution methods (default: %(default)s)")
    gender.add_argument("--n-steps", type=int, default=16, metavar="N",
                        help="integrated gradients: path points (Gauss-Legendre) of the first try (default: 16)")
    gender.add_argument("--delta-threshold", type=float, default=0.05, metavar="X",
                        help="integrated gradients: n_steps doubles for the examples whose |convergence delta| at "
                             "any attributed step is >= X (default: 0.05, the paper's)")
    gender.add_argument("--max-n-steps", type=int, default=512, metavar="N",
                        help="integrated gradients: the cap of the doubling; examples still above the threshold "
                             "there are counted as not converged (default: 512)")
    gender.add_argument("--source-pronoun", metavar="WORD",
                        help="source word scored as x_pron (default: O for encoder-decoder models, none otherwise)")
    gender.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="translation length limit")
    gender.add_argument("--batch-size", type=int, default=16, metavar="N", help="inputs per batch (default: 16)")
    gender.set_defaults(func=cmd_gender_bias)
    return case


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="smollm2-135m",
                   help="embedded model name, Hugging Face id, local folder or .gguf file (default: %(default)s)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for the tables, figures and results")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"), help="model weights dtype")
    p.add_argument("--device", help="where to run, e.g. cpu, cuda, cuda:1")
    p.add_argument("--token-budget", type=int, default=512, metavar="N",
                   help="most padded tokens per forward/backward batch (default: %(default)s)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress and no status messages")


def _compare_methods(text: str) -> tuple[str, ...]:
    """``--compare``: a comma list of :data:`distattr.casestudies.cat.COMPARE_METHODS`."""
    from ..casestudies.cat import COMPARE_METHODS

    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in COMPARE_METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad)) or 'nothing'}: give a comma list of "
                                         f"{', '.join(COMPARE_METHODS)}")
    return names


def _comparison(args):
    """The :class:`~distattr.casestudies.cat.Comparison` of ``--compare`` and the ``--trace-*`` options (None without
    ``--compare``); a ``--trace-*`` option without ``--compare`` is a usage error."""
    from ..casestudies.cat import Comparison
    from .common import UsageError

    given = {"component": args.trace_component, "window": args.trace_window, "samples": args.trace_samples,
             "resamples": args.resamples}
    given = {k: v for k, v in given.items() if v is not None}
    if args.compare is None:
        if given:
            flag = "--resamples" if "resamples" in given else f"--trace-{next(iter(given))}"
            raise UsageError(f"{flag} needs --compare")
        return None
    for key in ("window", "samples", "resamples"):
        if given.get(key, 1) < 1:
            raise UsageError(f"--{'resamples' if key == 'resamples' else 'trace-' + key} must be at least 1")
    return Comparison(methods=args.compare, **given)


def _no_study(parser: argparse.ArgumentParser) -> int:
    from .common import USAGE_ERROR

    parser.print_help(sys.stderr)
    return USAGE_ERROR


def _checked(args) -> Path:
    """Validate the shared options before any model loads; returns the output folder."""
    from .common import UsageError, device_option

    for name in ("batch_size", "token_budget", "limit", "n_steps", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    device_option(args.device)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output: {args.output} is a file; give a folder")
    return out


def _load(args):
    from ..api import load_model

    _say(args, f"Loading {args.model} ...")
    return load_model(args.model, dtype=args.dtype, device=args.device)


def _say(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def cmd_cat(args) -> int:
    from ..casestudies import cat
    from .common import UsageError

    out = _checked(args)
    comparison = _comparison(args)
    if comparison is not None and args.layers:
        raise UsageError("--compare needs CAT on every decoder block's MLP: leave --layers out")
    facts = cat.load_facts(args.facts)  # a bad file fails before the model loads
    model = _load(args)
    summary = cat.run_cat(model, out, facts, limit=args.limit, seed=args.seed, layers=args.layers,
                          hidden_reduction=args.hidden_reduction, known_only=not args.all_facts,
                          batch_size=args.batch_size, token_budget=args.token_budget, normalize=args.normalize,
                          compare=comparison, show_progress=not args.quiet, log=lambda message: _say(args, message))
    print("\n".join(summary.lines()))
    _say(args, "Wrote " + ", ".join(str(p) for p in summary.files.values()))
    return 0


def cmd_gender_bias(args) -> int:
    from ..casestudies import gender_bias
    from ..methods import build_args
    from .common import UsageError

    out = _checked(args)
    if args.max_n_steps < args.n_steps:
        raise UsageError(f"--max-n-steps ({args.max_n_steps}) must be at least --n-steps ({args.n_steps})")
    if not args.delta_threshold > 0:
        raise UsageError("--delta-threshold must be positive")
    method_args = {"integrated_gradients": {"n_steps": args.n_steps}}
    for name in args.methods:
        build_args(name, method_args.get(name, {}))  # unknown method: fail before loading the model
    gender_bias.load_occupations(args.occupations, args.slot_column)  # a bad file fails before the model loads
    model = _load(args)
    occupations = args.occupations
    if args.slot_column is not None:
        occupations = gender_bias.load_occupations(args.occupations, args.slot_column, model.is_encoder_decoder)
    summary = gender_bias.run_gender_bias(
        model, out, occupations=occupations, limit=args.limit, template=args.template, methods=args.methods,
        method_args=method_args, source_pronoun=args.source_pronoun if args.source_pronoun is not None else "default",
        delta_threshold=args.delta_threshold, max_n_steps=args.max_n_steps, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, token_budget=args.token_budget, show_progress=not args.quiet,
        log=lambda message: _say(args, message))
    print(summary.markdown(), end="")
    _say(args, f"Wall time {summary.seconds:.1f} s. Wrote " + ", ".join(str(p) for p in summary.files.values()))
    return 0
