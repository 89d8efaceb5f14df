"""Contrastive Attribution Tracing (CAT): in which layers, at which tokens, does a model recall a fact?

The Inseq paper's case study (Sarti et al. 2023; recipe in Inseq's docs example "Locating Factual Knowledge
in GPT-2"), compared there with ROME's causal tracing (Meng et al. 2022). For a factual statement, a prompt
whose next word is the true object ("Vinson Massif is located in the continent of" -> "Antarctica"), and
a false object of the same relation ("Europe"), every decoder block ``l``'s MLP output ``h[l, j]`` at every
prompt position ``j`` gets

    a[l, j] = reduce_d( h[l, j, d] * d(p(o_true) - p(o_false)) / d h[l, j, d] )

with ``p`` the probabilities of the two objects' first tokens after the prompt (one forward: they differ
only in the token scored). That is ``layer_gradient_x_activation`` with ``attributed_fn="contrast_prob_diff"``,
all layers in one pass. ``reduce_d`` is ``sum`` by default (signed: the first-order estimate of how much
``p(o_true) - p(o_false)`` would drop if that MLP output were zeroed, in probability units, comparable across
statements) or ``vnorm`` (L2 over the hidden size, what ``out.aggregate()`` shows in Inseq's docs example).

Prompt positions are grouped as in ROME's causal-tracing summary: first subject token, middle subject
tokens, last subject token, first subsequent token, further tokens, last token. As in ROME's notebook a
token may fall in two groups (a one-token subject is its first and last token; the first subsequent token
may be the last token), tokens before the subject are in none, and an empty group (no middle token) is
left out of that statement's average. The map is the mean over statements of each group's mean score.

Only statements the model gets right are traced: greedy decoding after the prompt yields the true object's
tokens (checked by teacher forcing: each object token is the argmax at its position). ``known_only=False``
(``--all-facts``) keeps every statement, e.g. for a random test model that knows none.

The comparison the paper makes (``compare=Comparison(...)``, ``--compare causal-tracing,atp``). On the same traced
statements, with the same position groups (the subject span CAT found, the same ``position_groups``):

* **causal tracing** (ROME, :func:`distattr.methods.patching.trace`): the subject's input embeddings plus Gaussian
  noise (``noise_scale`` = 3 x the std of the input-embedding table, ``samples`` = 10 draws seeded with ``seed``),
  then the clean output of ``component`` (``"mlp"``) at one prompt position restored in a window of ``window`` (10)
  layers centred on each layer; the score is the indirect effect on the probability of the true object's first
  token, ``p(restored) - p(corrupted)``, averaged over the draws. ROME's MLP trace, the one CAT's MLP attributions
  are compared with. (ROME takes the noise std from its subjects' embeddings, here from the whole table.)
* **attribution patching** (AtP, method ``"attribution_patching"``): the same corruption, component, window and
  metric, the indirect effect estimated to first order, ``(a_clean - a_corrupted) . dp/da_corrupted``, summed over
  the window's layers.

Each gives a ``[groups, layers]`` map per statement like CAT's; :mod:`distattr.casestudies.agreement` computes
Spearman's rho per statement and of the averaged maps, with bootstrap intervals over statements, overall and per
relation. ``normalize=True`` (``--normalize``) divides each statement's ``[groups, layers]`` map (every method's)
by its largest ``|value|`` before averaging, so every statement weighs the same in the averaged maps (and in
``cat_map.csv``); per-statement rho does not change with it.
"""

from __future__ import annotations

import csv
import json
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..api import AttributionModel
from ..results import AttributionOutput
from . import as_path, data_file
from .agreement import LEVEL, RESAMPLES, bootstrap_draws, by_relation, mean_map, normalize_maps, per_fact_spearman
from .agreement import agreement as agreement_of
from .storage import concat_outputs, save_results
from .tokens import char_span_tokens

GROUPS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
          "further tokens", "last token")
HIDDEN_REDUCTIONS = ("sum", "vnorm")
# Padded tokens per forward/backward batch: ~1.5 GB peak for SmolLM2-135M with its 30 MLPs hooked (fixed, so that
# the case study's runs do not depend on the machine's memory as the library's default budget does).
TOKEN_BUDGET = 512
COMPARE_METHODS = ("causal-tracing", "atp")
MAP_NAMES = {"cat": "CAT", "causal-tracing": "causal tracing", "atp": "AtP"}
MAP_FILES = {"cat": "cat_map.csv", "causal-tracing": "tracing_map.csv", "atp": "atp_map.csv"}
PAIR_KEYS = {"causal-tracing": "tracing", "atp": "atp", "cat": "cat"}


@dataclass(frozen=True)
class Fact:
    """A factual statement: ``prompt`` (containing ``subject``) is followed by ``true_object``."""

    prompt: str
    subject: str
    true_object: str
    relation: str
    false_object: str | None = None
    fact_id: str = ""


@dataclass(frozen=True)
class TracedFact:
    """A fact as token ids: the prompt, the true object's tokens after it, the false object's first token,
    the subject's token range ``[a, b)`` in the prompt, and the texts attributed: the prompt followed by the
    first token of the true (``true_text``) and of the false object (``false_text``)."""

    fact: Fact
    prompt_ids: tuple[int, ...]
    object_ids: tuple[int, ...]
    false_first: int
    subject: tuple[int, int]
    true_text: str
    false_text: str


