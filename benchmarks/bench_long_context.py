"""Long contexts on the CPU: peak memory of an attribution call against the plan, and speed with and without
block-wise recomputation (issue 16).

Each (length, recompute) point runs in a fresh process: the embedded SmolLM2-135M (float32), a prompt of
``length - generated`` tokens (a repeated paragraph) followed by ``generated`` forced tokens, attributed with
saliency at the plan's token budget (``distattr.planner.plan("smollm2-135m", "cpu=...", method="saliency",
max_length=length, generated=generated, dtype="float32", recompute=...)``). Memory: the resident-set peak of the
attribution call alone (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the call) minus the
resident set before it, against the plan's activations for the device (``plan.devices[0].activations``).

The plan counts the tensors alive at the peak, as ``torch.cuda.max_memory_allocated`` does on a GPU. On the CPU,
glibc's malloc keeps freed blocks below its *dynamic* mmap threshold in the heap (the threshold grows to the size
of the largest block freed, up to 32 MiB), so the resident set also holds freed tensors, like the CUDA caching
allocator's reserved memory. The children therefore run with ``MALLOC_MMAP_THRESHOLD_=131072`` (every block
over 128 KiB is mapped and unmapped on its own, so the resident set follows the live tensors); ``--glibc-default``
measures without it (what a process gets by default: more, and noisier).

Mode ``default`` is a user's run: ``model.attribute(prompt, text)`` with distattr's default token budget and
``recompute="auto"``, glibc's allocator as it comes (the plan shown is ``recompute="auto"`` at the plan's budget,
for reference).

    .venv/bin/python benchmarks/bench_long_context.py --lengths 512,1024,2048,4096,8192 --modes always \\
        --output benchmarks/results_long_context.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

from gpu_check import machine, versions  # benchmarks/ is the script's folder

CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
import distattr
from distattr.planner import plan

length, generated, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model = distattr.load_model("smollm2-135m", "saliency")
paragraph = ("The Eiffel Tower is located in the city of Paris, which is the capital of France and one of the most "
             "visited cities in the world. It was built for the 1889 World's Fair and stands 330 metres tall. ")
ids = model.tokenizer(paragraph * (length // 30 + 2))["input_ids"][:length]
prompt, text = model.tokenizer.decode(ids[: length - generated]), model.tokenizer.decode(ids)
p = plan("smollm2-135m", "cpu=16GiB", None, "saliency", length, generated, dtype="float32",
         recompute="auto" if mode == "default" else mode)


def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak():
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmHWM:")).split()[1]) * 1024


# "default": what a user's attribute(prompt, text) does (its token budget, recompute="auto")
options = dict(show_progress=False) if mode == "default" else dict(token_budget=p.token_budget, recompute=mode,
                                                                    show_progress=False)
model.attribute("Hello there", "Hello there friend", **options)  # warm-up: the same code path, short
before = resident()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = time.perf_counter()
out = model.attribute(prompt, text, **options)
seconds = time.perf_counter() - start
tokens = len(out[0].target_tokens)
print(json.dumps({
    "length": length, "tokens": tokens, "generated": generated, "recompute": mode, "planned_recompute": p.recompute,
    "token_budget": out.info["token_budget"], "planned_token_budget": p.token_budget,
    "rows_per_batch": p.rows_per_batch, "backward_passes": p.backward_passes,
    "recompute_passes": p.recompute_passes,
    "resident_before_bytes": before, "peak_bytes": peak(),
    "measured_bytes": peak() - before, "planned_bytes": p.devices[0].activations,
    "ratio": (peak() - before) / p.devices[0].activations, "seconds": seconds,
    "attributed_tokens_per_s": generated / seconds, "token_steps_per_s": tokens * generated / seconds,
}))
"""


def run_point(length: int, generated: int, mode: str, threads: int, timeout: float, glibc_default: bool) -> dict:
    live = not glibc_default and mode != "default"  # a user's run: the allocator as it comes
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if live else dict(os.environ)
    done = subprocess.run([sys.executable, "-c", CHILD, str(length), str(generated), mode, str(threads)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        return {"length": length, "recompute": mode, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192", help="tokens per example (prompt + generated)")
    parser.add_argument("--generated", type=int, default=4, help="attributed tokens at the end of each example")
    parser.add_argument("--modes", default="always",
                        help="comma-separated: always, never, auto (at the plan's budget), default (a user's run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per point")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    parser.add_argument("--output", default="benchmarks/results_long_context.json")
    args = parser.parse_args()
    results = []
    for mode in args.modes.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            point = run_point(length, args.generated, mode, args.threads, args.timeout, args.glibc_default)
            print(json.dumps(point), flush=True)
            results.append(point)
    record = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "versions": versions(), "generated": args.generated, "threads": args.threads,
              "malloc_mmap_threshold": None if args.glibc_default else 131072, "points": results,
              "finished": time.strftime("%H:%M:%S")}
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
