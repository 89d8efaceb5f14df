"""Faithfulness of generation attributions: comprehensiveness, sufficiency and AOPC (ERASER, DeYoung et al. 2020),
adapted to generation: every explained step is one prediction.

Step ``c`` of an example explains target position ``t`` (token ``y``). Its *candidates* are the context tokens
that have a score for that step and are not special tokens (BOS, EOS, UNK, PAD, the decoder-start token): decoder
tokens before ``t`` and, for encoder-decoder models, the encoder tokens. They are ranked by score (``rank``:
``"abs"`` = ``|A|`` averaged over extra dims, ``"signed"`` = ``A`` averaged, or ``"random"``, a seeded random
order: the usual reference). For each fraction ``f`` the top ``k = ceil(f * candidates)`` are *removed*:

* ``mode="replace"`` (default): replaced by the baseline token of the attribution methods (UNK, else PAD or EOS);
  positions stay as they are;
* ``mode="delete"``: dropped from the sequence (later tokens move left; a decoder-only prefix left empty becomes
  the single baseline token).

``comprehensiveness(f) = p(y | x) - p(y | x without the top k)``, ``sufficiency(f) = p(y | x) - p(y | x with
only the top k candidates)`` (non-candidates stay), ``p`` the model's next-token probability at ``t``. AOPC is
the mean over the fractions (ERASER's aggregate over bins). Higher comprehensiveness and lower sufficiency mean a
more faithful ranking. An example's value is the mean over its steps; the dataset's the mean over examples.

Every (step, fraction, removal) is one no-grad forward row over the step's prefix; rows of ``batch_size``
examples at a time are packed under the model's token budget by the engine's batching
(:func:`distattr.methods.base.forward_rows`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..store.reader import Store
from .chunks import Condition, check_select, selection

MODES = ("replace", "delete")
RANKS = ("abs", "signed", "random")


@dataclass(frozen=True)
class Faithfulness:
    """Per-step values (long table), per-example means and the dataset means of one run."""

    fractions: tuple[float, ...]
    mode: str
    rank: str
    steps: object  # pandas DataFrame: example_index, example_id, step, candidates, p_full, then per fraction
    examples: object  # pandas DataFrame: per example, means over its steps

    def summary(self):
        """Dataset means (over examples) per fraction, and the AOPC row (``fraction`` NaN)."""
        import pandas as pd

        rows = []
        for f in self.fractions:
            rows.append({"fraction": f, "comprehensiveness": self.examples[f"comprehensiveness_{f:g}"].mean(),
                         "sufficiency": self.examples[f"sufficiency_{f:g}"].mean()})
        rows.append({"fraction": np.nan, "comprehensiveness": self.examples["aopc_comprehensiveness"].mean(),
                     "sufficiency": self.examples["aopc_sufficiency"].mean()})
        table = pd.DataFrame(rows)
        table.insert(0, "metric", [f"at {f:g}" for f in self.fractions] + ["AOPC"])
        table["examples"] = len(self.examples)
        return table


@dataclass(frozen=True)
class _Step:
    """One explained step: its target, prefix and source ids, and its candidates ranked best first."""

    example: int  # position in the batch
    step: int
    target: int
    decoder: np.ndarray  # [t] decoder ids before the target
    source: np.ndarray | None
    ranked: tuple[tuple[str, int], ...]  # ("source" | "target", position), best first


def faithfulness(store: Store, model, *, fractions: Sequence[float] = (0.1, 0.2, 0.5), mode: str = "replace",
                 rank: str = "abs", where: Sequence[Condition | str] = (), select: Mapping[str, int] | None = None,
                 limit: int | None = None, seed: int = 0, batch_size: int = 8, token_budget: int | None = None,
                 check_model: bool = True, on_progress: Callable[[int, int], None] | None = None) -> Faithfulness:
    """Comprehensiveness, sufficiency and AOPC (module docstring) of the store's attributions on ``model`` (a
    :class:`~distattr.api.AttributionModel`, the model that produced the store), for the first ``limit``
    examples (dataset order) that pass ``where``."""
    import pandas as pd

    fractions = tuple(float(f) for f in fractions)
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1], got {list(fractions)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if rank not in RANKS:
        raise ValueError(f"unknown rank {rank!r}; use one of {', '.join(RANKS)}")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError("batch_size and limit must be at least 1")
    if check_model:
        _check_model(store, model)
    select = check_select(store, select)
    keep = selection(store, where)
    index = store.group["example_index"][:]
    order = np.sort(index[keep])
    if limit is not None:
        order = order[:limit]
    request = _request(model, token_budget)
    enc_dec = model.is_encoder_decoder
    baseline = _baseline_id(model.tokenizer)
    special = frozenset(int(i) for i in model.tokenizer.all_special_ids)
    rng = np.random.default_rng(seed)
    records = []
    for first in range(0, len(order), batch_size):
        batch = [store[int(i)] for i in order[first : first + batch_size]]
        seqs = [out.sequences[0] for out in batch]
        full = _full_probabilities(request, seqs, enc_dec)
        steps = [s for j, seq in enumerate(seqs) for s in _steps(j, seq, enc_dec, select, rank, special, rng)]
        removed = _removal_probabilities(request, steps, fractions, mode, baseline)
        for s, (comp, suff, counts) in zip(steps, removed, strict=True):
            info = batch[s.example].info
            p = full[s.example][s.step]
            row = {"example_index": info["example_index"], "example_id": info["example_id"], "step": s.step,
                   "candidates": len(s.ranked), "p_full": p}
            for f, c, u, k in zip(fractions, comp, suff, counts, strict=True):
                row[f"k_{f:g}"] = k
                row[f"comprehensiveness_{f:g}"] = p - c if k else np.nan
                row[f"sufficiency_{f:g}"] = p - u if k else np.nan
            records.append(row)
        if on_progress is not None:
            on_progress(min(first + batch_size, len(order)), len(order))
    steps_table = pd.DataFrame(records)
    return Faithfulness(fractions=fractions, mode=mode, rank=rank, steps=steps_table,
                        examples=_per_example(steps_table, fractions))


def _per_example(steps, fractions: tuple[float, ...]):
    import pandas as pd

    if steps.empty:
        return pd.DataFrame(columns=["example_index", "example_id", "steps", "aopc_comprehensiveness",
                                     "aopc_sufficiency"])
    comp = [f"comprehensiveness_{f:g}" for f in fractions]
    suff = [f"sufficiency_{f:g}" for f in fractions]
    steps = steps.assign(aopc_comprehensiveness=steps[comp].mean(axis=1), aopc_sufficiency=steps[suff].mean(axis=1))
    grouped = steps.groupby(["example_index", "example_id"], sort=True)
    table = grouped[["p_full", *comp, *suff, "aopc_comprehensiveness", "aopc_sufficiency"]].mean()
    table.insert(0, "steps", grouped.size())
    return table.reset_index()


def _check_model(store: Store, model) -> None:
    from ..models.loading import describe

    stored = store.identity.get("model_config_hash") or store.provenance.get("model", {}).get("model_config_hash")
    loaded = describe(model.loaded)["model_config_hash"]
    if stored and stored != loaded:  # the hash also covers the load path, so the same weights moved differ too
        warnings.warn(f"the model's config hash {loaded} differs from the store's {stored} "
                      f"({store.identity.get('model')!r}): check that this is the model that wrote the store",
                      stacklevel=3)
    vocab = model.model.get_input_embeddings().weight.shape[0]
    for name in ("target_ids", "source_ids"):
        if int(np.max(store.group[name][: min(4096, store.schema.n_slots)])) >= vocab:
            raise ValueError(f"the store's token ids exceed this model's vocabulary of {vocab}: not its model")


def _request(model, token_budget: int | None):
    from ..methods.base import Request
    from ..planner import token_budget_for

    budget = token_budget or token_budget_for(model.model)
    return Request(adapter=model.adapter, examples=[], target_fn=None, attribute_target=True, token_budget=budget)


def _baseline_id(tokenizer) -> int:
    from ..engine import unk_id

    return unk_id(tokenizer)


def _probabilities(request, rows: list[tuple], targets: list[np.ndarray]) -> list[np.ndarray]:
    """``p(target)`` at the scored positions of each id row ``(decoder ids, encoder ids or None, positions)``."""
    from ..methods.base import forward_rows

    device = request.adapter.input_device
    tensors = [(torch.as_tensor(d, dtype=torch.long, device=device),
                None if s is None else torch.as_tensor(s, dtype=torch.long, device=device),
                torch.as_tensor(p, dtype=torch.long, device=device)) for d, s, p in rows]
    wanted = [torch.as_tensor(t, dtype=torch.long, device=device) for t in targets]

    def reduce(logits: torch.Tensor, chunk: list[int]) -> torch.Tensor:
        picks = torch.cat([wanted[r] for r in chunk])
        return torch.softmax(logits.float(), dim=-1).gather(1, picks[:, None].to(logits.device))[:, 0]

    values = forward_rows(request, tensors, reduce).cpu().numpy().astype(np.float64)
    return np.split(values, np.cumsum([len(t) for t in targets])[:-1])


def _full_probabilities(request, seqs, enc_dec: bool) -> list[np.ndarray]:
    """``[n_steps]`` probabilities of each example's explained tokens on its unchanged sequence."""
    rows, targets = [], []
    for seq in seqs:
        ids = np.asarray(seq.target_ids)
        start, end = seq.attr_pos_start, seq.attr_pos_end
        rows.append((ids[: end - 1], np.asarray(seq.source_ids) if enc_dec else None, np.arange(start - 1, end - 1)))
        targets.append(ids[start:end])
    return _probabilities(request, rows, targets)


