"""Value zeroing: distattr vs Inseq 0.7.1 on the embedded SmolLM2-135M (CPU), one prompt.

Inseq 0.7.1's value zeroing crashes on Llama-family models with transformers 5 (its block-output patching hook
expects a tuple); it runs here with that one hook fixed (``tests/test_value_zeroing.py::fixed_inseq``), which
does not change its cost. Both tools explain the same prompt (``PROMPTS[0]`` of ``bench_vs_inseq.py``) with the
same greedy generation (``--new-tokens``, default 8), after a warm-up call; the runs alternate between the tools
(``--repeats`` each) and the medians are reported:

* ``end_to_end_s``: one ``attribute`` call including generation (as ``bench_vs_inseq.py`` times it);
* ``attribution_s``: one ``attribute`` call on the already generated text (constrained, no generation).

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_value_zeroing.py --threads 2``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from bench_vs_inseq import MODEL, PROMPTS, WARMUP_PROMPT, generation_args  # noqa: E402
from inseq_compat import value_zeroing_hook_factory  # noqa: E402


def fix_inseq_value_zeroing() -> None:
    """Let Inseq's state-patching hook handle blocks that return a tensor (transformers 5)."""
    from inseq.attr.feat.ops.value_zeroing import ValueZeroing

    ValueZeroing.get_states_extract_and_patch_hook = value_zeroing_hook_factory(
        ValueZeroing.get_states_extract_and_patch_hook)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("inseq").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    import inseq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import distattr
    from distattr.models.embedded import converted_dir

    fix_inseq_value_zeroing()
    folder = converted_dir(MODEL)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    theirs = inseq.load_model(model, "value_zeroing", tokenizer=AutoTokenizer.from_pretrained(folder))
    ours = distattr.load_model(MODEL, "value_zeroing")
    prompt, gen = PROMPTS[0], generation_args(args.new_tokens)

    def run_inseq(generated=None):
        kw = {"generation_args": dict(gen)} if generated is None else {}
        out = theirs.attribute([prompt], generated, batch_size=1, show_progress=False, **kw)
        return out.sequence_attributions[0].target_attributions.float().numpy()

    def run_ours(generated=None):
        out = ours.attribute(prompt, generated, generation_args=None if generated else dict(gen), show_progress=False)
        return out[0].target_attributions, out.info["generated_texts"]

    theirs.attribute([WARMUP_PROMPT], generation_args=generation_args(2), batch_size=1, show_progress=False)
    ours.attribute(WARMUP_PROMPT, generation_args=generation_args(2), show_progress=False)
    times: dict[str, list[float]] = {k: [] for k in ("inseq_end_to_end", "distattr_end_to_end",
                                                      "inseq_attribution", "distattr_attribution")}
    generated = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_inseq()
        times["inseq_end_to_end"].append(time.perf_counter() - start)
        start = time.perf_counter()
        _, generated = run_ours()
        times["distattr_end_to_end"].append(time.perf_counter() - start)
    for _ in range(args.repeats):
        start = time.perf_counter()
        inseq_matrix = run_inseq(generated)
        times["inseq_attribution"].append(time.perf_counter() - start)
        start = time.perf_counter()
        our_matrix, _ = run_ours(generated)
        times["distattr_attribution"].append(time.perf_counter() - start)
    print(json.dumps(times))
    medians = {k: statistics.median(v) for k, v in times.items()}
    same_shape = inseq_matrix.shape == our_matrix.shape
    report = {
        "model": MODEL, "threads": torch.get_num_threads(), "prompt": prompt, "new_tokens": args.new_tokens,
        "tokens": int(our_matrix.shape[0]), "repeats": args.repeats, "times_s": times, "median_s": medians,
        "speedup_end_to_end": medians["inseq_end_to_end"] / medians["distattr_end_to_end"],
        "speedup_attribution": medians["inseq_attribution"] / medians["distattr_attribution"],
        "max_abs_diff": float(np.nanmax(np.abs(inseq_matrix - our_matrix))) if same_shape else None,
        "versions": {"torch": torch.__version__, "inseq": version("inseq"), "transformers": version("transformers")},
    }
    print(json.dumps(report, indent=1))
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
