"""Gender bias: pronoun probabilities and attributions against labor statistics (the Inseq paper's Table 3.2).

A template with an occupation slot is filled with each occupation; the model's gendered pronoun for it is
scored (its probability, and how much each attribution method credits the occupation token(s) and, for
translation, the gender-neutral source pronoun), and each measure is correlated across occupations with
the share of women in that occupation (U.S. BLS statistics) by Kendall's tau (``scipy.stats.kendalltau``,
tau-b, with its two-sided p-value).

* **Encoder-decoder (the paper's setting):** Turkish ``"O bir {occupation}"`` -> English with
  Helsinki-NLP/opus-mt-tr-en. The greedy translation's pronoun ("He"/"She") is the *base* reading; the
  *gender swap* is the same translation with the other pronoun, attributed by constrained decoding.
  ``x_pron`` is the source pronoun ``O``, ``x_occ`` the occupation.
* **Decoder-only (English):** ``"The {occupation} said that"`` followed by `` he`` or `` she``. The *base*
  reading is the pronoun the model gives the higher probability after the prompt (not necessarily its
  greedy next token), the *gender swap* the other one. There is no source pronoun, so no ``x_pron``.

Attribution of the occupation: Inseq's display normalisation (each generated token's column divided by its
L1 norm over the attributed tokens, scores being L2 norms over the hidden size), summed over the
occupation's tokens, in the column of the pronoun's (first) token: the occupation's share of the credit.
``p(y_pron)`` is the pronoun's probability (a product over its tokens if it has several).
"""

from __future__ import annotations

import csv
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..api import AttributionModel
from ..results import AttributionOutput, SequenceAttribution
from . import as_path, data_file
from .storage import save_results
from .tokens import char_span_tokens, word_span

SLOT = "{occupation}"
DEFAULT_TEMPLATE = {False: "The {occupation} said that", True: "O bir {occupation}"}
DEFAULT_OCCUPATIONS = {False: "occupations-stats.tsv", True: "inseq_turkish_occupations_bls.tsv"}
DEFAULT_SOURCE_PRONOUN = {False: None, True: "O"}
METHODS = ("saliency", "integrated_gradients", "input_x_gradient")
METHOD_LABELS = {"saliency": "∇", "integrated_gradients": "IG", "input_x_gradient": "I×G"}
DEFAULT_METHOD_ARGS = {"integrated_gradients": {"n_steps": 16}}
TOKEN_BUDGET = 512  # padded tokens per batch: faster on a CPU than the library's memory-first default


@dataclass(frozen=True)
class Occupation:
    """``slot`` fills the template (English, or Turkish for MT), ``label`` names it in tables (English)."""

    slot: str
    label: str
    pct_female: float


@dataclass(frozen=True)
class Reading:
    """One occupation with one pronoun: the attributed text, ``p(pronoun)``, and per method the share of the
    pronoun's attribution on the occupation (``occupation``) and on the source pronoun (``source_pronoun``)."""

    pronoun: str
    text: str
    prob: float
    occupation: dict[str, float]
    source_pronoun: dict[str, float]


@dataclass(frozen=True)
class Tau:
    """Kendall's tau-b of a measure with ``bls_pct_female`` over ``n`` occupations, two-sided p-value."""

    tau: float
    p: float
    n: int


@dataclass(frozen=True)
class GenderBiasSummary:
    """The tables: ``rows`` in the paper's shape (measure -> base, gender swap) and ``fixed`` (measures of
    one pronoun, e.g. ``p(she)``, whatever the model preferred)."""

    model: str
    template: str
    encoder_decoder: bool
    n_occupations: int
    base_counts: dict[str, int]
    n_without_pronoun: int
    rows: tuple[tuple[str, Tau, Tau], ...]
    fixed: tuple[tuple[str, Tau], ...]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def markdown(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in self.base_counts.items())
        head = [f"Gender bias, {self.model}, template {self.template!r}: {self.n_occupations} occupations; "
                f"base pronoun {counts}" + (f"; no pronoun in {self.n_without_pronoun}" if self.n_without_pronoun
                                             else ""),
                "", "Kendall τ with the share of women (BLS), p-value in brackets, * p < 0.05:", "",
                "| measure | Base | GenderSwap |", "|---|---:|---:|"]
        head += [f"| {name} | {_cell(b)} | {_cell(s)} |" for name, b, s in self.rows]
        head += ["", "| measure (fixed pronoun) | τ |", "|---|---:|"]
        head += [f"| {name} | {_cell(t)} |" for name, t in self.fixed]
        return "\n".join(head) + "\n"


def _cell(t: Tau) -> str:
    if not math.isfinite(t.tau):
        return f"n/a (n={t.n})"
    return f"{t.tau:+.2f}{'*' if t.p < 0.05 else ''} ({t.p:.2g})"


# ---------------------------------------------------------------- inputs