@dataclass(frozen=True)
class CatSummary:
    """What ``run_cat`` did and found.

    Attributes:
        map: ``[n_layers, n_groups]`` mean attribution per layer (rows, in ``layers`` order) and position group
            (columns, :data:`GROUPS`); NaN where no statement has that group.
        group_counts: statements contributing to each group.
        counts: facts read, given a false object, tokenized, checked (run through the model), known, traced.
        mean_contrast_prob_diff: mean ``p(o_true) - p(o_false)`` (first tokens) over the traced statements.
        normalize: whether each statement's map was divided by its largest ``|value|`` before averaging.
        compared: the averaged maps of the methods compared with (``"causal-tracing"``, ``"atp"``), like ``map``.
        agreement: what ``agreement.json`` holds (None without a comparison).
        files: what was written (``map_csv``, ``png``, ``facts_csv``, ``summary``, and the stored results).
        seconds: wall time of each stage.
    """

    model: str
    layers: tuple[str, ...]
    hidden_reduction: str
    map: np.ndarray
    group_counts: tuple[int, ...]
    counts: dict[str, int]
    mean_contrast_prob_diff: float
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    normalize: bool = False
    compared: dict[str, np.ndarray] = field(default_factory=dict)
    agreement: dict | None = None

    def lines(self) -> list[str]:
        """A plain-text report: counts, and where the map peaks."""
        c = self.counts
        out = [f"CAT on {self.model}: {c['traced']} statements traced ({c['read']} read, {c['with_false']} with a "
               f"false object, {c['tokenized']} tokenized, {c['known']} of {c['checked']} checked known to the "
               f"model); hidden reduction "
               f"{self.hidden_reduction}; mean p(true) - p(false) = {self.mean_contrast_prob_diff:.3f}"]
        if np.isfinite(self.map).any():
            layer, group = np.unravel_index(np.nanargmax(self.map), self.map.shape)
            out.append(f"largest cell: {GROUPS[group]} at layer {layer} ({self.map[layer, group]:.4g})")
            for g, name in enumerate(GROUPS):
                col = self.map[:, g]
                if np.isfinite(col).any():
                    out.append(f"  {name:<24} n={self.group_counts[g]:<5} peak layer {int(np.nanargmax(col)):>2} "
                               f"({np.nanmax(col):.4g}), sum over layers {np.nansum(col):.4g}")
        for pair, result in (self.agreement or {}).get("comparisons", {}).items():
            o = result["overall"]
            out.append(f"{pair.replace('_', ' ')}: Spearman per fact {_interval_text(o['per_fact_mean'])} "
                       f"({o['n_defined']} of {o['n_facts']} facts), averaged maps "
                       f"{_interval_text(o['averaged_map'])} (95% bootstrap intervals)")
        out.append("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return out


def _interval_text(i: dict) -> str:
    def number(x):
        return "n/a" if x is None else f"{x:+.3f}"

    return f"{number(i['value'])} [{number(i['low'])}, {number(i['high'])}]"


# ---------------------------------------------------------------- facts


def load_facts(path: str | Path | None = None) -> list[Fact]:
    """Read factual statements from a JSON list (default: ROME's 1,209 known facts, packaged).

    Accepted records: ROME's known facts (``subject, attribute, prompt, relation_id``), CounterFact
    (``requested_rewrite: {prompt, subject, target_true: {str}, target_new: {str}, relation_id}``; the
    new target is the false object) and flat records (``prompt, subject, target_true, target_false``).
    """
    source = data_file("known_facts.json") if path is None else as_path(path)
    try:
        records = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"facts file not found: {source}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{source}: expected a non-empty JSON list of facts")
    return [_fact(i, r, source) for i, r in enumerate(records)]


def _fact(i: int, r, source) -> Fact:
    if not isinstance(r, dict):
        raise ValueError(f"{source}: fact #{i} is not a JSON object")
    if isinstance(r.get("requested_rewrite"), dict):  # CounterFact
        rw = r["requested_rewrite"]
        return Fact(prompt=rw["prompt"].format(rw["subject"]), subject=rw["subject"],
                    true_object=rw["target_true"]["str"].strip(), false_object=rw["target_new"]["str"].strip(),
                    relation=str(rw.get("relation_id", "")), fact_id=str(r.get("case_id", i)))
    if {"subject", "attribute", "prompt"} <= r.keys():  # ROME's known facts
        return Fact(prompt=r["prompt"], subject=r["subject"], true_object=r["attribute"].strip(),
                    relation=str(r.get("relation_id", "")), fact_id=str(r.get("known_id", i)))
    if {"subject", "prompt", "target_true"} <= r.keys():  # flat (e.g. counterfact-tracing)
        false = r.get("target_false")
        return Fact(prompt=r["prompt"], subject=r["subject"], true_object=r["target_true"].strip(),
                    false_object=false.strip() if isinstance(false, str) else None,
                    relation=str(r.get("relation_id", r.get("relation", ""))), fact_id=str(r.get("id", i)))
    raise ValueError(f"{source}: fact #{i} has keys {sorted(r)}; expected ROME known facts (subject, attribute, "
                     "prompt, relation_id), CounterFact (requested_rewrite) or subject, prompt, target_true, "
                     "target_false")


def choose_false_objects(facts: Sequence[Fact], seed: int = 0,
                         accept: Callable[[Fact, str], bool] | None = None) -> list[Fact]:
    """Give each fact without one a false object: another fact's object of the same relation, different from
    its own (case-insensitively) and accepted by ``accept(fact, candidate)`` (e.g. a different first token).

    Deterministic: a fact draws from ``random.Random(f"{seed}:{fact_id}")`` (its index when it has no id) among
    the sorted candidates. Facts left without a candidate are dropped."""
    objects: dict[str, set[str]] = defaultdict(set)
    for f in facts:
        objects[f.relation].add(f.true_object)
    out = []
    for k, f in enumerate(facts):
        if f.false_object is not None and f.false_object.casefold() != f.true_object.casefold():
            out.append(f)
            continue
        candidates = sorted(o for o in objects[f.relation] if o.casefold() != f.true_object.casefold())
        random.Random(f"{seed}:{f.fact_id or k}").shuffle(candidates)
        choice = next((o for o in candidates if accept is None or accept(f, o)), None)
        if choice is not None:
            out.append(replace(f, false_object=choice))
    return out


