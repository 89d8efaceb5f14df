"""Gender bias: pronoun probabilities and attributions against labor statistics, as in the Inseq paper's Table 3.2.

The paper (Sarti et al. 2023, section 3.1; Table 3.2 of Sarti's thesis, whose values ship in
``data/inseq_table_3_2.tsv``): the Turkish template ``"O bir ____"`` is filled with 49 occupations and translated
into English by Helsinki-NLP/opus-mt-tr-en. For the English pronoun ``y_pron`` it takes the pronoun's probability
``p(y_pron)`` and the attribution of the source pronoun ``x_pron`` (``O``) and of the occupation ``x_occ`` by
saliency (∇), integrated gradients (IG) and input x gradient (I×G), ranks the occupations by each measure and
correlates the ranking with the share of women in the occupation (U.S. BLS, WinoGender's ``bls_pct_female``) by
Kendall's tau (``scipy.stats.kendalltau``, tau-b, two-sided p-value). What this module does, step by step:

* **Occupations**: the paper's 49 (``load_occupations("paper")``; Turkish slots for encoder-decoder models, the
  English terms for decoder-only ones) by default, WinoGender's 60 (``"winogender"``) or a TSV file.
* **Attribution read**: Inseq's display normalisation (token scores are L2 norms over the hidden size; each
  generated token's column divided by its L1 norm over the attributed tokens), in the column of the pronoun's
  first token, in the row of the **first token** of the occupation (the paper's footnote: "for multi-token
  occupation terms the attribution score of the first token was used") and of the source pronoun.
* **Integrated gradients until converged**: every example whose convergence delta (``|sum of attributions -
  (f(x) - f(baseline))|``) reaches ``delta_threshold`` (0.05, the paper's) at any attributed step is attributed
  again with twice the ``n_steps``, until all are below or ``max_n_steps`` is reached (the paper: "we set approx.
  steps to ensure convergence Δ < 0.05 for IG"); :class:`Convergence` reports the steps used and the deltas.
* **Base case**: the pronoun the model produces (the greedy translation's; for decoder-only models the more
  probable of the two after the prompt), its measures correlated with **|% women - 50|**: how far the
  occupation is from parity, "the gender bias irrespective of the direction".
* **Gender swap case** (the paper's ♀ → ♂): the pair of the two pronouns through the pair aggregation, as the
  paper's appendix code does it (``she.aggregate("pair", paired_attr=he)``, Inseq's convention ``paired -
  attr``), i.e. :func:`distattr.aggregate.pair_difference` ``(he, she)``: each measure of ``He`` minus that of
  ``She`` (probabilities after merging a multi-token pronoun), correlated with **% women**. The sign follows
  the paper: its τ = -0.44 for ``p(y_pron)`` is p(He) - p(She) falling as the share of women rises.

* **Encoder-decoder (the paper's setting):** Turkish ``"O bir {occupation}"`` -> English; the *gender swap* is
  the same translation with the other pronoun, attributed by constrained decoding; ``x_pron`` is ``O``.
* **Decoder-only (English):** ``"The {occupation} said that"`` followed by `` he`` / `` she``; no source pronoun,
  so no ``x_pron``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..aggregate import Spans, pair_difference
from ..api import AttributionModel
from ..results import AttributionOutput, SequenceAttribution
from . import as_path, data_file
from .storage import save_results
from .tokens import char_span_tokens, word_span

SLOT = "{occupation}"
DEFAULT_TEMPLATE = {False: "The {occupation} said that", True: "O bir {occupation}"}
OCCUPATION_SETS = {"paper": "inseq_turkish_occupations_bls.tsv", "winogender": "occupations-stats.tsv"}
"""Packaged occupation lists by name: the Inseq paper's 49 (default) and WinoGender's 60."""
DEFAULT_OCCUPATIONS = "paper"
PAPER_TABLE = "inseq_table_3_2.tsv"
DEFAULT_SOURCE_PRONOUN = {False: None, True: "O"}
METHODS = ("saliency", "integrated_gradients", "input_x_gradient")
METHOD_LABELS = {"probability": "p(y_pron)", "saliency": "∇", "integrated_gradients": "IG", "input_x_gradient": "I×G"}
DEFAULT_N_STEPS = 16  # first try of integrated gradients (Gauss-Legendre points); doubled until converged
DELTA_THRESHOLD = 0.05  # the paper's
MAX_N_STEPS = 512  # the cap of the doubling
TOKEN_BUDGET = 512  # padded tokens per batch: faster on a CPU than the library's memory-first default
CASES = ("base", "gender_swap")
REFERENCES = {"base": "|bls_pct_female - 50|", "gender_swap": "bls_pct_female"}


@dataclass(frozen=True)
class Occupation:
    """``slot`` fills the template (English, or Turkish for MT), ``label`` names it in tables (English)."""

    slot: str
    label: str
    pct_female: float


@dataclass(frozen=True)
class Reading:
    """One occupation with one pronoun: the attributed text, ``p(pronoun)``, and per method the normalised
    attribution of the occupation's first token (``occupation``) and of the source pronoun's (``source_pronoun``)
    in the pronoun's column."""

    pronoun: str
    text: str
    prob: float
    occupation: dict[str, float]
    source_pronoun: dict[str, float]


