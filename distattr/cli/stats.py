"""``distattr stats STORE``: dataset-wide statistics of a store, as tables, figures and a one-page HTML report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``stats`` on the ``distattr`` subcommand parser."""
    from .common import add_model_arguments

    p = sub.add_parser(
        "stats", help="dataset-wide statistics of a store: summaries, reductions, correlations, faithfulness",
        description="Statistics over a distattr Zarr store, computed out of core with dask. Without any of "
                    "--summaries/--by/--label-column/--faithfulness/--plots/--report, prints the per-example "
                    "summaries' overview and the attribution share by relative position.")
    p.add_argument("store", metavar="STORE", help="store path or URL (written by attribute-dataset)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for a URL, repeatable; VALUE env:NAME reads the environment variable NAME "
                        "(keeps secrets off the command line)")
    p.add_argument("--where", action="append", default=[], metavar="COND",
                   help="keep examples where FIELD=VALUE (also !=, <, <=, >, >=); fields: kept metadata fields, "
                        "n_source, n_target, n_steps, example_id; repeatable (= on one field: either value)")
    p.add_argument("--select", action="append", default=[], metavar="DIM=ENTRY",
                   help="use one entry of an extra dim (index or label), e.g. layer=-1, instead of averaging it")
    p.add_argument("--summaries", metavar="FILE", help="write per-example summaries (.parquet, .csv or .tsv)")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="top attributed tokens per example (3)")
    p.add_argument("--texts", action="store_true", help="include the input and generated texts in the summaries")
    p.add_argument("--by", action="append", default=[], metavar="KEYS[:VALUE]",
                   help="means/quantiles grouped by comma-separated keys: position, distance, side, token, step, "
                        "layer, head (the store's extra dims); ':VALUE' overrides --value; repeatable")
    p.add_argument("--value", default="normalized",
                   help="value reduced by --by: normalized (default), abs, raw, or per column share_source, "
                        "entropy, mass, total")
    p.add_argument("--quantiles", type=float, nargs="*", default=[0.1, 0.5, 0.9], metavar="Q",
                   help="quantiles of --by groups (default: 0.1 0.5 0.9; none: no second pass)")
    p.add_argument("--bins", type=int, default=10, metavar="N", help="relative position bins (default: 10)")
    p.add_argument("--labels", metavar="FILE", help="CSV/TSV/Parquet of labels joined on --id-column")
    p.add_argument("--id-column", default="example_id", metavar="NAME", help="id column of --labels")
    p.add_argument("--label-column", metavar="NAME",
                   help="label to correlate with (a --labels column, or a kept metadata field)")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="per-example summary column to correlate (default: share_source); repeatable")
    p.add_argument("--faithfulness", action="store_true",
                   help="comprehensiveness, sufficiency and AOPC on the model (forwards; use --limit)")
    p.add_argument("--model", "-m",
                   help="model for --faithfulness (default: the store's model by name; the load options stored with "
                        "it are never used: a store cannot make this command run code)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="model weights dtype")
    p.add_argument("--device", help="where to run the model, e.g. cpu, cuda")
    add_model_arguments(p)  # --quantization, --device-map, ...: the model's options are the user's, as --model
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.5], metavar="F",
                   help="fractions of context tokens removed / kept (default: 0.1 0.2 0.5)")
    p.add_argument("--mode", choices=("replace", "delete"), default="replace",
                   help="remove tokens by replacing them with the baseline token (default) or deleting them")
    p.add_argument("--rank", choices=("abs", "signed"), default="abs", help="rank tokens by |score| or score")
    p.add_argument("--no-random-baseline", action="store_true",
                   help="skip the random-ranking reference run of --faithfulness")
    p.add_argument("--limit", type=int, metavar="N", help="--faithfulness on the first N examples only")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="examples per faithfulness batch (8)")
    p.add_argument("--token-budget", type=int, metavar="N", help="most padded tokens per forward batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ranking (default: 0)")
    p.add_argument("--tables", metavar="DIR", help="write the reduction, correlation and faithfulness tables as CSV")
    p.add_argument("--plots", metavar="DIR", help="write PNG figures")
    p.add_argument("--report", metavar="FILE.html", help="write a one-page self-contained HTML report")
    p.add_argument("--workers", type=int, metavar="N", help="dask threads (default: one per CPU)")
    p.add_argument("--quiet", "-q", action="store_true", help="no status messages")
    p.set_defaults(func=cmd_stats)
    return p