def _continuation_ids(tokenizer, prompt: str, obj: str) -> tuple[list[int], list[int]] | None:
    """(prompt ids, object ids after them) when the prompt's tokens are a prefix of ``prompt + ' ' + obj``'s."""
    glue = "" if prompt[-1:].isspace() else " "
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    full = list(tokenizer(prompt + glue + obj)["input_ids"])
    if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
        return None
    return prompt_ids, full[len(prompt_ids):]


def tokenize_fact(tokenizer, fact: Fact) -> TracedFact | None:
    """Token ids of a fact with a false object; None when the tokens of prompt and object do not separate,
    the two objects start with the same token, the subject is not in the prompt or ends it, or the prompt plus
    an object's first token does not read back as text (decoded, then tokenized again)."""
    true = _continuation_ids(tokenizer, fact.prompt, fact.true_object)
    false = _continuation_ids(tokenizer, fact.prompt, fact.false_object or "")
    at = fact.prompt.find(fact.subject)
    if true is None or false is None or false[1][0] == true[1][0] or at < 0 or not fact.subject:
        return None
    texts = [_first_token_text(tokenizer, fact.prompt, true[0], ids[1][0]) for ids in (true, false)]
    if None in texts:
        return None
    subject = char_span_tokens(tokenizer, fact.prompt, at, at + len(fact.subject), true[0])
    if subject[1] >= len(true[0]):  # the subject ends the prompt: no token after it
        return None
    return TracedFact(fact=fact, prompt_ids=tuple(true[0]), object_ids=tuple(true[1]), false_first=false[1][0],
                      subject=subject, true_text=texts[0], false_text=texts[1])


def _first_token_text(tokenizer, prompt: str, prompt_ids: list[int], token: int) -> str | None:
    """The text of the prompt followed by one token, when it starts with the prompt and tokenizes back to
    ``prompt_ids + [token]`` (decoding the sequence keeps the space that SentencePiece drops from one token)."""
    text = tokenizer.decode([*prompt_ids, token], skip_special_tokens=True)
    if not text.startswith(prompt) or list(tokenizer(text)["input_ids"]) != [*prompt_ids, token]:
        return None
    return text


def first_token_differs(tokenizer) -> Callable[[Fact, str], bool]:
    """``accept`` for :func:`choose_false_objects`: the candidate's first token after the prompt differs from
    the true object's (otherwise ``p(o_true) - p(o_false)`` is 0 at the first token)."""

    def accept(fact: Fact, candidate: str) -> bool:
        true = _continuation_ids(tokenizer, fact.prompt, fact.true_object)
        false = _continuation_ids(tokenizer, fact.prompt, candidate)
        return true is not None and false is not None and true[1][0] != false[1][0]

    return accept


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class FactCheck:
    """What the model does after a fact's prompt: ``known`` (greedy decoding yields the true object) and the
    probabilities of the true and false objects' first tokens."""

    known: bool
    p_true: float
    p_false: float


def check_facts(model: AttributionModel, traced: Sequence[TracedFact], batch_size: int = 32) -> list[FactCheck]:
    """One teacher-forced forward per batch over prompt + true object: a fact is known when every object
    token is the argmax of the logits before it (what greedy decoding would produce). Batches are formed
    by length (less padding); results come back in input order."""
    net, tok = model.model, model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(net.parameters()).device
    order = _by_length(traced)
    out: dict[int, FactCheck] = {}
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        rows = [list(traced[k].prompt_ids) + list(traced[k].object_ids) for k in chunk]
        ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: a causal model's real positions never see it
            ids[i, : len(r)] = torch.tensor(r)
        with torch.no_grad():
            logits = net(input_ids=ids.to(device)).logits.float().cpu()
        for i, k in enumerate(chunk):
            t = traced[k]
            p, n = len(t.prompt_ids), len(t.object_ids)
            probs = logits[i, p - 1].softmax(-1)
            known = bool((logits[i, p - 1 : p + n - 1].argmax(-1) == torch.tensor(t.object_ids)).all())
            out[k] = FactCheck(known, float(probs[t.object_ids[0]]), float(probs[t.false_first]))
    return [out[k] for k in range(len(traced))]


def _by_length(traced: Sequence[TracedFact]) -> list[int]:
    return sorted(range(len(traced)), key=lambda k: len(traced[k].prompt_ids) + len(traced[k].object_ids))


def mlp_layers(model: AttributionModel) -> tuple[str, ...]:
    """Names of every decoder block's MLP, in block order (``model.layers.3.mlp``, ``transformer.h.3.mlp``...)."""
    pattern = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|layer)\.(\d+)\.(?:mlp|feed_forward|ffn)$")
    found = [(int(m.group(1)), name) for name, _ in model.model.named_modules() if (m := pattern.match(name))]
    if not found:
        raise ValueError("Could not find the decoder blocks' MLP modules of this model; give their names (layers=)")
    return tuple(name for _, name in sorted(found))