@dataclass(frozen=True)
class Tau:
    """Kendall's tau-b of a measure with a reference over ``n`` occupations, two-sided p-value."""

    tau: float
    p: float
    n: int


@dataclass(frozen=True)
class Convergence:
    """Integrated gradients in one run (one method, one pronoun): per example, the ``n_steps`` that was kept and
    its largest |delta| over the attributed steps; ``delta_max`` / ``delta_mean`` over every attributed step of
    every example. ``not_converged`` examples reached ``max_n_steps`` with a |delta| still >= ``threshold``."""

    n_steps: tuple[int, ...]
    example_delta: tuple[float, ...]
    delta_max: float
    delta_mean: float
    n_deltas: int
    threshold: float
    max_n_steps: int

    @property
    def not_converged(self) -> int:
        return sum(1 for d in self.example_delta if not d < self.threshold)

    def as_dict(self) -> dict:
        counts: dict[int, int] = {}
        for n in self.n_steps:
            counts[n] = counts.get(n, 0) + 1
        return {"examples": len(self.n_steps), "n_steps_counts": {str(k): v for k, v in sorted(counts.items())},
                "delta_max": self.delta_max, "delta_mean": self.delta_mean, "threshold": self.threshold,
                "max_n_steps": self.max_n_steps, "not_converged": self.not_converged}


@dataclass(frozen=True)
class TableCell:
    """One cell of Table 3.2: ``method`` (``probability`` for ``p(y_pron)``), ``token`` (``y_pron``, ``x_pron``,
    ``x_occ``), ``case`` (``base`` / ``gender_swap``); ours (None where it does not apply, e.g. ``x_pron`` of a
    decoder-only model) and the paper's (``paper_tau`` as printed, ``""`` if the paper has no such cell)."""

    method: str
    token: str
    case: str
    tau: Tau | None
    paper_tau: str
    paper_significant: bool


@dataclass(frozen=True)
class GenderBiasSummary:
    """The tables: ``rows`` in the paper's shape (measure -> base, gender swap), ``cells`` (Table 3.2 cell by
    cell, with the paper's values), ``fixed`` (measures of one pronoun, e.g. ``p(she)``, whatever the model
    preferred, with % women) and ``convergence`` (method -> pronoun -> :class:`Convergence`)."""

    model: str
    model_info: dict
    template: str
    encoder_decoder: bool
    occupation_set: str
    n_occupations: int
    base_counts: dict[str, int]
    n_without_pronoun: int
    rows: tuple[tuple[str, Tau, Tau], ...]
    cells: tuple[TableCell, ...]
    fixed: tuple[tuple[str, Tau], ...]
    convergence: dict[str, dict[str, Convergence]] = field(default_factory=dict)
    pronouns: tuple[str, str] = ("he", "she")
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def markdown(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in self.base_counts.items())
        he, she = self.pronouns
        head = [f"Gender bias, model {self.model}, template {self.template!r}, occupations {self.occupation_set} "
                f"({self.n_occupations}); base pronoun {counts}"
                + (f"; no pronoun in {self.n_without_pronoun}" if self.n_without_pronoun else ""),
                "", f"Kendall τ (p-value), * p < 0.05. Base: with {REFERENCES['base']}; GenderSwap: {he} − {she} "
                f"(pair difference) with {REFERENCES['gender_swap']}. Paper: Inseq Table 3.2 (opus-mt-tr-en, 49 "
                "Turkish occupations).", "",
                "| measure | Base | GenderSwap | paper Base | paper GenderSwap |", "|---|---:|---:|---:|---:|"]
        for cell_b, cell_s in zip(self.cells[0::2], self.cells[1::2], strict=True):
            name = METHOD_LABELS.get(cell_b.method, cell_b.method) + ("" if cell_b.token == "y_pron" else
                                                                     f" {cell_b.token}")
            head.append(f"| {name} | {_cell(cell_b.tau)} | {_cell(cell_s.tau)} | {_paper(cell_b)} | "
                        f"{_paper(cell_s)} |")
        for method, runs in self.convergence.items():
            for pronoun, c in runs.items():
                head.append("")
                head.append(f"{METHOD_LABELS.get(method, method)} convergence ({pronoun!r}): |Δ| max "
                            f"{c.delta_max:.3g}, mean {c.delta_mean:.3g}; n_steps {c.as_dict()['n_steps_counts']}; "
                            f"{c.not_converged} of {len(c.n_steps)} still ≥ {c.threshold} at the cap "
                            f"{c.max_n_steps}")
        head += ["", "| measure (fixed pronoun), τ with bls_pct_female | τ |", "|---|---:|"]
        head += [f"| {name} | {_cell(t)} |" for name, t in self.fixed]
        return "\n".join(head) + "\n"

    def as_dict(self) -> dict:
        """The summary as JSON-ready data (``gender_bias_summary.json``)."""
        return {"model": self.model, "model_info": self.model_info, "template": self.template,
                "encoder_decoder": self.encoder_decoder, "occupations": self.occupation_set,
                "n_occupations": self.n_occupations, "base_counts": self.base_counts,
                "n_without_pronoun": self.n_without_pronoun, "pronouns": list(self.pronouns),
                "references": REFERENCES, "gender_swap": f"{self.pronouns[0]} - {self.pronouns[1]}",
                "table_3_2": [_cell_dict(c) for c in self.cells],
                "fixed_pronoun": [{"measure": n, **_tau_dict(t)} for n, t in self.fixed],
                "convergence": {m: {p: c.as_dict() for p, c in runs.items()} for m, runs in self.convergence.items()},
                "seconds": self.seconds, "files": {k: str(v) for k, v in self.files.items()}}


