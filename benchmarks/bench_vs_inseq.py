"""Benchmark distattr against Inseq 0.7.1 on the embedded SmolLM2-135M model (CPU).

What is measured, per attribution method (default: saliency, input_x_gradient, integrated_gradients):

* **Time per attributed token.** Each tool explains the same prompts (the first ``--prompts`` of
  :data:`PROMPTS`, 10-19 tokens each) with the same greedy ``generation_args``
  (``max_new_tokens = min_new_tokens = --new-tokens``, ``do_sample=False``), so every prompt really
  generates ``--new-tokens`` tokens. The timed region is one ``attribute`` call over all prompts, end to
  end: tokenization, generation and attribution. Model loading and one tiny warm-up call (2 generated
  tokens) happen before it, so lazy initialisation is excluded. Reported: seconds / attributed token and
  the speed ratio ``inseq / distattr`` (> 1 means distattr is faster).
* **Peak memory.** Every (tool, method) pair runs in its own child process; the child reports its
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (MiB) after load + warm-up and at the end (peak of the
  whole process: Python, torch, the model and the attribution).
* **Numeric equality.** The children save the token-level matrices: for Inseq the L2 norm over the hidden
  size of the raw ``target_attributions`` (Inseq's default ``vnorm`` reduction, before normalisation), for
  distattr ``seq.target_attributions`` (same reduction). The parent checks that both tools attributed the
  same token ids (same prompt tokens, same generated tokens) and reports, over every generated-token column,
  ``max |a - b| / L1(a)`` where ``a`` is Inseq's column (NaN cells, the future tokens, must coincide).
  All three default methods are deterministic: the check passes at ``<= 1e-4`` (``--tolerance``).

Settings shared by both sides: float32 weights converted from the embedded GGUF file
(``distattr.models.embedded.converted_dir``), ``torch.set_num_threads(--threads)`` (and ``OMP_NUM_THREADS``)
in every child, method defaults (integrated gradients: ``n_steps=50``, Gauss-Legendre; ``--n-steps`` passes
another value to both), ``attributed_fn="probability"``, no step scores. Inseq gets the model object loaded
with ``attn_implementation="eager"``, as ``inseq.load_model`` does when it loads a model by name; distattr
loads ``"smollm2-135m"`` with its own defaults. Inseq runs with ``batch_size=1`` by default
(``--inseq-batch-size``): batched Inseq left-pads prompts of different lengths without shifting position
ids, so its numbers then differ from its own unbatched ones (its tests use ``atol=8e-2``);
``--inseq-batch-size 0`` uses Inseq's default (all prompts in one batch) and the equality check is then
expected to fail for prompts shorter than the longest.

``--device cuda`` (default ``cpu``) puts both tools' model on that device: distattr with ``load_model(...,
device=...)``, Inseq with the model object moved there and ``inseq.load_model(..., device=...)``; the timed call
then ends with ``torch.cuda.synchronize()`` and each child also reports ``torch.cuda.max_memory_allocated`` of
the timed call (``peak_gpu_mib``, after ``reset_peak_memory_stats``). On the CPU nothing changes.

Run (from the repository root, with the project's virtualenv)::

    .venv/bin/python benchmarks/bench_vs_inseq.py                       # full run: 4 prompts x 32 tokens
    .venv/bin/python benchmarks/bench_vs_inseq.py --prompts 1 --new-tokens 4 --methods saliency  # smoke test

It prints a markdown table (with the machine, date and versions) and writes all numbers to ``--output``
(JSON). The exit status is 1 when a child failed or an equality check did not pass.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

MODEL = "smollm2-135m"
DEFAULT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients")
TOOLS = ("inseq", "distattr")
PROMPTS = (
    "The Eiffel Tower is located in the city of",
    "In 1969, the first astronauts to walk on the Moon were Neil Armstrong and",
    "The main ingredients of a traditional Italian pizza are tomato sauce, mozzarella cheese and",
    "Photosynthesis is the process by which green plants use sunlight to produce",
    "The capital of Japan, an island country in East Asia, is",
    "When water is heated to one hundred degrees Celsius at sea level, it",
    "The most widely spoken language in Brazil, the largest country in South America, is",
    "A computer program that translates source code into machine code is called a",
)
WARMUP_PROMPT = "Hello, my name is"


def _maxrss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def generation_args(new_tokens: int) -> dict:
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}


# --------------------------------------------------------------------------------------------- child side


def _child(args: argparse.Namespace) -> int:
    """Load one tool, warm it up, time one ``attribute`` call, save matrices (npz) and a JSON summary."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    prompts = list(PROMPTS[: args.prompts])
    path_methods = ("integrated_gradients", "sequential_integrated_gradients", "discretized_integrated_gradients")
    method_args = {} if args.n_steps is None or args.method not in path_methods else {"n_steps": args.n_steps}
    t0 = time.perf_counter()
    if args.child == "inseq":
        run, loaded_rss = _inseq_runner(args, method_args)
    else:
        run, loaded_rss = _distattr_runner(args, method_args)
    load_s = time.perf_counter() - t0

    run([WARMUP_PROMPT], generation_args(2))  # lazy init (kernels, hooks, allocator) outside the timed call
    warm_rss = _maxrss_mib()

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(args.device)
        torch.cuda.reset_peak_memory_stats(args.device)
    start = time.perf_counter()
    sequences = run(prompts, generation_args(args.new_tokens))
    if cuda:
        torch.cuda.synchronize(args.device)
    elapsed = time.perf_counter() - start
    peak_rss = _maxrss_mib()

    arrays, seqs = {}, []
    for i, seq in enumerate(sequences):
        arrays[f"seq{i}"] = seq["matrix"]
        seqs.append({k: v for k, v in seq.items() if k != "matrix"})
    out = Path(args.workdir)
    np.savez(out / f"{args.child}-{args.method}.npz", **arrays)
    n_tokens = sum(s["attr_pos_end"] - s["attr_pos_start"] for s in seqs)
    summary = {
        "tool": args.child, "method": args.method, "method_args": method_args,
        "threads": torch.get_num_threads(), "load_s": load_s, "attribute_s": elapsed,
        "attributed_tokens": n_tokens, "s_per_token": elapsed / max(n_tokens, 1),
        "rss_after_load_mib": loaded_rss, "rss_after_warmup_mib": warm_rss, "peak_rss_mib": peak_rss, "sequences": seqs,
    }
    if cuda:
        summary["device"] = args.device
        summary["peak_gpu_mib"] = torch.cuda.max_memory_allocated(args.device) / 2**20
    (out / f"{args.child}-{args.method}.json").write_text(json.dumps(summary, indent=1))
    return 0