def _steps(j: int, seq, enc_dec: bool, select: Mapping[str, int], rank: str, special: frozenset[int],
           rng: np.random.Generator) -> list[_Step]:
    """The explained steps of one example with their ranked candidates."""
    dims = tuple(seq.dims)
    index = tuple(select.get(d, slice(None)) for d in dims)
    target_ids = np.asarray(seq.target_ids)
    source_ids = np.asarray(seq.source_ids)

    def scores(matrix: np.ndarray | None, c: int) -> np.ndarray | None:
        if matrix is None:
            return None
        column = matrix[:, c][(slice(None), *index)] if dims else matrix[:, c]
        column = column.reshape(len(column), -1)
        values = np.abs(column) if rank == "abs" else column
        finite = ~np.isnan(values)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(finite.any(axis=1), np.where(finite, values, 0).sum(axis=1) / finite.sum(axis=1), np.nan)

    out = []
    for c in range(seq.attr_pos_end - seq.attr_pos_start):
        t = seq.attr_pos_start + c
        entries = []
        src_scores, tgt_scores = scores(seq.source_attributions, c), scores(seq.target_attributions, c)
        if src_scores is not None:
            entries += [("source", r, src_scores[r]) for r in range(len(source_ids))
                        if not np.isnan(src_scores[r]) and int(source_ids[r]) not in special]
        if tgt_scores is not None:
            first = 1 if enc_dec else 0  # the decoder-start token
            entries += [("target", r, tgt_scores[r]) for r in range(first, t)
                        if not np.isnan(tgt_scores[r]) and int(target_ids[r]) not in special]
        if rank == "random":
            ranked = [entries[i] for i in rng.permutation(len(entries))]
        else:
            ranked = sorted(entries, key=lambda e: -e[2])  # stable: ties keep sequence order
        out.append(_Step(example=j, step=c, target=int(target_ids[t]), decoder=target_ids[:t],
                         source=source_ids if enc_dec else None,
                         ranked=tuple((side, r) for side, r, _ in ranked)))
    return out