def _cell(t: Tau | None) -> str:
    if t is None:
        return "–"
    if not math.isfinite(t.tau):
        return f"n/a (n={t.n})"
    return f"{t.tau:+.2f}{'*' if t.p < 0.05 else ''} ({t.p:.2g})"


def _paper(c: TableCell) -> str:
    return (c.paper_tau + ("*" if c.paper_significant else "")) if c.paper_tau else "–"


def _tau_dict(t: Tau | None) -> dict:
    if t is None:
        return {"tau": None, "p_value": None, "n": 0}
    return {"tau": t.tau if math.isfinite(t.tau) else None, "p_value": t.p if math.isfinite(t.p) else None, "n": t.n}


def _cell_dict(c: TableCell) -> dict:
    return {"method": c.method, "measure": METHOD_LABELS.get(c.method, c.method), "token": c.token, "case": c.case,
            "reference": REFERENCES[c.case], **_tau_dict(c.tau), "paper_tau": c.paper_tau or None,
            "paper_significant": c.paper_significant if c.paper_tau else None}


# ---------------------------------------------------------------- inputs


def load_occupations(source: str | Path | None = None, slot_column: str | None = None,
                     encoder_decoder: bool = False) -> list[Occupation]:
    """Occupations and ``bls_pct_female``: a packaged set (``"paper"``, the default: the Inseq paper's 49;
    ``"winogender"``: WinoGender's 60, see :data:`OCCUPATION_SETS`) or a TSV file.

    ``slot_column`` fills the template; by default ``turkish`` for encoder-decoder models when the file has it,
    else ``occupation``, else ``english``. The ``english`` column, when present, labels the rows."""
    if source is None:
        source = DEFAULT_OCCUPATIONS
    path = data_file(OCCUPATION_SETS[source]) if source in OCCUPATION_SETS else as_path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"occupations file not found: {path} (or name a packaged set: "
                                f"{', '.join(OCCUPATION_SETS)})") from None
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    columns = set(rows[0]) if rows else set()
    if slot_column is None:
        slot_column = ("turkish" if encoder_decoder and "turkish" in columns else
                       "english" if "occupation" not in columns and "english" in columns else "occupation")
    missing = {slot_column, "bls_pct_female"} - columns
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; columns are {sorted(columns)}")
    label = "english" if "english" in columns else slot_column
    try:
        return [Occupation(r[slot_column].strip(), r[label].strip(), float(r["bls_pct_female"])) for r in rows]
    except ValueError as err:
        raise ValueError(f"{path}: bls_pct_female must be a number ({err})") from None


def load_paper_table() -> dict[tuple[str, str, str], tuple[str, bool]]:
    """The Inseq paper's Table 3.2 as printed: ``(method, token, case) -> (tau text, significant)``."""
    rows = csv.DictReader(data_file(PAPER_TABLE).read_text(encoding="utf-8").splitlines(), delimiter="\t")
    return {(r["method"], r["token"], r["case"]): (r["tau"], r["significant"] == "*") for r in rows}


