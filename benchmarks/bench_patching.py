"""Activation patching (ROME's causal tracing) on the embedded SmolLM2-135M (CPU): distattr's batched rows vs a naive
loop, and attribution patching (AtP): its time and its rank agreement with activation patching.

Per fact (the first ``--facts`` of ROME's known facts, ``distattr.casestudies.cat.load_facts``; facts whose subject
is not found in the prompt are skipped): prompt = the fact's prompt, target = the first token of ``" " + true
object``, corruption = Gaussian noise on the subject's tokens (``distattr.methods.patching.subject_span``; std 3 x the
embedding table's std, ``--samples`` draws, seed 0), component ``--component`` (default the residual stream, ROME's
hidden-state trace) with ``--window``, every layer (30) x every prompt position, metric = probability of the target.

* ``distattr``: ``model.attribute(..., method="activation_patching")``: restorations as rows, a row starting at its
  layer and position after the corrupted KV cache, block by block, ``--token-budget`` (speed-only option).
* ``naive``: ROME's ``trace_with_patch`` loop written plainly: for every (layer, position) one full forward of the
  ``--samples`` noised rows (``model(inputs_embeds=...)``, logits at every position) with a forward hook putting
  back the clean output of the component at that position in the window's layers; run on the first
  ``--naive-facts`` facts only (it is the slow part). Its values are compared with distattr's (``max_abs_diff``).
* ``atp``: ``method="attribution_patching"`` with the same arguments; Spearman rank correlation with activation
  patching over the (layer, position) cells from the subject's first token on (the cells before it are 0 in both).

The three run interleaved, fact by fact, after a warm-up fact, so that they share the machine's load (this machine
is shared: absolute times vary with it, ratios much less). Run (repository root)::

    .venv/bin/python benchmarks/bench_patching.py --facts 5 --naive-facts 2       # smoke test
    .venv/bin/python benchmarks/bench_patching.py --facts 100 --naive-facts 10 --output benchmarks/results_patching.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch


def machine() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor() or "unknown"
    return {"cpu": cpu, "nproc": len(os.sched_getaffinity(0)), "platform": platform.platform()}


def versions() -> dict:
    return {pkg: metadata.version(pkg) for pkg in ("distattr", "torch", "transformers")} | {
        "python": platform.python_version()}


def corrupted_embeddings(model, ids: list[int], span: tuple[int, int], samples: int, seed: int,
                         scale: float = 3.0) -> torch.Tensor:
    """ROME's noise as distattr documents it: embeddings + N(0, (scale * std(E))^2) on the span."""
    table = model.get_input_embeddings().weight
    embeds = table[torch.tensor(ids)][None].repeat(samples, 1, 1).clone()
    noise = torch.randn((samples, span[1] - span[0], table.shape[1]), generator=torch.Generator().manual_seed(seed))
    embeds[:, span[0]:span[1]] += noise * scale * float(table.float().std())
    return embeds


def component_module(model, layer: int, component: str):
    from distattr.models.adapters import block_part, block_stack

    block = block_stack(model)[layer]
    return block if component == "residual" else block_part(block, component)


