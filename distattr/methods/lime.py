"""LIME on full sequences: one forward per sample serves every step, one weighted ridge per step.

LIME (Ribeiro, Singh & Guestrin, KDD 2016) explains ``f`` near ``x`` with a linear surrogate over
*interpretable* features. Here a feature is a token ``j`` (of the source and/or the target prefix, as
:func:`~distattr.methods.base.attributed_sides` says) and ``z_j in {0, 1}`` says whether it is present
(``1``) or replaced by its baseline id (``0``: UNK, EOS kept, as for occlusion and the gradient methods).

* **Samples.** ``z^(i) ~ Bernoulli(1 - mask_prob)`` per token, ``i = 1..n_samples``, from a CPU
  ``torch.Generator`` seeded with ``seed`` (so an example's masks do not depend on its batch-mates or
  the device). Tokens equal to their baseline are not features: replacing them changes nothing; their
  score is 0 (as in occlusion).
* **One forward per sample.** Sample ``i`` is the whole sequence with the masked tokens replaced; one
  teacher-forced forward gives ``y_t^(i) = f_t(x^(i))`` for *every* step ``t`` of the example.
* **Per step.** A causal decoder's step ``t`` sees only decoder tokens ``j < t`` (and the whole
  source), so its features are ``F_t = {source tokens} u {target tokens j < t}`` and its design matrix
  is ``z`` restricted to ``F_t``. The restriction of iid Bernoulli masks is again iid Bernoulli masks
  over ``F_t``: each step gets exactly the sample distribution a per-step LIME would draw.
* **Kernel.** ``pi_t^(i) = exp(-D^2 / (2 w^2))`` with ``D`` the cosine distance between ``z^(i)|F_t``
  and the all-ones vector (the unperturbed input): ``D = 1 - sqrt(k / |F_t|)``, ``k`` = tokens kept.
  This is Captum's ``get_exp_kernel_similarity_function`` formula (``exp(-d^2 / (2 width^2))``, cosine
  distance; Captum's default width is 1.0 and it measures the distance on the model inputs), taken on
  the binary interpretable vector as the original ``lime`` package does for text. The default width 0.25
  makes it the ``lime`` package's text kernel exactly: ``LimeTextExplainer`` uses
  ``sqrt(exp(-(100 D)^2 / 25^2)) = exp(-D^2 / (2 * 0.25^2))``.
* **Surrogate.** Per step, weighted ridge with an unpenalised intercept:
  ``min_{b, c} sum_i pi^(i) (y^(i) - c - z^(i) . b)^2 + alpha |b|^2``, solved in closed form on the
  model's device in float64, batched over steps: with weighted means ``zbar, ybar``,
  ``(Zc^T W Zc + alpha I) b = Zc^T W (y - ybar)``, ``Zc = Z - zbar`` (the same solution as scikit-learn's
  ``Ridge(alpha, fit_intercept=True).fit(Z, y, sample_weight=pi)``; ``alpha = 0``: minimum-norm least
  squares). ``A[j, t] = b_j``: signed, in the units of the attributed function (the expected change of
  ``f_t`` when token ``j`` is present rather than replaced).

Cost per example: ``n_samples`` forwards over the full sequence (``S + N`` tokens), batched under the
token budget, plus ``T`` ridge solves of size ``|F_t|`` on the device. Inseq: ``n_samples`` (50) batch-1
forwards *per step* over the step's prefix (``50 T`` forwards) plus ``T`` scikit-learn ``Ridge`` fits on
``n_samples x (L_t * d)`` features on the CPU.

Inseq's ``lime`` (``inseq/attr/feat/ops/lime.py``, 0.7.1) is not a reference LIME; it differs in:

1. **Perturbation.** It masks the *embeddings*: ``emb * mask + (1 - mask) * tokenizer.unk_token_id``
   (``perturb_func``), so a masked token's embedding becomes the constant vector
   ``(unk_id, ..., unk_id)`` (``50256`` in every dimension for GPT-2, the zero vector when the UNK id is
   0), which is neither the UNK embedding nor any token. Here the token *id* is replaced, so the model
   sees the real baseline token.
2. **Interpretable representation.** ``to_interp_rep_transform`` returns the perturbed embeddings, so
   the surrogate regresses ``f`` on ``L * d`` raw embedding values (with only 50 samples) instead of on
   token presence; the ``[L, d]`` coefficients are then shown as their L2 norm over ``d`` (sign lost).
   Here: one signed coefficient per token.
3. **Weights.** ``token_similarity_kernel`` counts equal elements of the original and perturbed
   embedding tensors (about ``d`` times the number of kept tokens): a linear weight with no kernel or
   width. Here: the exponential kernel above.
4. **Sampling.** Mask probability 0.3 from the global torch RNG (not seedable per call). Its guard
   that never masks special tokens compares embedding rows with token ids, so it never applies: BOS
   and EOS get masked too. Here: ``mask_prob`` (default 0.5, Captum's), seeded; baseline-equal tokens
   (EOS by default) are never features.
5. **Scope.** Batch size forced to 1; encoder-decoder with ``attribute_target=True`` raises
   ``NotImplementedError``; the surrogate needs scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (
    Example,
    MethodOutput,
    Picks,
    Request,
    Row,
    attributed_sides,
    empty_outputs,
    forward_rows,
    repeat_picks,
)


@dataclass(frozen=True)
class LimeArgs:
    """``n_samples`` perturbed sequences per example (shared by all its steps); each token is replaced by
    its baseline with probability ``mask_prob``; exponential kernel of width ``kernel_width`` on the cosine
    distance of the binary sample to the original; ridge penalty ``alpha`` (0: least squares); ``seed``."""

    n_samples: int = 256
    mask_prob: float = 0.5
    kernel_width: float = 0.25
    alpha: float = 1.0
    seed: int = 42

    def __post_init__(self):
        if not isinstance(self.n_samples, int) or self.n_samples < 2:
            raise ValueError(f"n_samples must be an integer >= 2, not {self.n_samples!r}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), not {self.mask_prob!r}")
        if not self.kernel_width > 0.0:
            raise ValueError(f"kernel_width must be positive, not {self.kernel_width!r}")
        if not self.alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, not {self.alpha!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, not {self.seed!r}")


def run_lime(req: Request, args: LimeArgs) -> list[MethodOutput]:
    return lime_attribution(req, args)


def lime_attribution(req: Request, args: LimeArgs) -> list[MethodOutput]:
    sides = attributed_sides(req)
    outputs = []
    for ex in req.examples:
        source, target = empty_outputs(ex, sides)
        length = ex.end - 1
        src_feats = _features(ex.source_ids, ex.source_baseline) if source is not None else _none(ex)
        tgt_feats = _features(ex.target_ids[:length], ex.target_baseline[:length]) if target is not None else _none(ex)
        n_src, n_feats = len(src_feats), len(src_feats) + len(tgt_feats)
        generator = torch.Generator().manual_seed(args.seed)
        keep = (torch.rand(args.n_samples, n_feats, generator=generator) >= args.mask_prob).to(ex.target_ids.device)
        rows = _sample_rows(req, ex, keep[:, :n_src], src_feats, keep[:, n_src:], tgt_feats)
        picks = Picks.gather([(ex, t) for t in range(ex.start, ex.end)])
        y = forward_rows(req, rows, lambda logits, chunk, p=picks: req.target_fn(logits, repeat_picks(p, len(chunk)),
                                                                                None))
        y = y.view(args.n_samples, ex.n_steps)
        steps = torch.arange(ex.start, ex.end, device=keep.device)
        valid = torch.cat([torch.ones(ex.n_steps, n_src, dtype=torch.bool, device=keep.device),
                           tgt_feats.view(1, -1) < steps.view(-1, 1)], dim=1)  # [T, P]: features step t sees
        weights = cosine_kernel(keep, valid, args.kernel_width)
        coef = weighted_ridge(keep, y, weights, valid, args.alpha).float().cpu()  # [T, P]
        if source is not None:
            source[:] = 0.0
            source[src_feats.cpu()] = coef[:, :n_src].T
        if target is not None:
            target[:length] = 0.0
            target[tgt_feats.cpu()] = coef[:, n_src:].T
            future = torch.arange(len(ex.target_ids)).view(-1, 1) >= steps.cpu().view(1, -1)
            target[future] = float("nan")
        outputs.append(MethodOutput(source=source, target=target))
        if req.on_progress is not None:
            req.on_progress(ex.n_steps, args.n_samples * (length + (n_src if req.adapter.is_encoder_decoder else 0)))
    return outputs


def _features(ids: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Positions whose token differs from its baseline (the others cannot be perturbed)."""
    return torch.nonzero(ids != baseline).flatten()