def _inseq_runner(args: argparse.Namespace, method_args: dict):
    import inseq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distattr.methods import METHODS
    from distattr.models.embedded import converted_dir

    folder = converted_dir(MODEL)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # Inseq picks CUDA by itself when it is there: name the device, so that both tools run on --device
    attr_model = inseq.load_model(model.to(args.device), args.method, tokenizer=tokenizer, device=args.device)
    has_hidden_dim = METHODS[args.method].kind in ("gradient", "layer")
    batch_size = None if args.inseq_batch_size == 0 else args.inseq_batch_size
    rss = _maxrss_mib()

    def attribute(texts: list[str], gen_args: dict):
        return attr_model.attribute(texts, generation_args=dict(gen_args), step_scores=[], show_progress=False,
                                    batch_size=batch_size, **method_args).sequence_attributions

    def run(texts: list[str], gen_args: dict) -> list[dict]:
        if batch_size == 1:
            # One call per prompt: Inseq generates all inputs of a call as one left-padded batch without an
            # attention mask, which derails generation for the shorter prompts.
            sequences = [seq for text in texts for seq in attribute([text], gen_args)]
        else:
            sequences = attribute(texts, gen_args)
        result = []
        for seq in sequences:
            raw = seq.target_attributions.float()  # NaN for future tokens
            # gradient methods: [tokens, steps, hidden] -> L2 over hidden, as distattr reduces on the device;
            # perturbation methods are [tokens, steps], internals [tokens, steps, layers(, heads)]: kept as they are
            matrix = (torch.linalg.vector_norm(raw, ord=2, dim=-1) if has_hidden_dim else raw).numpy()
            result.append({
                "matrix": matrix, "target_ids": [int(t.id) for t in seq.target],
                "target_tokens": [t.token for t in seq.target],
                "attr_pos_start": int(seq.attr_pos_start), "attr_pos_end": int(seq.attr_pos_end),
            })
        return result

    return run, rss


def _distattr_runner(args: argparse.Namespace, method_args: dict):
    import distattr

    device = None if args.device == "cpu" else args.device  # the CPU: distattr's defaults, as before --device
    attr_model = distattr.load_model(MODEL, args.method, device=device)
    rss = _maxrss_mib()

    def run(texts: list[str], gen_args: dict) -> list[dict]:
        out = attr_model.attribute(texts, generation_args=dict(gen_args), step_scores=[], show_progress=False,
                                   **method_args)
        return [{
            "matrix": seq.target_attributions, "target_ids": [int(t) for t in seq.target_ids],
            "target_tokens": list(seq.target_tokens),
            "attr_pos_start": int(seq.attr_pos_start), "attr_pos_end": int(seq.attr_pos_end),
            "timing": out.info.get("timing"),
        } for seq in out]

    return run, rss