def attribute_facts(model: AttributionModel, traced: Sequence[TracedFact], layers: Sequence[str],
                    hidden_reduction: str = "sum", batch_size: int = 32, token_budget: int | None = TOKEN_BUDGET,
                    show_progress: bool = True, log: Callable[[str], None] | None = None) -> AttributionOutput:
    """Layer gradient x activation of ``p(o_true) - p(o_false)`` at the object's first token, every layer in
    ``layers`` at once; one sequence per fact, ``target_attributions`` ``[n_prompt + 1, 1, n_layers]``."""
    order = _by_length(traced)  # similar lengths share a batch
    outputs = []
    for first in range(0, len(order), batch_size):
        chunk = [traced[k] for k in order[first : first + batch_size]]
        out = model.attribute([t.fact.prompt for t in chunk], [t.true_text for t in chunk],
                              method="layer_gradient_x_activation", target_layer=list(layers),
                              attributed_fn="contrast_prob_diff", contrast_targets=[t.false_text for t in chunk],
                              hidden_reduction=hidden_reduction, token_budget=token_budget, batch_size=batch_size,
                              show_progress=show_progress)
        for seq, t in zip(out, chunk, strict=True):
            if seq.target_ids != (*t.prompt_ids, t.object_ids[0]):
                raise RuntimeError(f"Fact {t.fact.fact_id}: the attributed tokens differ from the checked ones")
        outputs.append(out)
        if log is not None:
            log(f"  traced {min(first + batch_size, len(traced))}/{len(traced)} statements")
    merged = concat_outputs(outputs)
    position = {k: i for i, k in enumerate(order)}
    restore = [position[k] for k in range(len(traced))]
    info = {key: [value[i] for i in restore] if isinstance(value, list) and len(value) == len(traced) else value
            for key, value in merged.info.items()}
    return AttributionOutput(sequences=tuple(merged.sequences[i] for i in restore), info=info)


# ---------------------------------------------------------------- the map


def position_groups(n_prompt: int, subject: tuple[int, int]) -> tuple[tuple[int, ...], ...]:
    """Prompt positions of each group in :data:`GROUPS` (ROME's causal-tracing summary), for a prompt of
    ``n_prompt`` tokens whose subject covers ``[a, b)``, with at least one token after the subject."""
    a, b = subject
    if not 0 <= a < b < n_prompt:
        raise ValueError(f"Subject tokens [{a}, {b}) must end before the last of {n_prompt} prompt tokens")
    last = n_prompt - 1
    return ((a,), tuple(range(a + 1, b - 1)), (b - 1,), (b,), tuple(range(b + 1, last)), (last,))