def load_occupations(path: str | Path | None = None, slot_column: str | None = None) -> list[Occupation]:
    """Occupations and ``bls_pct_female`` from a TSV (default: WinoGender's ``occupations-stats.tsv``).

    ``slot_column`` fills the template (default ``occupation``, else ``english``); the ``english`` column,
    when present, labels the rows."""
    source = data_file(DEFAULT_OCCUPATIONS[False]) if path is None else as_path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"occupations file not found: {source}") from None
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    columns = set(rows[0]) if rows else set()
    slot_column = slot_column or ("occupation" if "occupation" in columns else "english")
    missing = {slot_column, "bls_pct_female"} - columns
    if missing:
        raise ValueError(f"{source}: missing column(s) {sorted(missing)}; columns are {sorted(columns)}")
    label = "english" if "english" in columns else slot_column
    try:
        return [Occupation(r[slot_column].strip(), r[label].strip(), float(r["bls_pct_female"])) for r in rows]
    except ValueError as err:
        raise ValueError(f"{source}: bls_pct_female must be a number ({err})") from None


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


def credit_share(seq: SequenceAttribution, column: int, rows: tuple[int, int], on_source: bool) -> float:
    """Sum over token rows ``[a, b)`` of column ``column`` after Inseq's display normalisation."""
    shown = seq.aggregate()
    matrix = shown.source_attributions if on_source else shown.target_attributions
    return float(np.nansum(matrix[rows[0] : rows[1], column]))


# ---------------------------------------------------------------- the whole case study