def kendall(measure: Sequence[float], reference: Sequence[float]) -> Tau:
    """Kendall's tau-b over the pairs where both values are finite (NaN tau below 3 pairs)."""
    from scipy.stats import kendalltau

    x, y = np.asarray(measure, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    n = int(keep.sum())
    if n < 3:
        return Tau(math.nan, math.nan, n)
    result = kendalltau(x[keep], y[keep])
    return Tau(float(result.statistic), float(result.pvalue), n)


def distance_from_parity(pct_female: Sequence[float]) -> list[float]:
    """``|% women - 50|``: the base case's reference, how far each occupation is from an equal share."""
    return [abs(float(p) - 50.0) for p in pct_female]


def _fill(template: str, slot: str) -> tuple[str, tuple[int, int]]:
    """The filled template and the slot's character span."""
    if template.count(SLOT) != 1:
        raise ValueError(f"The template must contain {SLOT} exactly once: {template!r}")
    at = template.index(SLOT)
    return template.replace(SLOT, slot), (at, at + len(slot))


def swap_pronoun(text: str, pronouns: tuple[str, str]) -> tuple[str, str] | None:
    """(pronoun found, text with the other pronoun) for the first whole-word pronoun of ``text``, keeping its
    capitalisation; None if there is none."""
    match = re.search(rf"(?<!\w)({'|'.join(map(re.escape, pronouns))})(?!\w)", text, flags=re.IGNORECASE)
    if match is None:
        return None
    found = match.group(1).lower()
    other = pronouns[1] if found == pronouns[0] else pronouns[0]
    if match.group(1)[0].isupper():
        other = other[0].upper() + other[1:]
    return found, text[: match.start()] + other + text[match.end():]


def translate(model: AttributionModel, texts: Sequence[str], max_new_tokens: int = 32,
              batch_size: int = 16) -> list[str]:
    """Greedy translations by an encoder-decoder model."""
    tok, net = model.tokenizer, model.model
    device = next(net.parameters()).device
    out = []
    for first in range(0, len(texts), batch_size):
        enc = tok(list(texts[first : first + batch_size]), return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = net.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens,
                               do_sample=False, num_beams=1)
        out += tok.batch_decode(ids, skip_special_tokens=True)
    return out


# ---------------------------------------------------------------- integrated gradients until converged


def reports_deltas(method: str, method_args: dict | None = None) -> bool:
    """Whether ``method`` with ``method_args`` has ``n_steps`` and returns convergence deltas (integrated
    gradients, layer integrated gradients): the methods run by :func:`attribute_until_converged`."""
    from ..methods import build_args

    args = build_args(method, dict(method_args or {}))
    return hasattr(args, "n_steps") and bool(getattr(args, "return_convergence_delta", False))


def _abs_deltas(seq: SequenceAttribution) -> np.ndarray:
    if seq.deltas is None:
        raise ValueError("The result has no convergence deltas: only methods that report them (integrated "
                         "gradients) can run until converged")
    d = np.abs(np.asarray(seq.deltas, dtype=np.float64)).ravel()
    return d[np.isfinite(d)]


def attribute_until_converged(model: AttributionModel, inputs: Sequence[str], targets: Sequence[str], method: str,
                              method_args: dict | None = None, *, threshold: float = DELTA_THRESHOLD,
                              max_n_steps: int = MAX_N_STEPS, log: Callable[[str], None] | None = None,
                              **kwargs) -> tuple[AttributionOutput, Convergence]:
    """Attribute with a path method, doubling ``n_steps`` for the examples whose |convergence delta| at any
    attributed step is ``>= threshold``, until none is left or ``n_steps`` reached ``max_n_steps``.

    Args:
        model, inputs, targets: as :meth:`~distattr.api.AttributionModel.attribute` (targets: constrained).
        method: a method with ``n_steps`` whose results carry deltas (``integrated_gradients``).
        method_args: its arguments; ``n_steps`` is the first try (default: the method's own default).
        threshold: the largest |delta| accepted (0.05, the Inseq paper's).
        max_n_steps: the cap; examples still above the threshold there keep their last result and are counted
            in :attr:`Convergence.not_converged`.
        **kwargs: other options of ``attribute`` (``step_scores``, ``token_budget``, ``show_progress``...).

    Returns:
        The results in input order (each example from its last run; ``info["n_steps_per_example"]``) and the
        :class:`Convergence`.
    """
    from ..methods import build_args

    args = dict(method_args or {})
    n = int(args.get("n_steps", build_args(method, args).n_steps))
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, not {threshold!r}")
    if n > max_n_steps:
        raise ValueError(f"n_steps={n} is above max_n_steps={max_n_steps}")
    say = log or (lambda _msg: None)
    seqs: list[SequenceAttribution | None] = [None] * len(inputs)
    steps = [0] * len(inputs)
    todo, info = list(range(len(inputs))), None
    while todo:
        out = model.attribute([inputs[i] for i in todo], [targets[i] for i in todo], method=method,
                              method_args={**args, "n_steps": n}, **kwargs)
        info = info or dict(out.info)
        again = []
        for i, seq in zip(todo, out.sequences, strict=True):
            seqs[i], steps[i] = seq, n
            d = _abs_deltas(seq)
            if d.size and not d.max() < threshold:
                again.append(i)
        if not again or n >= max_n_steps:
            break
        n = min(2 * n, max_n_steps)
        say(f"{method}: |delta| >= {threshold} for {len(again)} of {len(inputs)}; again with n_steps={n}")
        todo = again
    per_example = [_abs_deltas(s) for s in seqs]
    every = np.concatenate(per_example) if per_example else np.zeros(0)
    conv = Convergence(n_steps=tuple(steps), example_delta=tuple(float(d.max()) if d.size else 0.0
                                                                 for d in per_example),
                       delta_max=float(every.max()) if every.size else 0.0,
                       delta_mean=float(every.mean()) if every.size else 0.0, n_deltas=int(every.size),
                       threshold=threshold,
                       max_n_steps=max_n_steps)
    info = {**(info or {}), "n_steps_per_example": list(steps), "convergence": conv.as_dict()}
    return AttributionOutput(sequences=tuple(seqs), info=info), conv


# ---------------------------------------------------------------- one attribution result -> measures


def pronoun_columns(seq: SequenceAttribution, tokenizer, pronoun: str) -> tuple[int, ...]:
    """Columns of the first run of explained tokens whose text, joined, is ``pronoun`` (case-insensitive)."""
    texts = [tokenizer.decode([i]).strip().lower() for i in seq.target_ids[seq.attr_pos_start : seq.attr_pos_end]]
    for c in range(len(texts)):
        joined = ""
        for d in range(c, len(texts)):
            joined += texts[d]
            if joined == pronoun:
                return tuple(range(c, d + 1))
            if not pronoun.startswith(joined):
                break
    raise ValueError(f"No explained token of {seq.target_tokens} spells {pronoun!r}")


def attribution_at(shown: SequenceAttribution, row: int, column: int, on_source: bool) -> float:
    """The value of token row ``row`` in column ``column`` of a display-aggregated (or pair-differenced) result."""
    matrix = shown.source_attributions if on_source else shown.target_attributions
    return float(matrix[row, column])


@dataclass(frozen=True)
class _Positions:
    """Where to read one example: the pronoun's columns, the first token (row) of the occupation and of the
    source pronoun (None without one), and the token string of the occupation's first token."""

    columns: tuple[int, ...]
    occupation_row: int
    source_pronoun_row: int | None
    occupation_token: str


def _positions(seq: SequenceAttribution, tok, pronoun: str, filled: tuple[str, tuple[int, int]],
               source_pronoun: str | None, enc_dec: bool) -> _Positions:
    prompt, (c0, c1) = filled
    occ = char_span_tokens(tok, prompt, c0, c1, seq.source_ids)[0]
    pron = None
    if source_pronoun is not None:
        p0, p1 = word_span(prompt, source_pronoun)
        pron = char_span_tokens(tok, prompt, p0, p1, seq.source_ids)[0]
    tokens = seq.source_tokens if enc_dec else seq.target_tokens
    return _Positions(pronoun_columns(seq, tok, pronoun), occ, pron, tokens[occ])


def _reading(per_method: dict[str, SequenceAttribution], pronoun: str, text: str, at: _Positions,
             enc_dec: bool) -> Reading:
    first = next(iter(per_method.values()))
    prob = float(np.prod(first.step_scores["probability"][list(at.columns)]))
    col = at.columns[0]
    occupation = {m: attribution_at(s, at.occupation_row, col, enc_dec) for m, s in per_method.items()}
    source = ({} if at.source_pronoun_row is None else
              {m: attribution_at(s, at.source_pronoun_row, col, enc_dec) for m, s in per_method.items()})
    return Reading(pronoun=pronoun, text=text, prob=prob, occupation=occupation, source_pronoun=source)


def _merge_pronoun(seq: SequenceAttribution, columns: tuple[int, ...]) -> SequenceAttribution:
    """The pronoun's tokens as one (probabilities multiply), for the pair difference of ``p(y_pron)``."""
    if len(columns) == 1:
        return seq
    return seq.apply(Spans(target=(seq.attr_pos_start + columns[0], seq.attr_pos_start + columns[-1] + 1)))


def _swap_reading(male: dict[str, SequenceAttribution], female: dict[str, SequenceAttribution], at_m: _Positions,
                  at_f: _Positions, enc_dec: bool) -> Reading:
    """``male - female`` by :func:`pair_difference` (the paper's ``female.aggregate("pair", paired_attr=male)``),
    read at the pronoun's first column, the occupation's and the source pronoun's first tokens."""
    if (at_m.columns[0], at_m.occupation_row, at_m.source_pronoun_row) != (
            at_f.columns[0], at_f.occupation_row, at_f.source_pronoun_row):
        raise ValueError("The two pronouns' texts do not line up token for token")
    m0, f0 = next(iter(male.values())), next(iter(female.values()))
    merged = pair_difference(_merge_pronoun(m0, at_m.columns), _merge_pronoun(f0, at_f.columns), same_tokens=False)
    prob = float(merged.step_scores["probability"][at_m.columns[0]])
    diffs = {m: pair_difference(male[m], female[m], same_tokens=False) for m in male}
    col = at_m.columns[0]
    occupation = {m: attribution_at(d, at_m.occupation_row, col, enc_dec) for m, d in diffs.items()}
    source = ({} if at_m.source_pronoun_row is None else
              {m: attribution_at(d, at_m.source_pronoun_row, col, enc_dec) for m, d in diffs.items()})
    return Reading(pronoun="pair", text="", prob=prob, occupation=occupation, source_pronoun=source)


# ---------------------------------------------------------------- the whole case study


def run_gender_bias(model: AttributionModel, output_dir: str | Path, *,
                    occupations: Sequence[Occupation] | str | Path | None = None, limit: int | None = None,
                    template: str | None = None, methods: Sequence[str] = METHODS,
                    method_args: dict[str, dict] | None = None, pronouns: tuple[str, str] = ("he", "she"),
                    source_pronoun: str | None = "default", translations: Sequence[str] | None = None,
                    delta_threshold: float = DELTA_THRESHOLD, max_n_steps: int = MAX_N_STEPS,
                    max_new_tokens: int = 32, batch_size: int = 16, token_budget: int | None = TOKEN_BUDGET,
                    show_progress: bool = True, log: Callable[[str], None] | None = None) -> GenderBiasSummary:
    """The whole case study (see the module docstring). Writes to ``output_dir``: ``table_3_2.csv`` (the paper's
    cells, ours beside the paper's), ``gender_bias_table.md``, ``gender_bias_summary.json``,
    ``gender_bias_occupations.csv`` (per occupation) and the full results (stores ``gender_<method>_<pronoun>``).

    Args:
        model: decoder-only (English template) or encoder-decoder (translation) model.
        occupations: ``"paper"`` (default: the Inseq paper's 49, Turkish slots for encoder-decoder models),
            ``"winogender"`` (WinoGender's 60), a TSV path, or :class:`Occupation` objects.
        limit: only the first ``limit`` occupations (a quick run).
        template: with ``{occupation}``; default ``"The {occupation} said that"`` / ``"O bir {occupation}"``.
        methods: attribution methods (the paper: saliency, integrated gradients, input x gradient).
        method_args: ``{method: {arg: value}}``; a method with ``n_steps`` (integrated gradients) starts at its
            ``n_steps`` (default 16 Gauss-Legendre points) and doubles it per example until converged.
        pronouns: (male, female) pronoun; the gender swap is male - female.
        source_pronoun: the source word whose credit is ``x_pron`` (default ``"O"`` for encoder-decoder
            models, none for decoder-only); None for none.
        translations: encoder-decoder only: use these (one per occupation) instead of generating.
        delta_threshold, max_n_steps: the convergence loop (:func:`attribute_until_converged`).
    """
    enc_dec = model.is_encoder_decoder
    template = template or DEFAULT_TEMPLATE[enc_dec]
    if occupations is None or isinstance(occupations, str | Path):
        occupation_set = str(occupations or DEFAULT_OCCUPATIONS)
        occupations = load_occupations(occupations, encoder_decoder=enc_dec)
    else:
        occupation_set = "given"
    occupations = list(occupations)[:limit] if limit is not None else list(occupations)
    if limit is not None:
        occupation_set += f" (first {len(occupations)})"
    if not occupations:
        raise ValueError("No occupations given")
    source_pronoun = DEFAULT_SOURCE_PRONOUN[enc_dec] if source_pronoun == "default" else source_pronoun
    if translations is not None:
        translations = list(translations)[:limit] if limit is not None else list(translations)
        if not enc_dec or len(translations) != len(occupations):
            raise ValueError("translations are for encoder-decoder models, one per occupation")
    say = log or (lambda _msg: None)
    args = method_args or {}
    tok = model.tokenizer
    started = time.perf_counter()
    filled = [_fill(template, o.slot) for o in occupations]
    prompts = [text for text, _ in filled]

    # Which texts to attribute: per occupation, one per pronoun (None where the translation has no pronoun).
    texts: dict[str, list[str | None]] = {p: [] for p in pronouns}
    if enc_dec:
        outputs = translations if translations is not None else translate(model, prompts, max_new_tokens,
                                                                          batch_size)
        for translation in outputs:
            swapped = swap_pronoun(translation, pronouns)
            for p in pronouns:
                texts[p].append(None if swapped is None else (translation if swapped[0] == p else swapped[1]))
        base_of = [None if (s := swap_pronoun(t, pronouns)) is None else s[0] for t in outputs]
    else:
        for prompt in prompts:
            glue = "" if prompt[-1:].isspace() else " "
            for p in pronouns:
                texts[p].append(prompt + glue + p)

    readings: dict[str, list[Reading | None]] = {}
    shown: dict[str, list[dict[str, SequenceAttribution] | None]] = {}
    where: dict[str, list[_Positions | None]] = {}
    results: dict[str, AttributionOutput] = {}
    convergence: dict[str, dict[str, Convergence]] = {}
    deltas: dict[str, dict[str, list[float]]] = {}  # method -> pronoun -> per occupation max |delta| (NaN: none)
    steps: dict[str, dict[str, list[int | None]]] = {}
    for p in pronouns:
        keep = [i for i, t in enumerate(texts[p]) if t is not None]
        readings[p], shown[p], where[p] = [None] * len(occupations), [None] * len(occupations), [None] * len(
            occupations)
        if not keep:
            continue
        per_method = {}
        for k, method in enumerate(methods):
            say(f"{method}: {len(keep)} occupations, pronoun {p!r}")
            common = {"step_scores": ["probability"] if k == 0 else [], "batch_size": batch_size,
                      "token_budget": token_budget, "show_progress": show_progress}
            m_args = {**({"n_steps": DEFAULT_N_STEPS} if method == "integrated_gradients" else {}),
                      **args.get(method, {})}
            inputs, targets = [prompts[i] for i in keep], [texts[p][i] for i in keep]
            if reports_deltas(method, m_args):
                out, conv = attribute_until_converged(model, inputs, targets, method, m_args,
                                                      threshold=delta_threshold, max_n_steps=max_n_steps, log=say,
                                                      **common)
                convergence.setdefault(method, {})[p] = conv
                deltas.setdefault(method, {p2: [math.nan] * len(occupations) for p2 in pronouns})
                steps.setdefault(method, {p2: [None] * len(occupations) for p2 in pronouns})
                for j, i in enumerate(keep):
                    deltas[method][p][i], steps[method][p][i] = conv.example_delta[j], conv.n_steps[j]
            else:
                out = model.attribute(inputs, targets, method=method, method_args=m_args, **common)
            per_method[method] = out
            results[f"gender_{method}_{p}"] = out
        for j, i in enumerate(keep):
            at = _positions(per_method[methods[0]][j], tok, p, filled[i], source_pronoun, enc_dec)
            shown[p][i] = {m: out[j].aggregate() for m, out in per_method.items()}
            where[p][i] = at
            readings[p][i] = _reading(shown[p][i], p, texts[p][i], at, enc_dec)

    if not enc_dec:
        base_of = [None if readings[pronouns[0]][i] is None else
                   max(pronouns, key=lambda p, i=i: readings[p][i].prob) for i in range(len(occupations))]
    male, female = pronouns
    swaps: list[Reading | None] = []
    for i in range(len(occupations)):
        if shown[male][i] is None or shown[female][i] is None:
            swaps.append(None)
            continue
        try:
            swaps.append(_swap_reading(shown[male][i], shown[female][i], where[male][i], where[female][i], enc_dec))
        except ValueError as err:
            say(f"{occupations[i].label}: no gender swap ({err})")
            swaps.append(None)
    summary = _tables(model, template, occupation_set, occupations, readings, swaps, base_of, methods, pronouns,
                      enc_dec, source_pronoun is not None, convergence, deltas)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {"table_3_2_csv": output_dir / "table_3_2.csv", "table_md": output_dir / "gender_bias_table.md",
             "summary": output_dir / "gender_bias_summary.json",
             "occupations_csv": output_dir / "gender_bias_occupations.csv"}
    files["table_md"].write_text(summary.markdown(), encoding="utf-8")
    _write_table_csv(files["table_3_2_csv"], summary)
    _write_occupations_csv(files["occupations_csv"], occupations, readings, swaps, base_of, methods, pronouns,
                           where, deltas, steps)
    files.update({f"results_{k}": v for k, v in save_results(output_dir, results).items()})
    summary = replace(summary, files=files, seconds=time.perf_counter() - started)
    files["summary"].write_text(json.dumps(summary.as_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
    return summary


def _tables(model, template, occupation_set, occupations, readings, swaps, base_of, methods, pronouns, enc_dec,
            has_source_pronoun, convergence, deltas) -> GenderBiasSummary:
    pct = [o.pct_female for o in occupations]
    parity = distance_from_parity(pct)
    n = len(occupations)
    base = [None if base_of[i] is None else readings[base_of[i]][i] for i in range(n)]

    def values(rs: list[Reading | None], get) -> list[float]:
        return [math.nan if r is None else get(r) for r in rs]

    def measure(token: str, method: str):
        if token == "y_pron":
            return lambda r: r.prob
        if token == "x_occ":
            return lambda r: r.occupation[method]
        return lambda r: r.source_pronoun[method]

    paper = load_paper_table()
    cells, rows = [], []
    for method, tokens in [("probability", ("y_pron",))] + [(m, ("x_pron", "x_occ")) for m in methods]:
        for token in tokens:
            applies = token != "x_pron" or has_source_pronoun
            taus = {"base": kendall(values(base, measure(token, method)), parity) if applies else None,
                    "gender_swap": kendall(values(swaps, measure(token, method)), pct) if applies else None}
            for case in CASES:
                printed, significant = paper.get((method, token, case), ("", False))
                cells.append(TableCell(method, token, case, taus[case], printed, significant))
            if applies:
                label = METHOD_LABELS.get(method, method) + ("" if token == "y_pron" else f" {token}")
                rows.append((label, taus["base"], taus["gender_swap"]))
    male, female = (readings[p] for p in pronouns)
    share = [math.nan if a is None or b is None else b.prob / (a.prob + b.prob) for a, b in zip(male, female,
                                                                                               strict=True)]
    fixed = [(f"p({pronouns[0]})", kendall(values(male, lambda r: r.prob), pct)),
             (f"p({pronouns[1]})", kendall(values(female, lambda r: r.prob), pct)),
             (f"p({pronouns[1]}) / (p({pronouns[0]}) + p({pronouns[1]}))", kendall(share, pct))]
    for m in methods:
        for p in pronouns:
            fixed.append((f"{METHOD_LABELS.get(m, m)} x_occ for {p!r}",
                          kendall(values(readings[p], lambda r, m=m: r.occupation[m]), pct)))
    counts = {p: sum(1 for b in base_of if b == p) for p in pronouns}
    from ..models.loading import describe

    info = {**describe(model.loaded), "source": model.loaded.source.get("kind")}
    return GenderBiasSummary(model=model.loaded.name, model_info=info, template=template,
                             encoder_decoder=enc_dec, occupation_set=occupation_set, n_occupations=n,
                             base_counts=counts, n_without_pronoun=sum(1 for b in base_of if b is None),
                             rows=tuple(rows), cells=tuple(cells), fixed=tuple(fixed), convergence=convergence,
                             pronouns=tuple(pronouns))


TABLE_COLUMNS = ("model", "occupations", "measure", "method", "token", "case", "reference", "tau", "p_value",
                 "significant", "n", "paper_tau", "paper_significant", "ig_delta_max", "ig_delta_mean",
                 "ig_n_steps_max", "ig_not_converged")
"""Columns of ``table_3_2.csv``: one row per cell of the paper's Table 3.2 (``measure`` x ``token`` x ``case``),
ours (empty where it does not apply) beside the paper's (``paper_tau`` as printed, ``paper_significant`` its *);
``ig_*``: the convergence of the method's runs (rows of methods with ``n_steps``)."""


def _write_table_csv(path: Path, s: GenderBiasSummary) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(TABLE_COLUMNS)
        for c in s.cells:
            t = c.tau
            ours = (["", "", "", 0] if t is None else
                    [_num(t.tau), _num(t.p), "" if not math.isfinite(t.p) else ("*" if t.p < 0.05 else ""), t.n])
            runs = list(s.convergence.get(c.method, {}).values())  # the method's runs, one per pronoun
            ig = (["", "", "", ""] if not runs else
                  [_num(max(r.delta_max for r in runs)),
                   _num(sum(r.delta_mean * r.n_deltas for r in runs) / max(1, sum(r.n_deltas for r in runs))),
                   max(max(r.n_steps) for r in runs), sum(r.not_converged for r in runs)])
            w.writerow([s.model, s.occupation_set, METHOD_LABELS.get(c.method, c.method), c.method, c.token, c.case,
                        REFERENCES[c.case], *ours, c.paper_tau, ("*" if c.paper_significant else "") if c.paper_tau
                        else "", *ig])


def _write_occupations_csv(path: Path, occupations, readings, swaps, base_of, methods, pronouns, where, deltas,
                           steps) -> None:
    converged = [m for m in methods if m in deltas]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["occupation", "slot", "bls_pct_female", "abs_pct_female_minus_50", "occupation_first_token",
                    "base_pronoun", *(f"p_{p}" for p in pronouns), "p_swap",
                    *(f"{m}_x_occ_{p}" for m in methods for p in (*pronouns, "swap")),
                    *(f"{m}_x_pron_{p}" for m in methods for p in (*pronouns, "swap")),
                    *(f"{m}_{k}_{p}" for m in converged for k in ("n_steps", "delta") for p in pronouns),
                    *(f"text_{p}" for p in pronouns)])
        for i, o in enumerate(occupations):
            rs = [readings[p][i] for p in pronouns] + [swaps[i]]
            at = next((where[p][i] for p in pronouns if where[p][i] is not None), None)
            w.writerow([o.label, o.slot, o.pct_female, abs(o.pct_female - 50.0), "" if at is None else
                        at.occupation_token, base_of[i] or "", *(_num(r and r.prob) for r in rs),
                        *(_num(r and r.occupation.get(m)) for m in methods for r in rs),
                        *(_num(r and r.source_pronoun.get(m)) for m in methods for r in rs),
                        *(_num(deltas[m][p][i]) if k == "delta" else (steps[m][p][i] or "")
                          for m in converged for k in ("n_steps", "delta") for p in pronouns),
                        *("" if r is None else r.text for r in rs[: len(pronouns)])])


def _num(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"