def _reductions(args) -> list[tuple[tuple[str, ...], str]]:
    from .common import UsageError

    out = []
    for item in args.by:
        keys, _, value = item.partition(":")
        by = tuple(k.strip() for k in keys.split(",") if k.strip() and k.strip() != "all")
        if not keys.strip():
            raise UsageError(f"--by expects KEYS[:VALUE], got {item!r}")
        out.append((by, value.strip() or args.value))
    return out


def _say(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _check(args) -> None:
    from .common import UsageError

    for name in ("top_k", "bins", "batch_size", "token_budget", "limit", "workers"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "top_k" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be at least {0 if name == 'top_k' else 1}")
    if args.labels and not args.label_column:
        raise UsageError("--labels needs --label-column (the label to correlate with)")
    if args.metric and not args.label_column:
        raise UsageError("--metric needs --label-column")
    if any(not 0 <= q <= 1 for q in args.quantiles):
        raise UsageError("--quantiles must lie in [0, 1]")
    if any(not 0 < f <= 1 for f in args.fractions):
        raise UsageError("--fractions must lie in (0, 1]")
    for flag, path in (("--tables", args.tables), ("--plots", args.plots)):
        if path and Path(path).exists() and not Path(path).is_dir():
            raise UsageError(f"{flag}: {path} is a file; give a folder")


def cmd_stats(args) -> int:
    from ..statistics import report as report_mod
    from ..statistics.chunks import check_select, parse_where
    from ..statistics.reductions import check_reduction, reduce_store
    from ..statistics.summaries import summarize, write_table
    from ..store import open_store
    from .common import fsspec_options, parse_pairs

    _check(args)
    where = parse_where(args.where)
    select = {k: v for k, v in parse_pairs(args.select, "--select").items()}
    reductions = _reductions(args)
    store = open_store(args.store, fsspec_options(args.storage_option, "--storage-option"))
    if not store.complete:
        _say(args, f"warning: {args.store} is incomplete (status {store.attrs.get('status')!r}): statistics cover "
                   "the examples written so far")
    default = not (args.summaries or reductions or args.label_column or args.faithfulness or args.plots
                   or args.report)
    if default:
        reductions = [(("position",), args.value)]
    check_select(store, select)
    for by, value in reductions:  # bad keys fail before any pass over the data
        check_reduction(store, by, value, args.bins, select)
    results = report_mod.Results()
    summaries = None
    if args.summaries or args.label_column or args.plots or args.report or default:
        _say(args, f"Summarising {len(store)} examples ...")
        summaries = summarize(store, top_k=args.top_k, where=where, select=select, texts=args.texts,
                              workers=args.workers)
        if args.summaries:
            _say(args, f"Wrote {write_table(summaries, args.summaries)}")
        _print("Per-example summaries", _overview(summaries))
    reduced = []
    for by, value in reductions:
        _say(args, f"Reducing {value} by {', '.join(by) or 'all'} ...")
        table = reduce_store(store, by, value=value, quantiles=args.quantiles, where=where, select=select,
                             bins=args.bins, workers=args.workers)
        reduced.append((by, value, table))
        shown = table.sort_values("count", ascending=False).head(20) if "token" in by else table
        _print(f"{value} by {' x '.join(by) or 'all'}", shown)
        _write_csv(args, f"by-{'-'.join(by) or 'all'}-{value}.csv", table)
    correlations, joined = (), None
    if args.label_column:
        correlations, joined = _correlations(args, summaries)
    faith = _faithfulness(args, store, where, select) if args.faithfulness else {}
    results = report_mod.Results(summaries=summaries, reductions=tuple(reduced), correlations=correlations,
                                 joined=joined, faithfulness=faith)
    _outputs(args, store, results)
    return 0


def _overview(summaries):
    metrics = [c for c in ("share_source", "entropy", "entropy_normalized", "mass") if c in summaries.columns]
    return summaries[metrics].describe(percentiles=[0.1, 0.5, 0.9]).T.reset_index(names="metric")


def _correlations(args, summaries):
    from ..statistics.correlation import correlate, correlation_table, join_labels, read_labels

    joined = summaries
    if args.labels:
        joined = join_labels(summaries, read_labels(args.labels, args.id_column), args.id_column)
        _say(args, f"Joined {len(joined)} of {len(summaries)} examples with labels from {args.labels}")
    label = args.label_column
    if args.labels and label not in joined.columns and f"label_{label}" in joined.columns:
        label = f"label_{label}"
    results = tuple(correlate(joined, args.metric or ["share_source"], label))
    table = correlation_table(results)
    _print("Correlation with labels", table)
    _write_csv(args, "correlations.csv", table)
    return results, joined


def _faithfulness(args, store, where, select) -> dict:
    """Comprehensiveness and sufficiency of the store's rankings on the model that ``--model`` and the model options
    name. The store only gives a default model name: load arguments stored in its identity (``trust_remote_code``,
    revisions, ``model_kwargs``, quantization configs) could run someone else's code, so they are never read."""
    from ..api import load_model
    from ..statistics.faithfulness import faithfulness
    from .common import model_options

    options = {k: v for k, v in model_options(args).items() if v is not None}
    name = args.model or _store_model(store)
    _say(args, f"Loading {name} ..." if args.model else
         f"Loading {name} (the store's model, by name only: its stored load options are not used) ...")
    model = load_model(name, **options)
    rankings = {args.rank: args.rank} | ({} if args.no_random_baseline else {"random": "random"})
    out = {}
    for label, rank in rankings.items():
        _say(args, f"Faithfulness ({rank} ranking) ...")
        progress = _progress(f"faithfulness ({rank} ranking)", enabled=not args.quiet)
        try:
            result = faithfulness(store, model, fractions=args.fractions, mode=args.mode, rank=rank, where=where,
                                  select=select, limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                                  token_budget=args.token_budget, on_progress=progress)
        finally:
            progress.close()
        out[f"{store.identity.get('method')} ({label})" if rank != "random" else "random"] = result
        _print(f"Faithfulness, {rank} ranking ({args.mode})", result.summary())
        _write_csv(args, f"faithfulness-{rank}-steps.csv", result.steps)
        _write_csv(args, f"faithfulness-{rank}-examples.csv", result.examples)
    return out


def _store_model(store) -> str:
    """The store's model name as the default of ``--model``: a plain name or path, never a Petals spec (whose query
    can name a program to run and peers to reach)."""
    from ..models.petals import is_petals_spec

    name = store.identity.get("model")
    if not isinstance(name, str) or not name or name == "synthetic":
        raise ValueError("the store names no loadable model; give --model")
    if is_petals_spec(name):
        raise ValueError(f"the store's model {name!r} is a Petals spec, which can name programs to run: give it with "
                         "--model if you trust it")
    return name


def _progress(title: str, enabled: bool = True):
    """The ``on_progress(done, total)`` callback of the statistics (examples done), shown by distattr's progress
    display (:class:`~distattr.viz.progress.Progress`: a bar on a terminal or in a notebook, a line every 30 s in
    a log); ``close()`` ends it."""
    from ..viz.progress import DoneOfTotal

    return DoneOfTotal(title, "ex", enabled=enabled)


def _outputs(args, store, results) -> None:
    from ..statistics import report as report_mod
    from ..statistics.plots import png_bytes, save_png

    if not (args.plots or args.report):
        return
    figures = report_mod.figures(results)
    if args.plots:
        for file_name, fig in figures.items():
            save_png(fig, Path(args.plots) / file_name)
        _say(args, f"Wrote {len(figures)} figure(s) to {args.plots}")
    if args.report:
        pngs = {name: png_bytes(fig) for name, fig in figures.items()}
        facts = report_mod.store_facts(store)
        if args.where:
            facts["where"] = " and ".join(args.where)
        if args.select:
            facts["select"] = ", ".join(args.select)
        html = report_mod.render_report(f"distattr statistics: {Path(str(store.url)).name}",
                                        report_mod.sections(results, pngs), facts)
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(html, encoding="utf-8")
        _say(args, f"Wrote {args.report}")


def _write_csv(args, name: str, table) -> None:
    if args.tables:
        path = Path(args.tables) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(path, index=False)


def _print(title: str, table) -> None:
    print(f"\n== {title}")
    print(table.to_string(index=False, max_rows=40, float_format=lambda x: f"{x:.4g}"))