def run_gender_bias(model: AttributionModel, output_dir: str | Path, *,
                    occupations: Sequence[Occupation] | None = None, template: str | None = None,
                    methods: Sequence[str] = METHODS, method_args: dict[str, dict] | None = None,
                    pronouns: tuple[str, str] = ("he", "she"), source_pronoun: str | None = "default",
                    translations: Sequence[str] | None = None, max_new_tokens: int = 32, batch_size: int = 16,
                    token_budget: int | None = TOKEN_BUDGET, show_progress: bool = True,
                    log: Callable[[str], None] | None = None) -> GenderBiasSummary:
    """The whole case study; writes ``gender_bias_table.md``, ``gender_bias_table.csv``,
    ``gender_bias_occupations.csv`` and the full results (``gender_<method>_<reading>.json``) to ``output_dir``.

    Args:
        model: decoder-only (English template) or encoder-decoder (translation) model.
        occupations: default: WinoGender's 60 (decoder-only) or the paper's 49 Turkish ones (encoder-decoder).
        template: with ``{occupation}``; default ``"The {occupation} said that"`` / ``"O bir {occupation}"``.
        methods: attribution methods (the paper: saliency, integrated gradients, input x gradient).
        method_args: ``{method: {arg: value}}``, e.g. ``{"integrated_gradients": {"n_steps": 50}}`` (default:
            16 Gauss-Legendre points for integrated gradients; the stored results hold the convergence deltas).
        pronouns: (male, female) pronoun.
        source_pronoun: the source word whose credit is ``x_pron`` (default ``"O"`` for encoder-decoder
            models, none for decoder-only); None for none.
        translations: encoder-decoder only: use these (one per occupation) instead of generating.
    """
    enc_dec = model.is_encoder_decoder
    template = template or DEFAULT_TEMPLATE[enc_dec]
    if occupations is None:
        occupations = load_occupations(data_file(DEFAULT_OCCUPATIONS[enc_dec]), "turkish" if enc_dec else None)
    occupations = list(occupations)
    if not occupations:
        raise ValueError("No occupations given")
    source_pronoun = DEFAULT_SOURCE_PRONOUN[enc_dec] if source_pronoun == "default" else source_pronoun
    if translations is not None and (not enc_dec or len(translations) != len(occupations)):
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
        outputs = list(translations) if translations is not None else translate(model, prompts, max_new_tokens,
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
    results: dict[str, AttributionOutput] = {}
    for p in pronouns:
        keep = [i for i, t in enumerate(texts[p]) if t is not None]
        readings[p] = [None] * len(occupations)
        if not keep:
            continue
        per_method = {}
        for k, method in enumerate(methods):
            say(f"{method}: {len(keep)} occupations, pronoun {p!r}")
            out = model.attribute([prompts[i] for i in keep], [texts[p][i] for i in keep], method=method,
                                  method_args={**DEFAULT_METHOD_ARGS.get(method, {}), **args.get(method, {})},
                                  step_scores=["probability"] if k == 0 else [], batch_size=batch_size,
                                  token_budget=token_budget, show_progress=show_progress)
            per_method[method] = out
            results[f"gender_{method}_{p}"] = out
        for j, i in enumerate(keep):
            readings[p][i] = _reading(per_method, j, p, texts[p][i], tok, filled[i], source_pronoun, enc_dec)

    if not enc_dec:
        base_of = [None if readings[pronouns[0]][i] is None else
                   max(pronouns, key=lambda p, i=i: readings[p][i].prob) for i in range(len(occupations))]
    summary = _tables(model, template, occupations, readings, base_of, methods, pronouns, enc_dec,
                      source_pronoun is not None)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {"table_md": output_dir / "gender_bias_table.md", "table_csv": output_dir / "gender_bias_table.csv",
             "occupations_csv": output_dir / "gender_bias_occupations.csv"}
    files["table_md"].write_text(summary.markdown(), encoding="utf-8")
    _write_table_csv(files["table_csv"], summary)
    _write_occupations_csv(files["occupations_csv"], occupations, readings, base_of, methods, pronouns)
    files.update({f"results_{k}": v for k, v in save_results(output_dir, results).items()})
    return replace(summary, files=files, seconds=time.perf_counter() - started)


def _reading(per_method: dict[str, AttributionOutput], j: int, pronoun: str, text: str, tok,
             filled: tuple[str, tuple[int, int]], source_pronoun: str | None, enc_dec: bool) -> Reading:
    prompt, (c0, c1) = filled
    first = next(iter(per_method.values()))[j]
    columns = pronoun_columns(first, tok, pronoun)
    prob = float(np.prod(first.step_scores["probability"][list(columns)]))
    occ_tokens = char_span_tokens(tok, prompt, c0, c1, first.source_ids)
    pron_tokens = None
    if source_pronoun is not None:
        p0, p1 = word_span(prompt, source_pronoun)
        pron_tokens = char_span_tokens(tok, prompt, p0, p1, first.source_ids)
    occupation, source = {}, {}
    for method, out in per_method.items():
        seq = out[j]
        col = pronoun_columns(seq, tok, pronoun)[0]
        occupation[method] = credit_share(seq, col, occ_tokens, on_source=enc_dec)
        if pron_tokens is not None:
            source[method] = credit_share(seq, col, pron_tokens, on_source=enc_dec)
    return Reading(pronoun=pronoun, text=text, prob=prob, occupation=occupation, source_pronoun=source)


def _tables(model, template, occupations, readings, base_of, methods, pronouns, enc_dec, has_source_pronoun):
    pct = [o.pct_female for o in occupations]
    n = len(occupations)

    def pick(which: str) -> list[Reading | None]:
        out = []
        for i in range(n):
            base = base_of[i]
            if base is None:
                out.append(None)
                continue
            p = base if which == "base" else next(q for q in pronouns if q != base)
            out.append(readings[p][i])
        return out

    def values(rs: list[Reading | None], get) -> list[float]:
        return [math.nan if r is None else get(r) for r in rs]

    base, swap = pick("base"), pick("swap")
    rows = [("p(y_pron)", kendall(values(base, lambda r: r.prob), pct), kendall(values(swap, lambda r: r.prob), pct))]
    for m in methods:
        label = METHOD_LABELS.get(m, m)
        if has_source_pronoun:
            rows.append((f"{label} x_pron", kendall(values(base, lambda r, m=m: r.source_pronoun[m]), pct),
                         kendall(values(swap, lambda r, m=m: r.source_pronoun[m]), pct)))
        rows.append((f"{label} x_occ", kendall(values(base, lambda r, m=m: r.occupation[m]), pct),
                     kendall(values(swap, lambda r, m=m: r.occupation[m]), pct)))
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
    name = getattr(model.loaded, "name", "model")
    return GenderBiasSummary(model=name, template=template, encoder_decoder=enc_dec, n_occupations=n,
                             base_counts=counts, n_without_pronoun=sum(1 for b in base_of if b is None),
                             rows=tuple(rows), fixed=tuple(fixed))


def _write_table_csv(path: Path, s: GenderBiasSummary) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["table", "measure", "reading", "tau", "p_value", "n"])
        for name, base, swap in s.rows:
            for reading, t in (("base", base), ("gender_swap", swap)):
                w.writerow(["paper", name, reading, f"{t.tau:.6g}", f"{t.p:.6g}", t.n])
        for name, t in s.fixed:
            w.writerow(["fixed_pronoun", name, "", f"{t.tau:.6g}", f"{t.p:.6g}", t.n])


def _write_occupations_csv(path: Path, occupations, readings, base_of, methods, pronouns) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["occupation", "slot", "bls_pct_female", "base_pronoun",
                    *(f"p_{p}" for p in pronouns), *(f"{m}_x_occ_{p}" for m in methods for p in pronouns),
                    *(f"{m}_x_pron_{p}" for m in methods for p in pronouns), *(f"text_{p}" for p in pronouns)])
        for i, o in enumerate(occupations):
            rs = [readings[p][i] for p in pronouns]
            w.writerow([o.label, o.slot, o.pct_female, base_of[i] or "",
                        *(_num(r and r.prob) for r in rs),
                        *(_num(r and r.occupation.get(m)) for m in methods for r in rs),
                        *(_num(r and r.source_pronoun.get(m)) for m in methods for r in rs),
                        *("" if r is None else r.text for r in rs)])


def _num(value) -> str:
    return "" if value is None else f"{value:.6g}"
