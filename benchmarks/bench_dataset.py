"""Dataset-scale benchmark: distattr's Ray job against Inseq's ``attribute-dataset``, the Zarr store, the driver.

Parts (``--parts``, default all):

* ``throughput``: attributed tokens per second on the embedded SmolLM2-135M, same data (``--examples`` prompts
  from bench_vs_inseq.PROMPTS, each generating exactly ``--new-tokens`` tokens greedily), same method:
  Inseq 0.7.1's ``attribute-dataset`` command (one process, its default batch of 8, results saved as its JSON
  file; ``--inseq-threads`` torch threads) against ``distattr attribute-dataset`` with 1 and 2 actors (one
  torch thread each) writing a Zarr store. Wall time of the whole command after the model is cached,
  including Ray start and model loading on every side (that is what a user waits for).
* ``store``: synthetic token-level results (``--synthetic`` examples, lengths 8-64 prompt tokens, 32 steps) in
  the two candidate layouts: A, padded arrays chunked by work unit (distattr's layout), and B, flat values +
  offsets with every unit starting on a chunk boundary. Bytes on disk, write rate (uncompressed MB/s from
  numpy to disk), time of a dataset-wide mean (dask over the arrays) and of reading one example.
* ``driver``: the driver's peak RSS for a dataset and one 10x larger (tiny random GPT-2, 2 new tokens), to
  show it does not grow with the data.

Run from the repository root, as root (Ray is started inside a network namespace with only ``lo``)::

    .venv/bin/python benchmarks/bench_dataset.py                # everything, ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_dataset.py --parts store  # one part

Results: markdown on stdout, JSON in ``--output``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def write_prompts(path: Path, n: int) -> list[str]:
    from bench_vs_inseq import PROMPTS

    texts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (#{i})") for i in range(n)]
    path.write_text("".join(json.dumps({"prompt": t, "id": f"p{i}"}) + "\n" for i, t in enumerate(texts)))
    return texts


# ---------------------------------------------------------------- throughput


def run_inseq(data: Path, out: Path, method: str, new_tokens: int, threads: int) -> float:
    from distattr.models.embedded import converted_dir

    code = f"""
import time, torch
torch.set_num_threads({threads})
from inseq.commands.attribute.attribute_args import AttributeExtendedArgs
from inseq.commands.attribute_dataset.attribute_dataset import AttributeDatasetCommand
from inseq.commands.attribute_dataset.attribute_dataset_args import LoadDatasetArgs
gen = {{"max_new_tokens": {new_tokens}, "min_new_tokens": {new_tokens}, "do_sample": False}}
args = AttributeExtendedArgs(model_name_or_path={str(converted_dir("smollm2-135m"))!r}, attribution_method={method!r},
                             device="cpu", generation_kwargs=gen, save_path={str(out)!r}, hide_attributions=True)
data = LoadDatasetArgs(dataset_name="json", dataset_files=[{str(data)!r}], input_text_field="prompt")
t = time.perf_counter()
AttributeDatasetCommand.run((args, data))
print("WALL", time.perf_counter() - t)
"""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=_env(threads), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"inseq failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def run_distattr(data: Path, store: Path, method: str, new_tokens: int, actors: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "distattr", "attribute-dataset", "--data", str(data), "--id-field", "id",
           "--method", method, "--max-new-tokens", str(new_tokens), "--generation-arg",
           f"min_new_tokens={new_tokens}", "--actors", str(actors), "--num-cpus", "1", "--store", str(store),
           "--new-store", "--unit-size", "4", "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=_env(1), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"distattr failed:\n{done.stderr[-3000:]}")
    from distattr.store import open_store

    return wall, open_store(str(store)).provenance["summary"]


def throughput(args, work: Path) -> dict:
    data = work / "prompts.jsonl"
    write_prompts(data, args.examples)
    tokens = args.examples * args.new_tokens
    rows = {}
    wall = run_inseq(data, work / "inseq.json", args.method, args.new_tokens, args.inseq_threads)
    rows["inseq"] = {"wall_s": wall, "tokens_per_s": tokens / wall, "threads": args.inseq_threads}
    for actors in (1, 2):
        wall, summary = run_distattr(data, work / f"run{actors}.zarr", args.method, args.new_tokens, actors)
        rows[f"distattr_{actors}_actor"] = {"wall_s": wall, "tokens_per_s": tokens / wall,
                                            "job_s": summary["wall_s"], "steps": summary["steps"]}
    rows["store_bytes"] = _du(work / "run2.zarr")
    return {"method": args.method, "examples": args.examples, "new_tokens": args.new_tokens, "tokens": tokens,
            **rows}


# ---------------------------------------------------------------- store layouts


def synthetic(n: int, seed: int = 0):
    """Per example: a [T, 32] float32 matrix, NaN above the causal diagonal, T = prompt + 32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for i in range(n):
        prompt = int(rng.integers(8, 65))
        t = prompt + 32
        m = rng.random((t, 32), dtype=np.float32)
        rows = np.arange(t)[:, None]
        m[rows >= prompt + np.arange(32)[None, :]] = np.nan
        yield i, m