def _removal_probabilities(request, steps: list[_Step], fractions: tuple[float, ...], mode: str, baseline: int):
    """Per step: ``p(y)`` with the top k removed and with only the top k kept, per fraction, and the k's."""
    rows, targets, layout = [], [], []
    for s in steps:
        ks = [math.ceil(f * len(s.ranked) - 1e-9) for f in fractions]
        for k in ks:
            if k == 0:
                continue
            top = set(s.ranked[:k])
            rest = set(s.ranked[k:])
            for removed in (top, rest):
                decoder, source = _remove(s, removed, mode, baseline)
                rows.append((decoder, source, np.array([len(decoder) - 1])))
                targets.append(np.array([s.target]))
        layout.append(ks)
    values = iter(_probabilities(request, rows, targets)) if rows else iter(())
    out = []
    for ks in layout:
        comp, suff = [], []
        for k in ks:
            if k == 0:
                comp.append(np.nan)
                suff.append(np.nan)
                continue
            comp.append(float(next(values)[0]))
            suff.append(float(next(values)[0]))
        out.append((comp, suff, ks))
    return out


def _remove(s: _Step, removed: set[tuple[str, int]], mode: str, baseline: int):
    """The step's decoder and encoder ids with ``removed`` positions replaced by the baseline or deleted."""
    decoder = s.decoder.copy()
    source = None if s.source is None else s.source.copy()
    tgt = sorted(r for side, r in removed if side == "target")
    src = sorted(r for side, r in removed if side == "source")
    if mode == "replace":
        decoder[tgt] = baseline
        if source is not None:
            source[src] = baseline
        return decoder, source
    decoder = np.delete(decoder, tgt)
    if source is not None:
        source = np.delete(source, src)
    if len(decoder) == 0:  # a decoder-only prefix without special tokens, all deleted: the baseline stands in
        decoder = np.array([baseline])
    return decoder, source
