"""Attribution with the model spread over devices (accelerate device maps) on a GPU machine: time per attributed
token and agreement with a single-device run.

Placements, each loaded in turn in this process (``--placements`` picks some):

* ``single``: the whole model on ``cuda:0`` (``device_map={"": 0}``): the reference.
* ``gpu+cpu``: one GPU plus CPU offload. ``device_map="auto"`` with ``max_memory={0: (1 - share) x the weights,
  "cpu": ...}`` (``--offload-share``, default 0.5): accelerate keeps the first modules on the GPU and offloads
  the rest to CPU memory; offloaded layers are copied to the GPU when they run (forward and backward).
* ``multi-gpu``: ``device_map="balanced"`` over every visible GPU (only with two or more): layers run one GPU
  after another, the activations and their gradients cross devices.

Every placement attributes the same prompts with the same targets (the single-device run's greedy
continuations, given as ``generated_texts``), after a small warm-up. Reported per placement: seconds per
attributed token (one ``attribute`` call over all prompts, generation excluded), peak GPU memory per device
(``torch.cuda.max_memory_allocated``), where accelerate put the modules, and ``max |a - b| / L1(a)`` over every
generated-token column against the single-device matrices (threshold ``--tolerance``).

Run (from the repository root, with the project's virtualenv)::

    .venv/bin/python benchmarks/bench_device_map_gpu.py --output device_map_gpu.json
    .venv/bin/python benchmarks/bench_device_map_gpu.py --model meta-llama/Llama-3.1-8B --dtype bfloat16 \\
        --methods saliency --prompts 2 --new-tokens 16 --tolerance 2e-2

On a machine without CUDA it exits with status 2 and a message; ``--cpu-smoke`` instead runs the same flow on
the CPU (main device ``cpu``, offload to ``disk``), which only checks that the script works. The exit status
is 1 when a placement's numbers differ beyond the tolerance.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPTS = (
    "The Eiffel Tower is located in the city of",
    "The capital of Italy is",
    "In 1969 the first man to walk on the Moon was",
    "The chemical symbol of gold is",
)


def max_column_difference(want: np.ndarray, got: np.ndarray) -> float:
    """``max |a - b| / L1(a)`` over the generated-token columns (NaN cells, the future tokens, must coincide)."""
    if want.shape != got.shape or not np.array_equal(np.isnan(want), np.isnan(got)):
        return float("inf")
    a, b = np.nan_to_num(want), np.nan_to_num(got)
    l1 = np.abs(a).sum(0).clip(min=1e-30)
    return float((np.abs(a - b) / l1).max())


def _placements(args: argparse.Namespace, main: str, offload: str, offload_dir: str) -> dict[str, dict]:
    """``{name: load_model keyword arguments}`` for the placements this machine supports."""
    import torch

    gpus = torch.cuda.device_count() if main.startswith("cuda") else 0
    main_key = 0 if gpus else "cpu"
    found = {"single": {"device_map": {"": main}}}
    found["gpu+cpu"] = {"device_map": "auto", "offload_share": args.offload_share, "main_key": main_key,
                        "offload": offload}
    if gpus >= 2:
        found["multi-gpu"] = {"device_map": "balanced"}
    if offload == "disk":
        for spec in found.values():
            spec["model_kwargs"] = {"offload_folder": offload_dir}
    wanted = [p for p in args.placements.split(",") if p]
    unknown = sorted(set(wanted) - {"single", "gpu+cpu", "multi-gpu"})
    if unknown:
        raise SystemExit(f"unknown placement(s) {unknown}; choose from single, gpu+cpu, multi-gpu")
    return {name: spec for name, spec in found.items() if name in wanted or name == "single"}


def _load(args: argparse.Namespace, method: str, spec: dict, weight_bytes: int | None):
    import distattr

    kwargs = {k: v for k, v in spec.items() if k in ("device_map", "model_kwargs")}
    if "offload_share" in spec:  # keep (1 - share) of the weights on the main device, offload the rest
        kwargs["max_memory"] = {spec["main_key"]: int(weight_bytes * (1 - spec["offload_share"]))}
        if spec["offload"] == "cpu":
            kwargs["max_memory"]["cpu"] = "1TiB"  # (with "cpu" as main device the rest goes to disk)
    method_args = {"n_steps": args.n_steps} if method.endswith("integrated_gradients") and args.n_steps else {}
    return distattr.load_model(args.model, method, dtype=args.dtype, quantization=args.quantization, **kwargs,
                               **method_args)


def _free(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict:
    import torch

    from distattr.models.quantization import weight_bytes

    main, offload = ("cpu", "disk") if args.cpu_smoke else ("cuda:0", "cpu")
    prompts = list(PROMPTS[: args.prompts])
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    results = []
    with tempfile.TemporaryDirectory() as offload_dir:
        placements = _placements(args, main, offload, offload_dir)
        for method in args.methods.split(","):
            reference, texts, size = None, None, None
            for name, spec in placements.items():
                if torch.cuda.is_available():
                    for i in range(torch.cuda.device_count()):
                        torch.cuda.reset_peak_memory_stats(i)
                started = time.perf_counter()
                model = _load(args, method, spec, size)
                loaded_s = time.perf_counter() - started
                size = size or weight_bytes(model.model)
                if texts is None:  # the single-device run picks the targets every placement attributes
                    texts = model.attribute(prompts, generation_args=gen, show_progress=False).info["generated_texts"]
                model.attribute(prompts[0], texts[0], attr_pos_end=-max(1, args.new_tokens - 2),
                                show_progress=False)  # warm-up
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                started = time.perf_counter()
                out = model.attribute(prompts, texts, show_progress=False)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                tokens = sum(s.attr_pos_end - s.attr_pos_start for s in out.sequences)
                matrices = [s.target_attributions for s in out.sequences]
                if reference is None:
                    reference = matrices
                diff = max(max_column_difference(a, b) for a, b in zip(reference, matrices, strict=True))
                placed = out.info.get("device_map") or {"": str(model.adapter.input_device)}
                row = {
                    "method": method, "placement": name, "load_s": round(loaded_s, 2),
                    "s_per_token": seconds / tokens, "tokens": tokens, "max_rel_diff": diff,
                    "equal": diff <= args.tolerance,
                    "modules_per_device": {str(d): sum(1 for v in placed.values() if v == d)
                                           for d in dict.fromkeys(placed.values())},
                    "peak_gpu_mib": [round(torch.cuda.max_memory_allocated(i) / 2**20)
                                     for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
                }
                results.append(row)
                print(json.dumps(row), flush=True)
                _free(model)
    return {"results": results, "config": vars(args), "machine": _machine(), "date": dt.datetime.now(dt.UTC)
            .strftime("%Y-%m-%d %H:%M UTC")}


def _machine() -> dict:
    import torch
    import transformers

    import distattr

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "distattr": distattr.__version__, "gpus": gpus, "cpu": platform.processor() or platform.machine()}


def markdown(doc: dict) -> str:
    lines = ["| method | placement | modules per device | s/token | peak GPU MiB | max rel. diff | equal |",
             "|---|---|---|---:|---|---:|:---:|"]
    for r in doc["results"]:
        devices = ", ".join(f"{d}: {n}" for d, n in r["modules_per_device"].items())
        peaks = " / ".join(map(str, r["peak_gpu_mib"])) or "-"
        lines.append(f"| {r['method']} | {r['placement']} | {devices} | {r['s_per_token']:.4f} | {peaks} | "
                     f"{r['max_rel_diff']:.1e} | {'PASS' if r['equal'] else 'FAIL'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name, hub id or folder (default: %(default)s)")
    p.add_argument("--methods", default="saliency,integrated_gradients", help="comma-separated methods")
    p.add_argument("--placements", default="single,gpu+cpu,multi-gpu",
                   help="comma-separated: single (always run, the reference), gpu+cpu, multi-gpu (2+ GPUs)")
    p.add_argument("--prompts", type=int, default=2, help=f"number of built-in prompts (1-{len(PROMPTS)})")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per prompt")
    p.add_argument("--n-steps", type=int, default=16, help="integrated gradients steps")
    p.add_argument("--dtype", default="float32", help="model dtype (default: %(default)s)")
    p.add_argument("--quantization", choices=("nf4", "int8"), default=None, help="bitsandbytes quantization")
    p.add_argument("--offload-share", type=float, default=0.5,
                   help="gpu+cpu: share of the weights offloaded to the CPU (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max allowed relative column difference")
    p.add_argument("--output", default=None, help="write every number to this JSON file")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: run the same flow on the CPU with disk offload (checks the script, not GPUs)")
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS) or args.new_tokens < 2 or not 0 < args.offload_share < 1:
        p.error("need 1 <= --prompts <= 4, --new-tokens >= 2 and 0 < --offload-share < 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(f"bench_device_map_gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none on this machine. "
              "The CPU versions of these checks (CPU device maps, disk offload) are tests/test_device_map.py; "
              "--cpu-smoke runs this script's flow on the CPU.", file=sys.stderr)
        return 2
    doc = run(args)
    print(markdown(doc))
    if args.output:
        Path(args.output).write_text(json.dumps(doc, indent=2))
    return 0 if all(r["equal"] for r in doc["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