# -------------------------------------------------------------------------------------------- parent side


def compare(workdir: Path, method: str) -> dict:
    """Token identity and ``max over columns of max|a - b| / L1(a)`` between the two tools' matrices."""
    import numpy as np

    summaries = {t: json.loads((workdir / f"{t}-{method}.json").read_text()) for t in TOOLS}
    mats = {t: np.load(workdir / f"{t}-{method}.npz") for t in TOOLS}
    n_seq = len(summaries["inseq"]["sequences"])
    report = {"same_tokens": n_seq == len(summaries["distattr"]["sequences"]), "token_mismatches": [],
              "max_rel_diff": 0.0, "max_abs_diff": 0.0, "nan_mask_equal": True, "columns_compared": 0}
    for i in range(min(n_seq, len(summaries["distattr"]["sequences"]))):
        a_seq, b_seq = summaries["inseq"]["sequences"][i], summaries["distattr"]["sequences"][i]
        keys = ("target_ids", "attr_pos_start", "attr_pos_end")
        if any(a_seq[k] != b_seq[k] for k in keys):
            report["same_tokens"] = False
            report["token_mismatches"].append({
                "sequence": i, "inseq_tokens": a_seq["target_tokens"][a_seq["attr_pos_start"]:],
                "distattr_tokens": b_seq["target_tokens"][b_seq["attr_pos_start"]:],
            })
            continue
        a, b = mats["inseq"][f"seq{i}"].astype(np.float64), mats["distattr"][f"seq{i}"].astype(np.float64)
        if a.shape != b.shape:
            report["same_tokens"] = False
            report["token_mismatches"].append({"sequence": i, "shapes": [list(a.shape), list(b.shape)]})
            continue
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        if not np.array_equal(nan_a, nan_b):
            report["nan_mask_equal"] = False
        a0, b0 = np.where(nan_a, 0.0, a), np.where(nan_b, 0.0, b)
        diff = np.abs(a0 - b0).max(axis=0)
        l1 = np.maximum(np.abs(a0).sum(axis=0), 1e-30)
        report["max_rel_diff"] = max(report["max_rel_diff"], float((diff / l1).max()))
        report["max_abs_diff"] = max(report["max_abs_diff"], float(diff.max()))
        report["columns_compared"] += a.shape[1]
    return report


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "inseq", "captum", "distattr"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"nproc": nproc, "cpu": cpu, "platform": platform.platform(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def _run_child(tool: str, method: str, args: argparse.Namespace, workdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", tool, "--method", method,
           "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
           "--inseq-batch-size", str(args.inseq_batch_size), "--workdir", str(workdir), "--device", args.device]
    if args.n_steps is not None:
        cmd += ["--n-steps", str(args.n_steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    print(f"[{tool}/{method}] running ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    summary_path = workdir / f"{tool}-{method}.json"
    if proc.returncode != 0 or not summary_path.is_file():
        tail = (proc.stderr or proc.stdout)[-3000:]
        print(f"[{tool}/{method}] FAILED (rc={proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
        return {"tool": tool, "method": method, "error": tail, "returncode": proc.returncode}
    summary = json.loads(summary_path.read_text())
    summary["child_wall_s"] = wall
    print(f"[{tool}/{method}] {summary['attribute_s']:.2f} s for {summary['attributed_tokens']} tokens, "
          f"peak RSS {summary['peak_rss_mib']:.0f} MiB (process wall {wall:.1f} s)", file=sys.stderr, flush=True)
    return summary


def _median_run(runs: list[dict]) -> dict:
    """The run with the median time (the first failed one if any failed), with every run's s/token."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["s_per_token"])
    return {**ordered[(len(ordered) - 1) // 2], "runs_s_per_token": [r["s_per_token"] for r in runs]}


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(doc: dict) -> str:
    m, v, c = doc["machine"], doc["versions"], doc["config"]
    lines = [
        f"## distattr vs Inseq — {MODEL}, {'CPU' if c.get('device', 'cpu') == 'cpu' else c['device']}",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['date']}; torch {v['torch']}, transformers "
        f"{v['transformers']}, inseq {v['inseq']}, distattr {v['distattr']}, Python {v['python']}.",
        f"Workload: {c['prompts']} prompts x {c['new_tokens']} greedy tokens, {c['threads']} torch threads per "
        f"process, inseq batch_size={c['inseq_batch_size'] or 'default'}; time = one `attribute` call "
        "(generation + attribution) after load and warm-up"
        + (f", median of {c['repeats']} runs per tool, the tools alternating." if c.get("repeats", 1) > 1 else "."),
        "",
        "| method | inseq s/token | distattr s/token | speed-up (inseq/distattr) | inseq peak RSS (MiB) "
        "| distattr peak RSS (MiB) | same tokens | max rel. diff | equal |",
        "|---|---:|---:|---:|---:|---:|:---:|---:|:---:|",
    ]
    for row in doc["results"]:
        i, d, chk = row.get("inseq", {}), row.get("distattr", {}), row.get("check") or {}
        lines.append(
            f"| {row['method']} | {_fmt(i.get('s_per_token'), '.4f')} | {_fmt(d.get('s_per_token'), '.4f')} "
            f"| {_fmt(row.get('speedup'), '.1f')}x | {_fmt(i.get('peak_rss_mib'), '.0f')} "
            f"| {_fmt(d.get('peak_rss_mib'), '.0f')} | {'yes' if chk.get('same_tokens') else 'NO'} "
            f"| {_fmt(chk.get('max_rel_diff'), '.1e')} | {'PASS' if row.get('passed') else 'FAIL'} |"
        )
    lines += ["", f"max rel. diff = max over generated-token columns of max|a-b| / L1(inseq column) on the "
              f"L2-over-hidden token matrices; pass threshold {c['tolerance']:g}."]
    return "\n".join(lines)


def _parent(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    doc = {
        "benchmark": "distattr vs inseq", "model": MODEL, "machine": _machine(), "versions": _versions(),
        "config": {"methods": methods, "prompts": args.prompts, "new_tokens": args.new_tokens, "device": args.device,
                   "threads": args.threads, "inseq_batch_size": args.inseq_batch_size, "repeats": args.repeats,
                   "n_steps": args.n_steps if args.n_steps is not None else "method default (50)",
                   "generation_args": generation_args(args.new_tokens), "tolerance": args.tolerance,
                   "prompt_texts": list(PROMPTS[: args.prompts]), "inseq_attn_implementation": "eager"},
        "results": [],
    }
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench_vs_inseq-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for method in methods:
            row = {"method": method}
            runs: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
            for _ in range(args.repeats):  # the tools alternate, so that a slow spell of the machine hits both
                for tool in TOOLS:
                    kept = workdir / f"{tool}-{method}.json"
                    if tool in args.reuse and kept.is_file():  # an earlier run's child output, same settings
                        print(f"[{tool}/{method}] reusing {kept}", file=sys.stderr, flush=True)
                        runs[tool] = [{**json.loads(kept.read_text()), "reused": True}]
                        continue
                    runs[tool].append(_run_child(tool, method, args, workdir))
            for tool in TOOLS:
                row[tool] = _median_run(runs[tool])
            if all("error" not in row[t] for t in TOOLS):
                row["speedup"] = row["inseq"]["s_per_token"] / row["distattr"]["s_per_token"]
                row["check"] = compare(workdir, method)
                chk = row["check"]
                row["passed"] = bool(chk["same_tokens"] and chk["nan_mask_equal"] and chk["columns_compared"] > 0
                                     and chk["max_rel_diff"] <= args.tolerance)
            else:
                row["passed"] = False
            ok &= row["passed"]
            doc["results"].append(row)
    table = markdown(doc)
    print(table)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(f"\nWrote {output}", file=sys.stderr)
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated attribution methods")
    p.add_argument("--prompts", type=int, default=4, help=f"number of built-in prompts (1-{len(PROMPTS)})")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child process")
    p.add_argument("--n-steps", type=int, default=None, help="integrated gradients steps (default: 50 on both)")
    p.add_argument("--inseq-batch-size", type=int, default=1, help="inseq batch_size (0: inseq's default, all)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each tool, alternating; the median is reported")
    p.add_argument("--device", default="cpu", help="where both tools run the model: cpu (default) or cuda[:N]")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max allowed rel. difference")
    p.add_argument("--output", default="results.json", help="JSON file with every number")
    p.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    p.add_argument("--keep", default=None, help="keep the children's outputs in this folder (for --reuse)")
    p.add_argument("--reuse", default="", help="comma-separated tools whose outputs in --keep are reused, e.g. "
                   "inseq when only distattr changed (same machine and settings)")
    p.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must be between 1 and {len(PROMPTS)}")
    if args.new_tokens < 1 or args.threads < 1 or args.inseq_batch_size < 0 or args.repeats < 1:
        p.error("--new-tokens, --threads and --repeats must be >= 1, --inseq-batch-size >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return _child(args) if args.child else _parent(args)


if __name__ == "__main__":
    sys.exit(main())