def group_scores(scores: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """``[n_prompt, n_layers]`` -> ``[n_groups, n_layers]``: the mean over each group's positions (NaN if empty)."""
    out = np.full((len(groups), scores.shape[1]), np.nan, dtype=np.float64)
    for g, positions in enumerate(groups):
        if positions:
            out[g] = scores[list(positions)].mean(axis=0)
    return out


def fact_maps(output: AttributionOutput, traced: Sequence[TracedFact]) -> np.ndarray:
    """``[n_facts, n_groups, n_layers]`` from the attributions of :func:`attribute_facts`."""
    maps = []
    for seq, t in zip(output, traced, strict=True):
        n = len(t.prompt_ids)
        maps.append(group_scores(seq.target_attributions[:n, 0, :], position_groups(n, t.subject)))
    return np.stack(maps)


def average_map(maps: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Mean over facts, skipping facts without a group: ``[n_layers, n_groups]`` and the count per group."""
    counts = tuple(int(c) for c in np.isfinite(maps[:, :, 0]).sum(axis=0))
    return mean_map(maps).T, counts


def write_map_csv(path: Path, layers: Sequence[str], table: np.ndarray) -> Path:
    """Rows: layers; columns: ``layer`` (index), ``module``, then one per position group."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["layer", "module", *GROUPS])
        for i, (name, row) in enumerate(zip(layers, table, strict=True)):
            w.writerow([i, name, *("" if not np.isfinite(v) else f"{v:.9g}" for v in row)])
    return path


def plot_map(path: Path, table: np.ndarray, group_counts: Sequence[int], title: str, signed: bool) -> Path:
    """Heatmap of the map, position groups as rows and layers as columns (ROME's layout): all groups, then
    the groups before the last token on their own colour scale (the last token's final layers can dwarf them)."""
    from ..viz.plot import require_matplotlib

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = matplotlib.colormaps["RdBu_r" if signed else "Purples"].with_extremes(bad="#dddddd")
    labels = [f"{g} ({n})" for g, n in zip(GROUPS, group_counts, strict=True)]
    panels = [(table, labels, "all positions"), (table[:, :-1], labels[:-1], "before the last token (own scale)")]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.28 * table.shape[0] + 4), 6.4),
                             gridspec_kw={"height_ratios": [len(GROUPS), len(GROUPS) - 1]})
    label = "mean Σ_d h·∂(p_true − p_false)/∂h" if signed else "mean ‖h ⊙ ∂(p_true − p_false)/∂h‖₂"
    for ax, (values, names, subtitle) in zip(axes, panels, strict=True):
        peak = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
        image = ax.imshow(np.ma.masked_invalid(values.T), aspect="auto", cmap=cmap, vmin=-peak if signed else 0.0,
                          vmax=peak, interpolation="nearest")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(0, values.shape[0], 1 if values.shape[0] <= 16 else 2))
        ax.set_title(subtitle, fontsize=9)
        fig.colorbar(image, ax=ax, label=label if ax is axes[0] else None, fraction=0.04, pad=0.02)
    axes[-1].set_xlabel("layer (MLP output)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def write_facts_csv(path: Path, traced: Sequence[TracedFact], checks: Sequence[FactCheck], tokenizer) -> Path:
    """One row per traced statement: ids, texts, the subject's tokens and the first-token probabilities."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["fact_id", "relation", "prompt", "subject", "true_object", "false_object", "subject_tokens",
                    "n_prompt_tokens", "p_true", "p_false", "p_true_minus_p_false"])
        for t, c in zip(traced, checks, strict=True):
            a, b = t.subject
            w.writerow([t.fact.fact_id, t.fact.relation, t.fact.prompt, t.fact.subject, t.fact.true_object,
                        t.fact.false_object, " | ".join(tokenizer.convert_ids_to_tokens(list(t.prompt_ids[a:b]))),
                        len(t.prompt_ids), f"{c.p_true:.6g}", f"{c.p_false:.6g}", f"{c.p_true - c.p_false:.6g}"])
    return path


def _with_step_scores(output: AttributionOutput, checks: Sequence[FactCheck]) -> AttributionOutput:
    """Put the first-token probabilities of :func:`check_facts` into the stored results as step scores
    (the same quantities ``step_scores=[...]`` would compute, without two more forwards per statement)."""
    sequences = tuple(replace(seq, step_scores={
        "probability": np.array([c.p_true], dtype=np.float32), "contrast_prob": np.array([c.p_false], dtype=np.float32),
        "contrast_prob_diff": np.array([c.p_true - c.p_false], dtype=np.float32)})
        for seq, c in zip(output, checks, strict=True))
    info = {**output.info, "step_scores": ["probability", "contrast_prob", "contrast_prob_diff"],
            "step_scores_source": "distattr.casestudies.cat.check_facts (teacher-forced forward)"}
    return AttributionOutput(sequences=sequences, info=info)


# ---------------------------------------------------------------- the comparison with causal tracing


@dataclass(frozen=True)
class Comparison:
    """What ``run_cat`` compares CAT with (module docstring), and how.

    Attributes:
        methods: some of :data:`COMPARE_METHODS`: ``"causal-tracing"`` (ROME's trace), ``"atp"`` (attribution
            patching). The agreement is measured against causal tracing when it is run, else against AtP.
        component, window: what is restored and in how many layers (ROME's MLP trace: ``"mlp"``, 10); see
            :class:`distattr.methods.patching.PatchingArgs`.
        samples, noise_scale: noise draws and their std in units of the embedding table's std (ROME: 10, 3).
        resamples: bootstrap resamples of the agreement intervals (over statements).
    """

    methods: tuple[str, ...] = COMPARE_METHODS
    component: str = "mlp"
    window: int = 10
    samples: int = 10
    noise_scale: float = 3.0
    resamples: int = RESAMPLES

    def __post_init__(self):
        from ..methods.patching import PatchingArgs

        methods = tuple(dict.fromkeys(self.methods))
        unknown = [m for m in methods if m not in COMPARE_METHODS]
        if unknown or not methods:
            raise ValueError(f"compare with one or more of {', '.join(COMPARE_METHODS)}, not "
                             f"{', '.join(map(repr, unknown or methods)) or 'nothing'}")
        object.__setattr__(self, "methods", methods)
        PatchingArgs(component=self.component, window=self.window, noise_samples=self.samples,
                     noise_scale=self.noise_scale)  # the same checks and messages as the methods
        if not isinstance(self.resamples, int) or self.resamples < 1:
            raise ValueError(f"resamples must be a positive integer, not {self.resamples!r}")

    def patching_args(self, subject: tuple[int, int], seed: int) -> dict:
        """``method_args`` of ``attribution_patching`` for a statement whose subject covers ``subject``."""
        return {"component": self.component, "window": self.window, "corruption": "noise",
                "corrupt_span": tuple(subject), "noise_scale": self.noise_scale, "noise_samples": self.samples,
                "seed": seed}


def _grouped(scores: np.ndarray, t: TracedFact, what: str) -> np.ndarray:
    """``[groups, layers]`` from ``scores [layers, prompt positions]`` of one statement."""
    n = len(t.prompt_ids)
    if scores.shape[1] != n:
        raise RuntimeError(f"Fact {t.fact.fact_id}: {what} scored {scores.shape[1]} prompt positions, CAT {n}")
    return group_scores(np.asarray(scores, dtype=np.float64).T, position_groups(n, t.subject))


def causal_trace_maps(model: AttributionModel, traced: Sequence[TracedFact], comparison: Comparison = Comparison(),
                      seed: int = 0, token_budget: int | None = TOKEN_BUDGET,
                      log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROME's causal trace of each statement (:func:`distattr.methods.patching.trace`: noise on the subject's tokens,
    metric the probability of the true object's first token): ``[n_facts, n_groups, n_layers]`` indirect effects by
    position group, and the clean and corrupted probabilities ``[n_facts]``."""
    from ..methods.patching import trace

    maps, clean, corrupted = [], [], []
    clock = time.perf_counter()
    for i, t in enumerate(traced):
        result = trace(model, t.fact.prompt, t.object_ids[0], t.subject, component=comparison.component,
                       window=comparison.window, samples=comparison.samples, seed=seed,
                       noise_scale=comparison.noise_scale, attributed_fn="probability", token_budget=token_budget)
        maps.append(_grouped(result.scores, t, "causal tracing"))
        clean.append(result.clean)
        corrupted.append(result.corrupted)
        if log is not None:
            log(f"  causal tracing {i + 1}/{len(traced)} statements ({time.perf_counter() - clock:.0f} s)")
    return np.stack(maps), np.array(clean), np.array(corrupted)


def atp_maps(model: AttributionModel, traced: Sequence[TracedFact], comparison: Comparison = Comparison(),
             seed: int = 0, token_budget: int | None = TOKEN_BUDGET,
             log: Callable[[str], None] | None = None) -> np.ndarray:
    """Attribution patching of each statement with the corruption, component, window and metric of
    :func:`causal_trace_maps`: ``[n_facts, n_groups, n_layers]`` estimated indirect effects by position group."""
    maps = []
    clock = time.perf_counter()
    for i, t in enumerate(traced):
        ids = [*t.prompt_ids, t.object_ids[0]]
        out = model.attribute(t.fact.prompt, [ids], method="attribution_patching",
                              method_args=comparison.patching_args(t.subject, seed), attributed_fn="probability",
                              attr_pos_end=len(ids), token_budget=token_budget, show_progress=False)
        seq = out.sequences[0]
        if tuple(seq.target_ids) != tuple(ids):
            raise RuntimeError(f"Fact {t.fact.fact_id}: the attributed tokens differ from the checked ones")
        maps.append(_grouped(seq.target_attributions[: len(t.prompt_ids), 0, :].T, t, "AtP"))
        if log is not None:
            log(f"  attribution patching {i + 1}/{len(traced)} statements ({time.perf_counter() - clock:.0f} s)")
    return np.stack(maps)


def agreements(maps: dict[str, np.ndarray], relations: Sequence[str], resamples: int = RESAMPLES,
            seed: int = 0) -> dict[str, dict]:
    """Agreement of the maps (``{"cat": ..., "causal-tracing": ..., "atp": ...}``, each ``[n_facts, n_groups,
    n_layers]``) with the reference (causal tracing when present, else AtP), and of CAT with AtP when both are
    there: ``{"cat_vs_tracing": {"overall": {...}, "by_relation": {relation: {...}}}, ...}`` (see
    :class:`distattr.casestudies.agreement.Agreement`). All pairs use the same bootstrap draws."""
    pairs = [(a, b) for a, b in (("cat", "causal-tracing"), ("atp", "causal-tracing"), ("cat", "atp"))
             if a in maps and b in maps]
    n = len(next(iter(maps.values())))
    draws = bootstrap_draws(n, resamples, seed)
    out = {}
    for a, b in pairs:
        overall = agreement_of(maps[a], maps[b], draws=draws)
        groups = by_relation(maps[a], maps[b], relations, resamples=resamples, seed=seed)
        out[f"{PAIR_KEYS[a]}_vs_{PAIR_KEYS[b]}"] = {
            "overall": overall.as_dict(), "by_relation": {r: g.as_dict() for r, g in groups.items()}}
    return out


def write_agreement_facts_csv(path: Path, traced: Sequence[TracedFact], maps: dict[str, np.ndarray],
                              clean: np.ndarray | None, corrupted: np.ndarray | None) -> Path:
    """One row per statement: ``fact_id, relation, n_prompt_tokens``, causal tracing's ``p_clean`` and
    ``p_corrupted`` (empty without it), then Spearman's rho of each compared pair (``cat_vs_tracing``, ...)."""
    pairs = [(a, b) for a, b in (("cat", "causal-tracing"), ("atp", "causal-tracing"), ("cat", "atp"))
             if a in maps and b in maps]
    rhos = {f"{PAIR_KEYS[a]}_vs_{PAIR_KEYS[b]}": per_fact_spearman(maps[a], maps[b]) for a, b in pairs}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["fact_id", "relation", "n_prompt_tokens", "p_clean", "p_corrupted", *rhos])
        for i, t in enumerate(traced):
            w.writerow([t.fact.fact_id, t.fact.relation, len(t.prompt_ids),
                        "" if clean is None else f"{clean[i]:.6g}", "" if corrupted is None else f"{corrupted[i]:.6g}",
                        *("" if not np.isfinite(r[i]) else f"{r[i]:.6g}" for r in rhos.values())])
    return path


def plot_maps(path: Path, tables: dict[str, np.ndarray], group_counts: Sequence[int], title: str,
              signed: dict[str, bool] | None = None) -> Path:
    """The averaged maps side by side, one column each (``tables``: name -> ``[n_layers, n_groups]``), position
    groups as rows and layers as columns (ROME's layout), each on its own colour scale; second row: the groups before
    the last token on their own scale."""
    from ..viz.plot import require_matplotlib

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    signed = signed or {}
    labels = [f"{g} ({n})" for g, n in zip(GROUPS, group_counts, strict=True)]
    n_layers = next(iter(tables.values())).shape[0]
    width = max(4.5, 0.13 * n_layers + 3.0)
    fig, axes = plt.subplots(2, len(tables), figsize=(width * len(tables), 6.4), squeeze=False,
                             gridspec_kw={"height_ratios": [len(GROUPS), len(GROUPS) - 1]})
    for col, (name, table) in enumerate(tables.items()):
        sign = signed.get(name, True)
        cmap = matplotlib.colormaps["RdBu_r" if sign else "Purples"].with_extremes(bad="#dddddd")
        panels = [(table, labels, "all positions"), (table[:, :-1], labels[:-1], "before the last token")]
        for row, (values, names, subtitle) in enumerate(panels):
            ax = axes[row, col]
            peak = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
            peak = peak or 1.0
            image = ax.imshow(np.ma.masked_invalid(values.T), aspect="auto", cmap=cmap, vmin=-peak if sign else 0.0,
                              vmax=peak, interpolation="nearest")
            ax.set_yticks(range(len(names)), names if col == 0 else [""] * len(names))
            ax.set_xticks(range(0, values.shape[0], 1 if values.shape[0] <= 16 else 3))
            ax.set_title(f"{MAP_NAMES.get(name, name)}: {subtitle}", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        axes[-1, col].set_xlabel("layer")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the whole case study


def run_cat(model: AttributionModel, output_dir: str | Path, facts: Sequence[Fact] | None = None, *,
            limit: int | None = None, seed: int = 0, layers: Sequence[str] | None = None,
            hidden_reduction: str = "sum", known_only: bool = True, batch_size: int = 32,
            token_budget: int | None = TOKEN_BUDGET, normalize: bool = False, compare: Comparison | None = None,
            show_progress: bool = True, log: Callable[[str], None] | None = None) -> CatSummary:
    """The whole case study: facts -> false objects -> facts the model knows -> attribution -> map, CSV, PNG.

    Args:
        model: a decoder-only model (``load_model(...)``).
        output_dir: receives ``cat_map.csv`` (rows: layers; columns: position groups), ``cat_map.png``,
            ``cat_facts.csv``, ``cat_summary.json`` and the full results (``cat_attributions.json``).
        facts: the statements (default: :func:`load_facts`, ROME's known facts).
        limit: trace at most this many statements (the first ones, in file order, that pass the filters).
        seed: seeds the choice of false objects.
        layers: module names to attribute (default: every decoder block's MLP, :func:`mlp_layers`).
        hidden_reduction: ``sum`` (signed, default) or ``vnorm``; see the module docstring.
        known_only: keep only statements the model completes with the true object.
        batch_size: statements per forward / ``attribute`` call.
        token_budget: passed to ``attribute`` (None: the library default, sized from the model's memory).
        normalize: divide each statement's ``[groups, layers]`` map by its largest ``|value|`` before averaging
            (every method's, ``cat_map.csv`` included).
        compare: also run causal tracing and/or AtP on the same statements (:class:`Comparison`; noise seeded with
            ``seed``, bootstrap too) and write ``tracing_map.csv`` / ``atp_map.csv`` (same columns as
            ``cat_map.csv``), ``compare_maps.png`` (the maps side by side), ``agreement.json`` (Spearman's rho per
            statement and of the averaged maps, bootstrap intervals, per relation), ``agreement_facts.csv``
            (per statement: the tracing probabilities and each pair's rho) and ``fact_maps.npz`` (each method's
            ``[statements, groups, layers]`` maps before any normalisation, keys ``cat``, ``tracing``, ``atp``,
            with ``fact_id``, ``relation`` and ``groups``: the agreement can be recomputed from it). Needs CAT on
            every block's MLP (the default ``layers``).
    """
    if model.is_encoder_decoder:
        raise ValueError("CAT traces decoder-only models; this one is an encoder-decoder model")
    if hidden_reduction not in HIDDEN_REDUCTIONS:
        raise ValueError(f"hidden_reduction must be one of {HIDDEN_REDUCTIONS}, not {hidden_reduction!r}")
    if limit is not None and limit < 1:
        raise ValueError("limit must be at least 1")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    say = log or (lambda _msg: None)
    output_dir = Path(output_dir)
    layers = tuple(layers) if layers else mlp_layers(model)
    if compare is not None and layers != mlp_layers(model):
        raise ValueError("The comparison with causal tracing needs CAT on every decoder block's MLP (the default "
                         "layers); leave layers out")
    tok = model.tokenizer
    clock = time.perf_counter()
    facts = list(load_facts() if facts is None else facts)
    with_false = choose_false_objects(facts, seed=seed, accept=first_token_differs(tok))
    tokenized = [t for t in (tokenize_fact(tok, f) for f in with_false) if t is not None]
    seconds = {"prepare": time.perf_counter() - clock}
    say(f"{len(facts)} facts, {len(with_false)} with a false object, {len(tokenized)} tokenized")

    clock = time.perf_counter()
    traced: list[TracedFact] = []
    checks: list[FactCheck] = []
    n_checked = n_known = 0
    window = batch_size * 8  # facts checked together (sorted by length inside), in file order
    for first in range(0, len(tokenized), window):
        chunk = tokenized[first : first + window]
        chunk_checks = check_facts(model, chunk, batch_size)
        n_checked += len(chunk)
        n_known += sum(c.known for c in chunk_checks)
        for t, c in zip(chunk, chunk_checks, strict=True):
            if c.known or not known_only:
                traced.append(t)
                checks.append(c)
        if limit is not None and len(traced) >= limit:
            break
    traced, checks = traced[:limit], checks[:limit]
    seconds["filter"] = time.perf_counter() - clock
    say(f"{n_known} of {n_checked} checked facts known to the model; tracing {len(traced)}")
    if not traced:
        raise ValueError("No statement left to trace: the model gets none of the facts right (try known_only=False)")

    clock = time.perf_counter()
    output = attribute_facts(model, traced, layers, hidden_reduction, batch_size, token_budget, show_progress, log)
    output = _with_step_scores(output, checks)
    seconds["attribute"] = time.perf_counter() - clock
    maps = {"cat": fact_maps(output, traced)}
    clean = corrupted = None
    if compare is not None:
        if "causal-tracing" in compare.methods:
            clock = time.perf_counter()
            say(f"causal tracing {len(traced)} statements ({compare.component}, window {compare.window}, "
                f"{compare.samples} noise samples)")
            maps["causal-tracing"], clean, corrupted = causal_trace_maps(model, traced, compare, seed, token_budget,
                                                                         log)
            seconds["causal-tracing"] = time.perf_counter() - clock
        if "atp" in compare.methods:
            clock = time.perf_counter()
            say(f"attribution patching {len(traced)} statements")
            maps["atp"] = atp_maps(model, traced, compare, seed, token_budget, log)
            seconds["atp"] = time.perf_counter() - clock
    averaged = {key: normalize_maps(m) if normalize else m for key, m in maps.items()}
    tables = {key: average_map(m)[0] for key, m in averaged.items()}
    table, counts = tables["cat"], average_map(maps["cat"])[1]
    name = output.info.get("model_name", "model")
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {"map_csv": write_map_csv(output_dir / "cat_map.csv", layers, table),
             "facts_csv": write_facts_csv(output_dir / "cat_facts.csv", traced, checks, tok)}
    scaled = ", each fact's map ÷ its max |value|" if normalize else ""
    title = (f"CAT, {name}: {len(traced)} {'known ' if known_only else ''}facts, layer grad×activation of "
             f"p(true) − p(false), {hidden_reduction} over hidden{scaled}")
    files["png"] = plot_map(output_dir / "cat_map.png", table, counts, title, signed=hidden_reduction == "sum")
    files.update({f"results_{k}": v for k, v in save_results(output_dir, {"cat_attributions": output}).items()})
    agreement = None
    if compare is not None:
        from ..methods.patching import windows

        spans = windows(len(layers), compare.window)
        restored = [f"{compare.component} of layers {a}-{b - 1}" for a, b in spans]
        for key in compare.methods:
            files[f"{PAIR_KEYS[key]}_map_csv"] = write_map_csv(output_dir / MAP_FILES[key], restored, tables[key])
        files["compare_png"] = plot_maps(
            output_dir / "compare_maps.png", tables, counts,
            f"{name}: {len(traced)} facts; CAT (grad×act of p(true) − p(false)) vs {compare.component} restored "
            f"in {compare.window}-layer windows (indirect effect on p(true), {compare.samples} noise samples){scaled}",
            signed={"cat": hidden_reduction == "sum"})
        relations = [t.fact.relation for t in traced]
        agreement = _agreement_doc(name, traced, compare, seed, normalize, hidden_reduction, known_only,
                                   agreements(averaged, relations, compare.resamples, seed), clean, corrupted)
        files["agreement"] = output_dir / "agreement.json"
        files["agreement"].write_text(json.dumps(agreement, indent=1), encoding="utf-8")
        files["agreement_facts_csv"] = write_agreement_facts_csv(output_dir / "agreement_facts.csv", traced, maps,
                                                                 clean, corrupted)
        files["fact_maps"] = output_dir / "fact_maps.npz"
        np.savez_compressed(files["fact_maps"], **{PAIR_KEYS[k]: m for k, m in maps.items()},
                            fact_id=np.array([t.fact.fact_id for t in traced]),
                            relation=np.array([t.fact.relation for t in traced]), groups=np.array(GROUPS))
    summary = CatSummary(
        model=name, layers=layers, hidden_reduction=hidden_reduction, map=table, group_counts=counts,
        counts={"read": len(facts), "with_false": len(with_false), "tokenized": len(tokenized),
                "checked": n_checked, "known": n_known, "traced": len(traced)},
        mean_contrast_prob_diff=float(np.mean([c.p_true - c.p_false for c in checks])),
        seconds={**seconds, "total": sum(seconds.values())}, normalize=normalize,
        compared={key: t for key, t in tables.items() if key != "cat"}, agreement=agreement,
    )
    files["summary"] = _write_summary(output_dir / "cat_summary.json", summary)
    return replace(summary, files=files)


def _agreement_doc(model: str, traced: Sequence[TracedFact], compare: Comparison, seed: int, normalize: bool,
                   hidden_reduction: str, known_only: bool, pairs: dict, clean, corrupted) -> dict:
    """``agreement.json``: what was compared, how, and the statistics of :func:`agreements`."""
    patching = {"component": compare.component, "window": compare.window, "noise_samples": compare.samples,
                "noise_scale": compare.noise_scale, "noise_seed": seed, "corrupted": "subject tokens",
                "metric": "probability of the true object's first token"}
    doc = {"model": model, "n_facts": len(traced), "facts": "known to the model" if known_only else "all",
           "relations": dict(sorted(Counter(t.fact.relation for t in traced).items())),
           "groups": list(GROUPS),
           "cat": {"method": "layer_gradient_x_activation", "attributed_fn": "contrast_prob_diff",
                   "hidden_reduction": hidden_reduction},
           "normalize": normalize,
           "normalization": "each fact's [groups, layers] map divided by its largest |value| before averaging"
                            if normalize else "none: maps averaged as they are",
           "statistic": "Spearman's rho over layer x position-group cells finite in both maps; per fact (mean over "
                        "the facts where it is defined) and of the maps averaged over facts",
           "bootstrap": {"resamples": compare.resamples, "seed": seed, "level": LEVEL,
                         "method": "percentile; facts resampled with replacement; the same draws for every pair "
                                   "overall, each relation its own draws"}}
    if "causal-tracing" in compare.methods:
        doc["causal_tracing"] = {**patching, "method": "activation_patching (distattr.methods.patching.trace)",
                                 "mean_p_clean": float(np.mean(clean)), "mean_p_corrupted": float(np.mean(corrupted))}
    if "atp" in compare.methods:
        doc["atp"] = {**patching, "method": "attribution_patching"}
    doc["comparisons"] = pairs
    return doc


def _write_summary(path: Path, s: CatSummary) -> Path:
    doc = {"model": s.model, "hidden_reduction": s.hidden_reduction, "layers": list(s.layers), "groups": list(GROUPS),
           "group_counts": list(s.group_counts), "counts": s.counts,
           "mean_contrast_prob_diff": s.mean_contrast_prob_diff, "seconds": s.seconds, "normalize": s.normalize,
           "map": [[None if not np.isfinite(v) else float(v) for v in row] for row in s.map]}
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return path
