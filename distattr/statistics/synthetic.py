"""Synthetic distattr stores of any size, written in whole slabs of units (no model, no per-example objects).

For benchmarks and tests of the dataset-wide statistics: decoder-only results with the store's real layout
(:mod:`distattr.store.layout`), random prompt lengths, a fixed number of generated steps, and attributions whose
recency bias varies per example (so position profiles, entropies and correlations have something to show).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..store.io import create
from ..store.layout import STATUS_EMPTY, STATUS_OK, Schema

TOPICS = ("science", "sports", "politics", "art")


@dataclass(frozen=True)
class SyntheticStore:
    """What :func:`write_synthetic_store` wrote: the store's URL and each example's (dataset order) hidden
    ``focus`` (the strength of its recency bias), a ground truth to correlate summaries with."""

    url: str
    n_examples: int
    focus: np.ndarray  # [n_examples] float64


def write_synthetic_store(url: str, n_examples: int, *, seed: int = 0, prompt: tuple[int, int] = (8, 64),
                          steps: int = 32, dims: tuple[tuple[str, int], ...] = (), vocab: int = 5000,
                          unit_size: int = 16, steps_chunk: int = 64, slab_units: int = 64,
                          overwrite: bool = False) -> SyntheticStore:
    """Write a complete decoder-only store of ``n_examples`` synthetic examples.

    Example ``i`` has a prompt of ``prompt[0]..prompt[1]`` tokens (uniform) and ``steps`` generated tokens; its
    matrix ``[prompt + steps, steps, *dims]`` is ``Exp(1) * (1 + focus_i * exp(-distance / 4))`` below the causal
    diagonal (``distance`` = explained position - token position), NaN elsewhere, with ``focus_i ~ U(0, 8)``.
    Within each slab of ``slab_units`` units, examples are placed in slots sorted by prompt length (as the
    planner does), so slot order differs from dataset order. Metadata: ``text``, ``generated_text`` and a
    ``topic`` from :data:`TOPICS`; one step score, ``probability``.
    """
    lo, hi = prompt
    if not 1 <= lo <= hi or steps < 1 or n_examples < 1:
        raise ValueError(f"need 1 <= prompt[0] <= prompt[1], steps >= 1 and n_examples >= 1; got prompt={prompt}, "
                         f"steps={steps}, n_examples={n_examples}")
    dim_names = tuple(name for name, _ in dims)
    dim_sizes = tuple(int(size) for _, size in dims)
    schema = Schema(n_units=-(-n_examples // unit_size), unit_size=unit_size, max_source=hi, max_target=hi + steps,
                    max_steps=steps, steps_chunk=min(steps_chunk, steps), source_attributions=False,
                    target_attributions=True, dims=dim_names, dim_sizes=dim_sizes,
                    dim_labels=tuple(tuple(f"{name}{j}" for j in range(size)) for name, size in dims),
                    step_scores=("probability",))
    identity = {"model": "synthetic", "method": "synthetic", "method_args": {"seed": seed}, "n_examples": n_examples,
                "source": "write_synthetic_store"}
    group = create(url, schema, identity, {"model": {"model_name": "synthetic"}}, overwrite=overwrite,
                   unit_parts=[1] * schema.n_units)
    focus = np.empty(n_examples)
    slab = slab_units * unit_size
    for base in range(0, schema.n_slots, slab):
        count = min(slab, n_examples - base)
        if count <= 0:
            break
        rng = np.random.default_rng([seed, base])
        blocks, slab_focus = _slab(schema, rng, base, count, slab, lo, vocab)
        focus[base : base + count] = slab_focus
        rows = slice(base, base + min(slab, schema.n_slots - base))
        for name, block in blocks.items():
            group[name][rows] = block[: rows.stop - rows.start]
        group["done"][base // unit_size : rows.stop // unit_size, 0] = 1
    group.attrs.update({"status": "complete"})
    return SyntheticStore(url=str(url), n_examples=n_examples, focus=focus)


def _slab(schema: Schema, rng: np.random.Generator, base: int, count: int, slab: int, min_prompt: int, vocab: int):
    """The arrays of one slab (``slab`` slots, the first ``count`` used) and its examples' focus values (examples
    ``base .. base + count`` in dataset order)."""
    s_max, t_max, k = schema.max_source, schema.max_target, schema.max_steps
    prompts = rng.integers(min_prompt, s_max + 1, size=count)
    focus = rng.uniform(0.0, 8.0, size=count)
    order = np.argsort(prompts, kind="stable")  # slot j holds example base + order[j]
    p = prompts[order]
    ids = rng.integers(4, vocab, size=(count, t_max)).astype(np.int32)
    n_target = p + k
    positions = np.arange(t_max)
    ids[positions[None, :] >= n_target[:, None]] = -1

    rows = positions[None, :, None]
    explained = p[:, None, None] + np.arange(k)[None, None, :]  # [count, 1, k]
    distance = (explained - rows).astype(np.float32)
    weight = 1.0 + focus[order][:, None, None] * np.exp(-distance / 4.0)
    values = rng.exponential(1.0, size=(count, t_max, k)).astype(np.float32) * weight.astype(np.float32)
    values[distance <= 0] = np.nan
    if schema.dim_sizes:
        scale = rng.uniform(0.5, 1.5, size=(count, 1, 1, *schema.dim_sizes)).astype(np.float32)
        values = values[(..., *([None] * len(schema.dim_sizes)))] * scale

    tokens = np.where(ids >= 0, np.char.add("w", ids.astype(str)), "").astype(object)
    meta = np.empty(slab, dtype=object)
    meta[:] = ""
    for j in range(count):
        words = tokens[j, : n_target[j]]
        meta[j] = json.dumps({"text": " ".join(words[: p[j]]), "generated_text": " ".join(words[p[j]:]),
                              "topic": TOPICS[(base + order[j]) % len(TOPICS)]})

    def padded(array, fill, dtype=None):
        out = np.full((slab, *array.shape[1:]), fill, dtype=dtype or array.dtype)
        out[:count] = array
        return out

    blocks = {
        "example_index": padded(base + order, -1, np.int64),
        "example_id": padded(np.array([f"ex-{base + i:07d}" for i in order], dtype=object), ""),
        "status": padded(np.full(count, STATUS_OK, np.int8), STATUS_EMPTY),
        "meta": meta,
        "n_source": padded(p.astype(np.int32), -1), "n_target": padded(n_target.astype(np.int32), -1),
        "attr_pos_start": padded(p.astype(np.int32), -1), "attr_pos_end": padded(n_target.astype(np.int32), -1),
        "source_ids": padded(np.where(positions[None, :s_max] < p[:, None], ids[:, :s_max], -1), -1),
        "source_tokens": padded(np.where(positions[None, :s_max] < p[:, None], tokens[:, :s_max], ""), ""),
        "target_ids": padded(ids, -1), "target_tokens": padded(tokens, ""),
        "target_attributions": padded(values, np.nan),
        "score_probability": padded(rng.uniform(0.05, 1.0, size=(count, k)).astype(np.float32), np.nan),
    }
    return blocks, focus
