"""Dataset-wide statistics over a large synthetic store: wall time and peak RSS of each statistic.

For each size in ``--examples`` (default 10,000 and 100,000) a synthetic decoder-only store is written
(``distattr.statistics.synthetic``: prompts of 8-64 tokens, 32 generated steps, units of 16, float32 matrices
``[example, 96 tokens, 32 steps]``), then each statistic runs in a fresh child process that reports its wall time
and its peak RSS (``ru_maxrss``), next to the RSS of the same process after its imports (``base``). Comparing the
two sizes shows whether memory grows with the dataset.

Statistics: ``summaries`` (per-example table + Parquet), ``position`` / ``distance`` / ``token`` (normalized
shares with quantiles 0.1/0.5/0.9: two passes), ``step-entropy`` (a column value), ``correlation`` (join a labels
CSV, Kendall tau and Spearman rho) and ``report`` (figures + HTML from the tables written before). Faithfulness is
not here: its cost is model forwards (``steps x fractions x 2`` rows per example), not the store.

Run from the repository root::

    .venv/bin/python benchmarks/bench_stats.py                         # 10k and 100k examples
    .venv/bin/python benchmarks/bench_stats.py --examples 2000         # a quick check

Results: markdown on stdout, JSON in ``--output``. The stores are written under ``--work`` (default a temporary
folder, removed at the end; ``--keep`` keeps and reuses them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATISTICS = ("summaries", "position", "distance", "token", "step-entropy", "correlation", "report")


def _rss_mib() -> float:
    """Peak resident memory of this process so far. Linux: ``VmHWM`` (reset by exec; ``ru_maxrss`` would carry
    the peak of the parent that forked us), elsewhere ``ru_maxrss``."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(name: str, store_url: str, work: Path, workers: int | None) -> dict:
    """Run one statistic in this process; returns wall time and memory (``base``: after the imports)."""
    import dask.array  # noqa: F401  (imports outside the timed part)
    import matplotlib.figure  # noqa: F401
    import pandas as pd
    import scipy.stats  # noqa: F401

    from distattr.statistics import correlation, reductions, report, summaries
    from distattr.store import open_store

    base = _rss_mib()
    store = open_store(store_url)
    started = time.perf_counter()
    detail = {}
    if name == "summaries":
        table = summaries.summarize(store, workers=workers)
        summaries.write_table(table, work / "summaries.parquet")
        detail = {"rows": len(table)}
    elif name in ("position", "distance", "token", "step-entropy"):
        by, value = {"step-entropy": ("step", "entropy")}.get(name, (name, "normalized"))
        table = reductions.reduce_store(store, by, value=value, workers=workers)
        table.to_csv(work / f"by-{name}.csv", index=False)
        detail = {"groups": len(table), "values": int(table["count"].sum())}
    elif name == "correlation":
        table = pd.read_parquet(work / "summaries.parquet")
        joined = correlation.join_labels(table, correlation.read_labels(work / "labels.csv"))
        results = correlation.correlate(joined, ["entropy_normalized", "share_source"], "focus")
        detail = {"n": results[0].n, "kendall_tau": results[0].kendall_tau, "spearman_rho": results[0].spearman_rho}
    elif name == "report":
        table = pd.read_parquet(work / "summaries.parquet")
        reduced = ((("position",), "normalized", pd.read_csv(work / "by-position.csv")),)
        joined = correlation.join_labels(table, correlation.read_labels(work / "labels.csv"))
        results = report.Results(summaries=table, reductions=reduced, joined=joined,
                                 correlations=tuple(correlation.correlate(joined, "entropy_normalized", "focus")))
        html = report.report_html(store, results)
        (work / "report.html").write_text(html)
        detail = {"html_kb": len(html) / 1024}
    else:
        raise ValueError(name)
    return {"wall_s": time.perf_counter() - started, "base_rss_mib": base, "peak_rss_mib": _rss_mib(), **detail}


def run_child(name: str, store: Path, work: Path, workers: int | None, examples: int = 0) -> dict:
    """Run ``name`` (a statistic, or ``write``) in a fresh process; the driver itself stays small."""
    cmd = [sys.executable, __file__, "--child", name, "--store", str(store), "--work", str(work),
           "--examples", str(examples)]
    if workers:
        cmd += ["--workers", str(workers)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def write_store(path: Path, n: int) -> dict:
    """Write the synthetic store and the labels CSV (its examples' hidden focus) next to it."""
    import pandas as pd

    from distattr.statistics.synthetic import write_synthetic_store

    shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    info = write_synthetic_store(str(path), n, seed=0)
    seconds = time.perf_counter() - started
    labels = pd.DataFrame({"example_id": [f"ex-{i:07d}" for i in range(n)], "focus": info.focus})
    labels.to_csv(path.parent / "labels.csv", index=False)
    return {"wall_s": seconds, "peak_rss_mib": _rss_mib()}


def bench_size(n: int, root: Path, args) -> dict:
    work = root / f"n{n}"
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store.zarr"
    out = {"examples": n}
    if args.keep and (work / "labels.csv").exists() and store.exists():
        out["write"] = None
    else:
        print(f"[{n}] writing the store ...", file=sys.stderr, flush=True)
        out["write"] = run_child("write", store, work, args.workers, n)
    out["store_mb"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6
    for name in args.statistics:
        print(f"[{n}] {name} ...", file=sys.stderr, flush=True)
        out[name] = run_child(name, store, work, args.workers, n)
        print(f"[{n}] {name}: {out[name]['wall_s']:.1f} s, peak RSS {out[name]['peak_rss_mib']:.0f} MiB",
              file=sys.stderr, flush=True)
    return out


def markdown(doc: dict) -> str:
    sizes = doc["sizes"]
    lines = [f"Machine: {doc['machine']}; {doc['date']}; load average at start {doc['load_average']}; "
             f"dask threads: {doc['workers'] or 'one per CPU'}", "",
             "| statistic | " + " | ".join(f"{s['examples']:,} examples: s / peak RSS MiB (after imports)"
                                           for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    lines.append("| write the synthetic store | " + " | ".join(
        f"{s['write']['wall_s']:.0f} s, {s['store_mb']:.0f} MB on disk" if s["write"] else "reused"
        for s in sizes) + " |")
    for name in doc["statistics"]:
        cells = []
        for s in sizes:
            r = s[name]
            cells.append(f"{r['wall_s']:.1f} / {r['peak_rss_mib']:.0f} ({r['base_rss_mib']:.0f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--statistics", nargs="+", default=list(STATISTICS), choices=STATISTICS)
    p.add_argument("--workers", type=int, help="dask threads (default: one per CPU)")
    p.add_argument("--work", help="folder for the stores (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the stores and reuse them on the next run")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results_stats.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    needs = {"correlation": ("summaries",), "report": ("summaries", "position")}
    wanted = set(args.statistics) | {d for s in args.statistics for d in needs.get(s, ())}
    args.statistics = [s for s in STATISTICS if s in wanted]  # dependencies first
    if args.child == "write":
        print(json.dumps(write_store(Path(args.store), args.examples[0])))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.store, Path(args.work), args.workers)))
        return 0
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-stats-"))
    doc = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
           "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()), "statistics": args.statistics,
           "workers": args.workers, "sizes": []}
    try:
        for n in args.examples:
            doc["sizes"].append(bench_size(n, root, args))
    finally:
        if not args.work and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    Path(args.output).write_text(json.dumps(doc, indent=2))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