def layout_a(path: Path, n: int, unit: int) -> dict:
    import numpy as np
    import zarr
    from zarr.codecs import ZstdCodec

    t_max, steps = 64 + 32, 32
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = g.create_array("target_attributions", shape=(n, t_max, steps), chunks=(unit, t_max, steps),
                         dtype="float32", fill_value=np.nan, compressors=ZstdCodec(level=3))
    lengths = g.create_array("n_target", shape=(n,), chunks=(unit,), dtype="int32", fill_value=-1)
    raw = 0
    started = time.perf_counter()
    block = np.full((unit, t_max, steps), np.nan, np.float32)
    lens = np.full(unit, -1, np.int32)
    for i, m in synthetic(n):
        block[i % unit, : m.shape[0]] = m
        lens[i % unit] = m.shape[0]
        raw += m.nbytes
        if i % unit == unit - 1 or i == n - 1:
            start = i - i % unit
            arr[start : start + unit] = block
            lengths[start : start + unit] = lens
            block[:] = np.nan
            lens[:] = -1
    write_s = time.perf_counter() - started
    return {"write_s": write_s, "raw_mb": raw / 1e6}


def layout_b(path: Path, n: int, unit: int) -> dict:
    import numpy as np
    import zarr
    from zarr.codecs import ZstdCodec

    chunk = unit * (48 + 32) * 32  # values per chunk: a unit of average-length examples
    units = -(-n // unit)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    capacity = units * 2 * chunk  # each unit may use up to 2 chunks (longer than average)
    values = g.create_array("values", shape=(capacity,), chunks=(chunk,), dtype="float32", fill_value=np.nan,
                            compressors=ZstdCodec(level=3))
    offsets = g.create_array("offsets", shape=(n, 2), chunks=(unit, 2), dtype="int64", fill_value=-1)
    shapes = g.create_array("shapes", shape=(n, 2), chunks=(unit, 2), dtype="int32", fill_value=-1)
    raw = 0
    started = time.perf_counter()
    pending = []
    for i, m in synthetic(n):
        pending.append(m)
        raw += m.nbytes
        if len(pending) == unit or i == n - 1:
            u = i // unit
            flat = np.concatenate([p.ravel() for p in pending])
            if flat.size > 2 * chunk:
                raise ValueError("unit larger than its reserved region")
            base = u * 2 * chunk  # units start on chunk boundaries: concurrent writers never share a chunk
            values[base : base + flat.size] = flat
            sizes = np.array([p.size for p in pending])
            starts = base + np.concatenate([[0], np.cumsum(sizes)[:-1]])
            first = u * unit
            offsets[first : first + len(pending)] = np.stack([starts, starts + sizes], axis=1)
            shapes[first : first + len(pending)] = np.array([p.shape for p in pending])
            pending = []
    write_s = time.perf_counter() - started
    return {"write_s": write_s, "raw_mb": raw / 1e6}


def mean_a(path: Path) -> tuple[float, float, float]:
    import dask.array as da
    import zarr

    g = zarr.open_group(str(path), mode="r")
    pick = g["n_target"].shape[0] // 2
    started = time.perf_counter()
    x = da.from_zarr(g["target_attributions"])
    mean = float(da.nanmean(x).compute())
    mean_s = time.perf_counter() - started
    started = time.perf_counter()
    length = int(g["n_target"][pick])
    _ = g["target_attributions"][pick, :length]
    return mean, mean_s, time.perf_counter() - started


def mean_b(path: Path) -> tuple[float, float, float]:
    import dask.array as da
    import zarr

    g = zarr.open_group(str(path), mode="r")
    pick = g["shapes"].shape[0] // 2
    started = time.perf_counter()
    x = da.from_zarr(g["values"])  # padding between units is NaN: a flat nanmean is the dataset mean
    mean = float(da.nanmean(x).compute())
    mean_s = time.perf_counter() - started
    started = time.perf_counter()
    a, b = g["offsets"][pick]
    t, s = g["shapes"][pick]
    _ = g["values"][a:b].reshape(t, s)
    return mean, mean_s, time.perf_counter() - started


def store_layouts(args, work: Path) -> dict:
    import numpy as np

    out = {"examples": args.synthetic, "unit_size": args.unit_size}
    for name, write, read in (("A_padded_by_unit", layout_a, mean_a), ("B_flat_offsets", layout_b, mean_b)):
        path = work / f"{name}.zarr"
        res = write(path, args.synthetic, args.unit_size)
        mean, mean_s, one_s = read(path)
        disk = _du(path)
        out[name] = {**res, "write_mb_per_s": res["raw_mb"] / res["write_s"], "disk_mb": disk / 1e6,
                     "files": sum(len(f) for _, _, f in os.walk(path)), "mean": mean, "mean_s": mean_s,
                     "read_one_s": one_s}
    exact = float(np.nanmean(np.concatenate([m.ravel() for _, m in synthetic(args.synthetic)])))
    out["exact_mean"] = exact
    return out


# ---------------------------------------------------------------- driver memory


def driver_memory(args, work: Path) -> dict:
    from tiny import tiny_model

    folder = work / "tiny-gpt2"
    model, tok = tiny_model("gpt2")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    from test_dist import WORDS as words
    out = {}
    for n in (args.driver_examples, 10 * args.driver_examples):
        data = work / f"tiny-{n}.jsonl"
        data.write_text("".join(json.dumps({"prompt": " ".join(words[i % 9 : i % 9 + 3 + i % 5])}) + "\n"
                                for i in range(n)))
        code = f"""
import resource, sys, time
from distattr.cli import main
t = time.perf_counter()
rc = main(["attribute-dataset", "--model", {str(folder)!r}, "--data", {str(data)!r}, "--max-new-tokens", "2",
           "--store", {str(work / f"tiny-{n}.zarr")!r}, "--new-store", "--actors", "2", "--unit-size", "16", "--quiet"])
print("RSS_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "WALL", time.perf_counter() - t)
sys.exit(rc)
"""
        done = subprocess.run([sys.executable, "-c", code], env=_env(1), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        words_out = done.stdout.split()
        out[str(n)] = {"driver_peak_rss_mib": float(words_out[words_out.index("RSS_MIB") + 1]),
                       "wall_s": float(words_out[words_out.index("WALL") + 1])}
    return out


# ---------------------------------------------------------------- report


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def markdown(doc: dict) -> str:
    lines = [f"Machine: {doc['machine']}; {doc['date']}", ""]
    if "throughput" in doc:
        t = doc["throughput"]
        lines += [f"Throughput, {t['method']}, {t['examples']} prompts x {t['new_tokens']} tokens "
                  f"(SmolLM2-135M, CPU):", "", "| run | wall s | tokens/s | vs Inseq |", "|---|---|---|---|"]
        base = t["inseq"]["tokens_per_s"]
        for key in ("inseq", "distattr_1_actor", "distattr_2_actor"):
            r = t[key]
            lines.append(f"| {key} | {r['wall_s']:.1f} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}x |")
        lines.append("")
    if "store" in doc:
        s = doc["store"]
        lines += [f"Store layouts, {s['examples']} synthetic examples (8-64 prompt tokens, 32 steps), "
                  f"units of {s['unit_size']}:", "",
                  "| layout | disk MB | files | write MB/s | dataset mean s | one example s |",
                  "|---|---|---|---|---|---|"]
        for key in ("A_padded_by_unit", "B_flat_offsets"):
            r = s[key]
            lines.append(f"| {key} | {r['disk_mb']:.1f} | {r['files']} | {r['write_mb_per_s']:.0f} | "
                         f"{r['mean_s']:.2f} | {r['read_one_s'] * 1000:.1f} ms |")
        lines.append("")
    if "driver" in doc:
        lines += ["Driver peak RSS (tiny GPT-2, 2 actors):", "", "| examples | peak RSS MiB | wall s |",
                  "|---|---|---|"]
        for n, r in doc["driver"].items():
            lines.append(f"| {n} | {r['driver_peak_rss_mib']:.0f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["throughput", "store", "driver"])
    p.add_argument("--method", default="saliency")
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--inseq-threads", type=int, default=2)
    p.add_argument("--synthetic", type=int, default=10_000)
    p.add_argument("--unit-size", type=int, default=16)
    p.add_argument("--driver-examples", type=int, default=200)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results_dataset.json"))
    args = p.parse_args(argv)
    from netns import isolate_network

    if not isolate_network():
        print("warning: not isolated in a network namespace (run as root on Linux); Ray may bind the machine's "
              "address", file=sys.stderr)
    doc = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes")}
    work = Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    try:
        if "store" in args.parts:
            doc["store"] = store_layouts(args, work)
        if "driver" in args.parts:
            doc["driver"] = driver_memory(args, work)
        if "throughput" in args.parts:
            doc["throughput"] = throughput(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.output).write_text(json.dumps(doc, indent=2))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
