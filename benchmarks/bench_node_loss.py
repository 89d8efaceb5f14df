"""A dataset job that loses a Ray node mid-run, against the same job without the loss.

On a simulated cluster (``ray.cluster_utils.Cluster`` on this host: a head without CPUs and two worker nodes with
one CPU and one actor each, tests/multinode.py), ``distattr attribute-dataset`` attributes ``--examples`` prompts
of the embedded SmolLM2-135M (saliency, ``--new-tokens`` generated tokens, units of 2 examples). In the second run
the worker node of one actor is removed (raylet and worker processes killed, as a crashed host) once
``--lose-after`` units are done. Measured from the store's done markers (their file times) and the actors' logs:

* examples/s before the loss (first done marker to the loss) and after it (loss to the last marker), and the
  baseline's rate over the same span;
* seconds to recover: from the loss to the last done marker of the units the lost actor held;
* units computed twice: units started by more than one actor (target: at most the tasks the lost actor held,
  ``in_flight`` = 2);
* wall time of both runs, and whether the store is complete with every example once.

Run from the repository root, as root (the cluster lives in a network namespace with only ``lo``)::

    .venv/bin/python benchmarks/bench_node_loss.py --output benchmarks/results_node_loss.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def done_times(store: str) -> dict[tuple[int, int], float]:
    """(unit, part) -> the Unix time its done marker was written."""
    folder = Path(store) / "done" / "c"
    return {(int(p.parent.name), int(p.name)): p.stat().st_mtime for p in folder.glob("*/*")}


def one_run(work: Path, name: str, examples: int, new_tokens: int, lose_after: int | None) -> dict:
    from bench_dataset import write_prompts
    from multinode import run, started_units

    data, store, logs = work / "prompts.jsonl", str(work / f"{name}.zarr"), work / f"logs-{name}"
    write_prompts(data, examples)
    command = ["--model", "smollm2-135m", "--method", "saliency", "--data", str(data), "--id-field", "id",
               "--max-new-tokens", str(new_tokens), "--store", store, "--unit-size", "2", "--actors", "2",
               "--log-dir", str(logs), "--stall-timeout", "300"]
    events = [{"after_done": lose_after, "after_working": 2, "remove": [1]}] if lose_after else []
    result = run({"nodes": [1, 1], "command": command, "store": store, "logs": str(logs), "events": events})
    (driver,) = result["runs"]
    if driver["returncode"] != 0:
        raise SystemExit(f"{name}: the job failed:\n{driver['stderr'][-3000:]}")
    times = done_times(store)
    started = started_units(logs)
    first, last = min(times.values()), max(times.values())
    out = {"wall_s": round(driver["wall_s"], 1), "units": len(times),
           "complete": "(complete" in driver["stderr"], "units_started_twice": sum(n - 1 for n in started.values()),
           "examples_per_s": round(examples / (last - first), 3)}
    if lose_after:
        lost_at = result["started_at"] + result["events"][0]["t"]
        before = sum(1 for t in times.values() if t <= lost_at) * 2
        after = sum(1 for t in times.values() if t > lost_at) * 2
        redone = [times[k] for k, n in started.items() if n > 1]
        out |= {"lost_at_s": round(lost_at - first, 1),
                "examples_per_s_before": round(before / (lost_at - first), 3),
                "examples_per_s_after": round(after / (last - lost_at), 3),
                "recover_s": round(max(redone) - lost_at, 1) if redone else None,
                "lost_line": next((line for line in driver["stderr"].splitlines() if "was lost" in line), "")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--lose-after", type=int, default=3, help="done units before the node is removed")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    from netns import isolate_network

    if not isolate_network():
        raise SystemExit("run as root on Linux: the cluster must live in a network namespace with only lo")
    import distattr

    distattr.load_model("smollm2-135m", "saliency")  # converts and caches the weights once, outside the timings
    with tempfile.TemporaryDirectory(prefix="nodeloss") as tmp:
        baseline = one_run(Path(tmp), "baseline", args.examples, args.new_tokens, None)
        lost = one_run(Path(tmp), "lost", args.examples, args.new_tokens, args.lose_after)
    import ray
    import torch

    record = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                           "distattr": distattr.__version__},
              "setup": vars(args) | {"output": str(args.output)}, "baseline": baseline, "node_lost": lost}
    print(json.dumps(record, indent=2))
    if args.output:
        args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
