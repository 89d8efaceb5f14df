"""ReAGent: recursive attribution by random replacement, every step and probe of a request batched as rows.

ReAGent (Zhao & Shan 2024, "ReAGent: a model-agnostic feature attribution method for generative language
models", arXiv 2402.00794), as Inseq implements it (``inseq/attr/feat/ops/reagent.py`` and
``reagent_core/``). For step ``t`` (target ``y_t``, features ``F_t`` = the tokens step ``t`` sees on the
attributed sides) and each of ``num_probes`` independent probes:

1. ``s ~ U(0, 1)^{|F_t|}`` (importance logits); ``p = f_t(x)`` on the clean input.
2. Repeat for at most ``max_probe_steps`` iterations:

   a. *Update.* Draw ``R`` (each feature with probability ``replacing_ratio``), replace those tokens with
      the replacer's tokens, ``Delta = p - f_t(x~)``; for every feature
      ``s_j += logit((delta_j + 1) / 2)`` with ``delta_j = Delta`` if ``j in R`` else ``-Delta``.
   b. *Stopping check.* Keep the top ``n`` features by ``softmax(s)`` (``n = keep_top_n``, or
      ``ceil(keep_ratio |F_t|)`` when ``keep_top_n = 0``), replace all the others (``invert_keep``:
      replace the top ``n`` and keep the rest); the probe has converged, and stops updating, when ``y_t``
      is among the model's ``stopping_condition_top_k`` most likely tokens.
3. ``A[:, t]`` = mean of ``softmax(s)`` over the converged probes (over all probes if none converged, as
   Inseq does since inseq#305; the 0.7.1 release divides by zero and returns a NaN column). Each column
   sums to 1 over the attributed tokens.

**Rows.** A probe of the update step is one *full-sequence* row with replacements anywhere: its forward
gives ``f_t(x~)`` for every step, and step ``t`` uses ``R`` restricted to the tokens it sees, which has
exactly the distribution a per-step draw would have (tokens at or after ``t`` cannot influence step ``t``
of a causal decoder). So one update forward per probe serves all steps still probing. The stopping check
depends on step ``t``'s own ranking and needs one prefix row per unconverged (step, probe); a check that
replaces nothing (``n >= |F_t|``) reuses the clean prediction. Rows of all examples, steps and probes are
batched together under the token budget; an example's random numbers come from its own CPU generator
seeded with ``seed``, so they do not depend on its batch-mates or the device.

**Replacer.** Any callable ``replacer(ids [B, C], mask [B, C], generator) -> ids`` that returns ``ids``
with the ``mask`` positions replaced (``generator``: a CPU ``torch.Generator``; draw on the CPU, move to
``ids.device``). ``"uniform"`` (default): tokens drawn uniformly from the model's vocabulary. The paper
samples replacements from RoBERTa's predictions; Inseq uses a uniform draw among tokens with the same
NLTK POS tag (``POSTagTokenSampler``, which needs nltk and its tagger data); either can be passed as a
callable (for encoder-decoder models ``ids`` is the source followed by the decoder tokens, as in Inseq).

**Attributed function.** ``Delta`` uses the attributed function (``probability`` by default, which is
Inseq's fixed choice); the update needs ``|Delta| <= 1``, so a function whose clean value lies outside
``[0, 1]`` is refused. ``(delta + 1) / 2`` is clamped to ``[1e-6, 1 - 1e-6]`` (Inseq gets ``+-inf`` and
NaN scores when ``|Delta| = 1`` in floating point). The stopping check asks whether the target token is in
the top ``k``, whatever the attributed function.

Cost. ``I`` = update rounds (at most ``max_probe_steps``; until every probe of every step converged),
``P = num_probes``, ``T`` steps, ``L_t`` = step ``t``'s prefix, ``N`` the sequence. Per example: 1 clean row
(all steps); per round, one update row per probe with an unconverged step, cut after that probe's last
unconverged step (at most ``N`` tokens), plus one check row of ``L_t`` tokens per unconverged (step, probe)
that replaces something. At most ``1 + I P (1 + T)`` rows, ``I P (N + sum_t L_t)`` tokens, all of a
request's examples batched together. Inseq, per step: 1 forward of ``P`` prefix rows, then ``I_t`` rounds of
2 forwards of ``P`` prefix rows (update and check, converged probes included): ``sum_t (1 + 2 I_t)``
forwards (about ``2 P sum_t I_t L_t`` tokens), one step after another, batch size 1 per example.
Defaults as Inseq: ``keep_top_n=5, stopping_condition_top_k=3, replacing_ratio=0.3,
max_probe_steps=3000, num_probes=16``.

Differences from Inseq 0.7.1 besides the batching: the replacer is pluggable and uniform by default
(Inseq's POS sampler cannot run without nltk), runs are seeded, ``keep_ratio`` with ``keep_top_n != 0``
is an error (Inseq silently ignores ``keep_ratio`` unless ``keep_top_n`` is 0), encoder-decoder models
work without ``attribute_target`` (Inseq's ``Reagent.attribute`` falls through to the decoder-only call
with the target embeddings as ids and fails), and the scores are token-level (Inseq repeats them over the
hidden size, then shows their L2 norm and renormalises: the same numbers after normalisation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..models.adapters import Adapter
from .base import Example, MethodOutput, Picks, Request, Row, attributed_sides, empty_outputs, forward_rows

_EPS = 1e-6


class Replacer(Protocol):
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``ids [B, C]`` with the ``mask [B, C]`` positions replaced."""
        ...