def _none(ex: Example) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long, device=ex.target_ids.device)


def _sample_rows(req: Request, ex: Example, keep_src, src_feats, keep_tgt, tgt_feats) -> list[Row]:
    """The perturbed full sequences: masked features (``keep`` False) replaced by their baseline ids."""
    n = keep_src.shape[0]
    length = ex.end - 1
    tgt = ex.target_ids[:length].repeat(n, 1)
    tgt[:, tgt_feats] = torch.where(keep_tgt, tgt[:, tgt_feats], ex.target_baseline[tgt_feats])
    src = None
    if req.adapter.is_encoder_decoder:
        src = ex.source_ids.repeat(n, 1)
        src[:, src_feats] = torch.where(keep_src, src[:, src_feats], ex.source_baseline[src_feats])
    positions = torch.arange(ex.start - 1, length)
    return [(tgt[i], None if src is None else src[i], positions) for i in range(n)]


def cosine_kernel(keep: torch.Tensor, valid: torch.Tensor, width: float) -> torch.Tensor:
    """``[n, T]`` weights ``exp(-D^2 / (2 width^2))``, ``D`` = cosine distance between sample ``i``'s
    binary vector over step ``t``'s features and the all-ones vector: ``1 - sqrt(kept / features)``."""
    kept = keep.double() @ valid.double().T  # [n, T]
    n_feats = valid.sum(1).double().clamp_min(1.0)  # a step without features: distance 0, weight 1
    distance = torch.where(valid.any(1), 1.0 - (kept / n_feats).sqrt(), torch.zeros_like(kept))
    return torch.exp(-distance.square() / (2.0 * width**2))