def naive_trace(model, ids: list[int], target: int, span: tuple[int, int], samples: int, seed: int, component: str,
                window: int) -> np.ndarray:
    """``[layers, positions]`` indirect effects, one full forward of the noised rows per (layer, position)."""
    n_layers = model.config.num_hidden_layers
    clean: dict[int, torch.Tensor] = {}
    hooks = [component_module(model, layer, component).register_forward_hook(
        lambda m, a, o, layer=layer: clean.__setitem__(layer, (o[0] if isinstance(o, tuple) else o).detach()))
        for layer in range(n_layers)]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    corrupted = corrupted_embeddings(model, ids, span, samples, seed)
    with torch.no_grad():
        base = model(inputs_embeds=corrupted).logits[:, -1].softmax(-1)[:, target].mean()
    out = np.zeros((n_layers, len(ids)))

    def restore(m: int, p: int):
        def put(module, args, output):
            h = (output[0] if isinstance(output, tuple) else output).clone()
            h[:, p] = clean[m][0, p]
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return put

    for layer in range(n_layers):
        layers = range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))
        for p in range(len(ids)):
            handles = [component_module(model, m, component).register_forward_hook(restore(m, p)) for m in layers]
            try:
                with torch.no_grad():
                    restored = model(inputs_embeds=corrupted).logits[:, -1].softmax(-1)[:, target].mean()
            finally:
                for h in handles:
                    h.remove()
            out[layer, p] = float(restored - base)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def summarize(records: list[dict]) -> dict:
    """Totals over the facts: seconds per fact, speed ratios (sums of times over the same facts), AtP's Spearman."""
    both = [r for r in records if "naive_s" in r]
    summary = {
        "facts": len(records), "naive_facts": len(both),
        "distattr_s_per_fact": statistics.mean(r["distattr_s"] for r in records),
        "atp_s_per_fact": statistics.mean(r["atp_s"] for r in records),
        "atp_speedup_vs_activation_patching": sum(r["distattr_s"] for r in records) / sum(r["atp_s"] for r in records),
        "atp_spearman_mean": statistics.mean(r["atp_spearman"] for r in records),
        "atp_spearman_median": statistics.median(r["atp_spearman"] for r in records),
        "atp_spearman_min": min(r["atp_spearman"] for r in records),
    }
    if both:
        summary.update({
            "naive_s_per_fact": statistics.mean(r["naive_s"] for r in both),
            "distattr_s_per_fact_same_facts": statistics.mean(r["distattr_s"] for r in both),
            "speedup_vs_naive": sum(r["naive_s"] for r in both) / sum(r["distattr_s"] for r in both),
            "speedup_vs_naive_per_fact": [r["naive_s"] / r["distattr_s"] for r in both],
            "atp_speedup_vs_naive": sum(r["naive_s"] for r in both) / sum(r["atp_s"] for r in both),
            "max_abs_diff": max(r["max_abs_diff"] for r in both),
        })
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=5)
    parser.add_argument("--naive-facts", type=int, default=2, help="facts also run with the naive loop")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--component", default="residual")
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--token-budget", type=int, default=512, help="distattr's token_budget (speed only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import distattr
    from distattr.casestudies.cat import load_facts
    from distattr.methods.patching import subject_span

    started = dt.datetime.now(dt.UTC)
    clock = time.perf_counter()
    model = distattr.load_model("smollm2-135m", "activation_patching")
    tokenizer = model.tokenizer
    method_args = {"component": args.component, "window": args.window, "noise_samples": args.samples, "seed": 0,
                   "corruption": "noise"}

    def run(method: str, prompt: str, ids: list[int], target: int, span: tuple[int, int]):
        out = model.attribute(prompt, [ids + [target]], method=method,
                              method_args={**method_args, "corrupt_span": span}, token_budget=args.token_budget,
                              show_progress=False)
        return out.sequences[0].target_attributions[: len(ids), 0, :].T  # [layers, positions]

    facts = []
    for fact in load_facts():
        if len(facts) == args.facts + 1:  # + a warm-up fact
            break
        try:
            span = subject_span(tokenizer, fact.prompt, fact.subject)
        except ValueError:
            continue
        ids = list(tokenizer(fact.prompt)["input_ids"])
        target = tokenizer(" " + fact.true_object, add_special_tokens=False)["input_ids"][0]
        facts.append((fact, ids, target, span))
    warm = facts.pop(0)
    run("activation_patching", warm[0].prompt, *warm[1:])
    run("attribution_patching", warm[0].prompt, *warm[1:])

    records = []
    for i, (fact, ids, target, span) in enumerate(facts):
        record = {"fact_id": fact.fact_id, "prompt": fact.prompt, "tokens": len(ids), "subject_span": list(span)}
        t = time.perf_counter()
        ours = run("activation_patching", fact.prompt, ids, target, span)
        record["distattr_s"] = time.perf_counter() - t
        t = time.perf_counter()
        atp = run("attribution_patching", fact.prompt, ids, target, span)
        record["atp_s"] = time.perf_counter() - t
        record["atp_spearman"] = spearman(ours[:, span[0]:], atp[:, span[0]:])
        if i < args.naive_facts:
            t = time.perf_counter()
            naive = naive_trace(model.model, ids, target, span, args.samples, 0, args.component, args.window)
            record["naive_s"] = time.perf_counter() - t
            record["max_abs_diff"] = float(np.abs(naive - ours).max())
            record["naive_restorations"] = naive.size
        record["restorations_run"] = ours.shape[0] * (len(ids) - span[0])
        records.append(record)
        print(json.dumps(record), flush=True)

    summary = summarize(records)
    report = {"benchmark": "activation patching / attribution patching, ROME known facts", "model": "smollm2-135m",
              "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "versions": versions(),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "load_average_at_end": list(os.getloadavg()),
              "wall_s": time.perf_counter() - clock, "summary": summary, "facts": records}
    print(json.dumps(summary, indent=1))
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