@dataclass(frozen=True)
class UniformReplacer:
    """Replacement tokens drawn uniformly from ``[0, vocab_size)``."""

    vocab_size: int

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        sampled = torch.randint(0, self.vocab_size, tuple(ids.shape), generator=generator).to(ids.device)
        return torch.where(mask, sampled, ids)


def _model_vocab(adapter: Adapter) -> int:
    rows = adapter.embedding.weight.shape[0]
    configured = getattr(adapter.model.config, "vocab_size", None)
    return min(rows, configured) if isinstance(configured, int) and configured > 0 else rows


REPLACERS: dict[str, Callable[[Adapter], Replacer]] = {
    "uniform": lambda adapter: UniformReplacer(_model_vocab(adapter)),
}


@dataclass(frozen=True)
class ReagentArgs:
    """Inseq's arguments (same names and defaults): keep the ``keep_top_n`` most important tokens (0: the
    ``keep_ratio`` fraction) in the stopping check, replacing the others (``invert_keep``: the reverse);
    a probe converges when the target is in the model's top ``stopping_condition_top_k``; each update
    replaces tokens with probability ``replacing_ratio``; at most ``max_probe_steps`` updates;
    ``num_probes`` probes per step. Plus ``replacer`` (``"uniform"`` or a callable, see the module) and
    ``seed``."""

    keep_top_n: int = 5
    keep_ratio: float | None = None
    invert_keep: bool = False
    stopping_condition_top_k: int = 3
    replacing_ratio: float = 0.3
    max_probe_steps: int = 3000
    num_probes: int = 16
    replacer: str | Callable = "uniform"
    seed: int = 42

    def __post_init__(self):
        def positive_int(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")

        for name in ("stopping_condition_top_k", "max_probe_steps", "num_probes"):
            positive_int(name)
        if not isinstance(self.keep_top_n, int) or self.keep_top_n < 0:
            raise ValueError(f"keep_top_n must be a non-negative integer, not {self.keep_top_n!r}")
        if self.keep_top_n == 0:
            if self.keep_ratio is None or not 0.0 < self.keep_ratio <= 1.0:
                raise ValueError(f"keep_top_n=0 needs keep_ratio in (0, 1], not {self.keep_ratio!r}")
        elif self.keep_ratio is not None:
            raise ValueError("keep_ratio is used only with keep_top_n=0; set one of them")
        if not 0.0 < self.replacing_ratio <= 1.0:
            raise ValueError(f"replacing_ratio must be in (0, 1], not {self.replacing_ratio!r}")
        if isinstance(self.replacer, str) and self.replacer not in REPLACERS:
            raise ValueError(f"Unknown replacer {self.replacer!r}; use one of {sorted(REPLACERS)} or a callable")
        if not isinstance(self.replacer, str) and not callable(self.replacer):
            raise ValueError("replacer must be a name or a callable(ids, mask, generator) -> ids")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, not {self.seed!r}")


@dataclass(frozen=True)
class _Probes:
    """One example's probing state (``scores`` and ``done`` are updated in place). Coordinates ``c`` run
    over the source tokens (encoder-decoder) followed by the decoder tokens ``0 .. end-2``."""

    ex: Example
    ids: torch.Tensor  # [C]
    n_src: int
    feats: torch.Tensor  # [T, C] bool: the features of each step
    picks: Picks
    generator: torch.Generator
    clean: torch.Tensor  # [T] f_t(x)
    clean_hit: torch.Tensor  # [T] bool: target in the clean top k
    scores: torch.Tensor  # [T, P, C] importance logits
    done: torch.Tensor  # [T, P] bool: converged

    def row(self, ids: torch.Tensor, length: int, positions: torch.Tensor) -> Row:
        return _row(ids, self.n_src, length, positions)


def _row(ids: torch.Tensor, n_src: int, length: int, positions: torch.Tensor) -> Row:
    """A model row from combined ``ids``: the decoder tokens ``[:length]`` and the source (if any)."""
    return ids[n_src : n_src + length], (ids[:n_src] if n_src else None), positions


def run_reagent(req: Request, args: ReagentArgs) -> list[MethodOutput]:
    return reagent_attribution(req, args)


def reagent_attribution(req: Request, args: ReagentArgs, stats: dict | None = None) -> list[MethodOutput]:
    """``stats`` (optional) receives ``iterations`` (update rounds run) and ``converged`` (per example, the
    fraction of converged probes per step, ``[T]``)."""
    replacer = REPLACERS[args.replacer](req.adapter) if isinstance(args.replacer, str) else args.replacer
    sides = attributed_sides(req)
    states = [_start(req, ex, sides, args) for ex in req.examples]
    k, n_probes = args.stopping_condition_top_k, args.num_probes
    reported = [torch.zeros(ex.n_steps, dtype=torch.bool) for ex in req.examples]
    iterations = 0
    while iterations < args.max_probe_steps and any(not bool(s.done.all()) for s in states):
        iterations += 1
        live = [s for s in states if not bool(s.done.all())]
        tokens = _update(req, live, replacer, args.replacing_ratio, n_probes)
        tokens += _check(req, live, replacer, args, k)
        if req.on_progress is not None:
            finished = 0
            for i, s in enumerate(states):
                now = s.done.all(1).cpu()
                finished += int((now & ~reported[i]).sum())
                reported[i] |= now
            req.on_progress(finished, tokens)
    if req.on_progress is not None:
        remaining = sum(int((~r).sum()) for r in reported)
        if remaining:
            req.on_progress(remaining, 0)
    if stats is not None:
        stats["iterations"] = iterations
        stats["converged"] = [s.done.float().mean(1).cpu() for s in states]
    return [_finish(s, sides) for s in states]


def _start(req: Request, ex: Example, sides, args: ReagentArgs) -> _Probes:
    enc_dec = req.adapter.is_encoder_decoder
    length = ex.end - 1
    device = ex.target_ids.device
    n_src = len(ex.source_ids) if enc_dec else 0
    ids = torch.cat([ex.source_ids, ex.target_ids[:length]]) if enc_dec else ex.target_ids[:length]
    steps = torch.arange(ex.start, ex.end, device=device)
    src_feat = torch.full((ex.n_steps, n_src), "source" in sides, dtype=torch.bool, device=device)
    tgt_feat = (torch.arange(length, device=device).view(1, -1) < steps.view(-1, 1)) & ("target" in sides)
    feats = torch.cat([src_feat, tgt_feat], dim=1)
    generator = torch.Generator().manual_seed(args.seed)
    picks = Picks.gather([(ex, t) for t in range(ex.start, ex.end)])
    k = args.stopping_condition_top_k

    def clean(logits, chunk):
        values = req.target_fn(logits, picks, None).float()
        return torch.stack([values, _in_top_k(logits, picks.target_ids, k).float()], dim=1)

    out = forward_rows(req, [_row(ids, n_src, length, steps - 1)], clean)
    values = out[:, 0]
    if bool(((values < -_EPS) | (values > 1 + _EPS)).any()):
        raise ValueError("ReAGent updates its scores with differences of the attributed function and needs values "
                         f"in [0, 1] (a probability); got {values.min().item():.4g} .. {values.max().item():.4g}")
    scores = torch.rand(ex.n_steps, args.num_probes, len(ids), generator=generator).to(device)
    done = torch.zeros(ex.n_steps, args.num_probes, dtype=torch.bool, device=device)
    return _Probes(ex=ex, ids=ids, n_src=n_src, feats=feats, picks=picks, generator=generator, clean=values,
                   clean_hit=out[:, 1].bool(), scores=scores, done=done)


def _in_top_k(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each row's target is among its ``k`` largest logits (ties count in the target's favour)."""
    target_logit = logits.gather(1, targets.view(-1, 1))
    return (logits > target_logit).sum(1) < k


def _update(req: Request, live: list[_Probes], replacer: Replacer, ratio: float, n_probes: int) -> int:
    """One update round: per probe still probing some step, one row up to its last unconverged step (which
    scores every step up to there); returns the tokens run."""
    rows, row_picks, plans = [], [], []
    for s in live:
        active = ~s.done  # [T, P]
        probes = torch.nonzero(active.any(0)).flatten()
        n_scored = (active[:, probes] * torch.arange(1, len(active) + 1, device=active.device).view(-1, 1)).amax(0)
        replaceable = s.feats.any(0)
        draw = torch.rand(n_probes, len(s.ids), generator=s.generator).to(s.ids.device) < ratio
        mask = (draw & replaceable)[probes]
        ids = replacer(s.ids.expand(len(probes), -1), mask, s.generator)
        for i, n in enumerate(n_scored.tolist()):
            length = s.ex.start + n - 1  # decoder tokens up to the last scored step's input
            rows.append(s.row(ids[i], length, torch.arange(s.ex.start - 1, length, device=s.ids.device)))
            row_picks.append(_first_picks(s.picks, n))
        plans.append((s, probes, mask, n_scored))
    values = forward_rows(req, rows, lambda logits, chunk: req.target_fn(
        logits, cat_picks([row_picks[r] for r in chunk]), None)).float()
    offset = 0
    for s, probes, mask, n_scored in plans:
        counts = n_scored.tolist()
        n = sum(counts)
        cols = torch.repeat_interleave(torch.arange(len(probes), device=n_scored.device), n_scored)
        steps = torch.cat([torch.arange(k, device=n_scored.device) for k in counts])
        replaced = s.clean.view(-1, 1).repeat(1, len(probes))  # [T, Pa]; unscored steps: no change
        replaced[steps, cols] = values[offset : offset + n].to(replaced.device)
        offset += n
        delta = (s.clean.view(-1, 1) - replaced).unsqueeze(-1)  # [T, Pa, 1]
        signed = torch.where(mask.unsqueeze(0), delta, -delta)  # [T, Pa, C]
        step = torch.logit((signed * 0.5 + 0.5).clamp(_EPS, 1.0 - _EPS))
        live_feats = (~s.done[:, probes]).unsqueeze(-1) & s.feats.unsqueeze(1)
        s.scores[:, probes] += torch.where(live_feats, step, torch.zeros_like(step))
    return sum(len(t) + (len(src) if src is not None else 0) for t, src, _ in rows)


def _first_picks(picks: Picks, n: int) -> Picks:
    return Picks(*(None if v is None else v[:n] for v in (picks.target_ids, picks.contrast_ids, picks.contrast_logits)))


def _check(req: Request, live: list[_Probes], replacer: Replacer, args: ReagentArgs, k: int) -> int:
    """The stopping check of every unconverged (step, probe): keep the top features, replace the rest."""
    rows, targets, plans = [], [], []
    for s in live:
        steps, probes = torch.nonzero(~s.done, as_tuple=True)
        feats = s.feats[steps]  # [A, C]
        ranked = s.scores[steps, probes].masked_fill(~feats, float("-inf"))
        order = torch.argsort(ranked, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                .expand_as(order).contiguous())
        if args.keep_top_n:
            n_keep = torch.full((len(steps),), args.keep_top_n, device=feats.device)
        else:
            n_keep = torch.ceil(args.keep_ratio * feats.sum(1).double()).long()
        top = rank < n_keep.view(-1, 1)
        mask = feats & (top if args.invert_keep else ~top)
        hit = s.clean_hit[steps].clone()
        needed = torch.nonzero(mask.any(1)).flatten()
        if len(needed):
            ids = replacer(s.ids.expand(len(needed), -1), mask[needed], s.generator)
            step_targets = s.picks.target_ids[steps[needed]]
            for i, step in enumerate(steps[needed].tolist()):
                t = s.ex.start + step
                rows.append(s.row(ids[i], t, torch.tensor([t - 1], device=s.ids.device)))
                targets.append(step_targets[i : i + 1])
        plans.append((s, steps, probes, hit, needed))
    if rows:
        checked = forward_rows(req, rows, lambda logits, chunk: _in_top_k(
            logits, torch.cat([targets[r] for r in chunk]), k))
    offset = 0
    for s, steps, probes, hit, needed in plans:
        if len(needed):
            hit[needed] = checked[offset : offset + len(needed)].to(hit.device)
            offset += len(needed)
        s.done[steps, probes] = hit
    return sum(len(t) + (len(src) if src is not None else 0) for t, src, _ in rows)


def cat_picks(picks: list[Picks]) -> Picks:
    """The picks of several rows, concatenated."""
    first = picks[0]
    return Picks(torch.cat([p.target_ids for p in picks]),
                 None if first.contrast_ids is None else torch.cat([p.contrast_ids for p in picks]),
                 None if first.contrast_logits is None else torch.cat([p.contrast_logits for p in picks]))


def _finish(s: _Probes, sides) -> MethodOutput:
    ex = s.ex
    importance = s.scores.masked_fill(~s.feats.unsqueeze(1), float("-inf")).softmax(-1)  # [T, P, C]
    weights = s.done.float()
    weights[~s.done.any(1)] = 1.0  # no probe converged: average all of them (as Inseq since #305)
    mean = (importance * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)  # [T, C]
    mean = mean.cpu()
    source, target = empty_outputs(ex, sides)
    if source is not None:
        source[:] = mean[:, : s.n_src].T
    if target is not None:
        length = ex.end - 1
        target[:length] = mean[:, s.n_src :].T
        future = torch.arange(len(ex.target_ids)).view(-1, 1) >= torch.arange(ex.start, ex.end).view(1, -1)
        target[future] = float("nan")
    return MethodOutput(source=source, target=target)