def weighted_ridge(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, alpha: float,
                   max_elements: int = 1 << 24) -> torch.Tensor:
    """Coefficients ``[T, P]`` of ``min_{b, c} sum_i w_it (y_it - c - x_i[valid_t] . b)^2 + alpha |b|^2``
    per column ``t`` (intercept ``c`` not penalised), in float64; features outside ``valid_t`` get 0.

    ``x`` ``[n, P]`` (0/1 or real), ``y`` and ``weights`` ``[n, T]``, ``valid`` ``[T, P]`` bool. Steps are
    solved in batches of at most ``max_elements`` elements of ``[steps, n, P]``."""
    x, y, w, v = x.double(), y.double(), weights.double(), valid.double()
    n, p = x.shape
    chunk = max(1, max_elements // max(1, n * max(p, 1), p * p))
    coefs = []
    for first in range(0, y.shape[1], chunk):
        sl = slice(first, first + chunk)
        wc, vc = w[:, sl].T, v[sl]  # [Tc, n], [Tc, P]
        total = wc.sum(1).clamp_min(torch.finfo(torch.float64).tiny)
        x_mean = (wc @ x) / total[:, None]  # [Tc, P]
        y_mean = (wc * y[:, sl].T).sum(1) / total  # [Tc]
        xc = (x.unsqueeze(0) - x_mean.unsqueeze(1)) * vc.unsqueeze(1)  # [Tc, n, P], invalid columns zeroed
        yc = y[:, sl].T - y_mean[:, None]  # [Tc, n]
        xw = xc * wc.unsqueeze(-1)
        gram = xw.transpose(1, 2) @ xc + torch.diag_embed(alpha * vc + (1.0 - vc))  # invalid: identity rows
        rhs = (xw.transpose(1, 2) @ yc.unsqueeze(-1)).squeeze(-1)
        if alpha > 0:
            b = torch.linalg.solve(gram, rhs)
        else:
            b = (torch.linalg.pinv(gram, hermitian=True) @ rhs.unsqueeze(-1)).squeeze(-1)
        coefs.append(b * vc)
    return torch.cat(coefs) if coefs else torch.zeros(0, p, dtype=torch.float64, device=x.device)

