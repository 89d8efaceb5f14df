"""The engine, top to bottom: texts -> token sequences -> step scores -> method rows -> results.

1. :func:`prepare` tokenizes the inputs, generates (or takes the given target texts), and fixes the
   attributed positions, the UNK baselines and the contrastive targets of every example.
2. :func:`score_steps` computes the requested step scores from one no-grad forward per batch of full
   sequences (not one per step).
3. The method (``distattr.methods``) turns examples into rows, batches them under a token budget and
   returns token-level matrices.
4. :func:`assemble` builds the :class:`~distattr.results.AttributionOutput`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import alignment
from .methods.base import Example, MethodOutput, Picks, Request
from .models.adapters import Adapter, dropout_rerun, id_rows, input_device
from .models.loading import LoadedModel, context_length
from .models.quantization import guard_4bit_gradients
from .models.small_batch import small_batch_linears
from .options import AttributeOptions, CheckedOptions
from .planner import token_budget_for
from .results import AttributionOutput, SequenceAttribution
from .steps import Contrast, StepContext, StepFunction


@dataclass(frozen=True)
class Inputs:
    """What one ``attribute`` call explains: the input texts, the targets to attribute instead of generating
    (None: generate), and the contrastive targets and sources of ``contrast_*`` step functions (one per input)."""

    texts: tuple[str, ...]
    generated_texts: tuple | None = None
    contrast_targets: tuple[str, ...] | None = None
    contrast_sources: tuple[str, ...] | None = None

    @classmethod
    def of(cls, texts, generated_texts=None, contrast_targets=None, contrast_sources=None) -> Inputs:
        return cls(texts=tuple(_as_list(texts, "input text")), generated_texts=_sequence(generated_texts),
                   contrast_targets=_sequence(contrast_targets), contrast_sources=_sequence(contrast_sources))


def _sequence(value) -> tuple | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class Prepared:
    """Examples plus what is needed to show them: source ids (encoder or prompt) and contrast data."""

    examples: list[Example]
    source_ids: list[list[int]]
    generated_texts: list[str]
    contrast: list[dict | None]


# ---------------------------------------------------------------- 1. preparation


def _as_list(texts, what: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError(f"No {what} given")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what} #{i} is a {type(t).__name__}, not a string")
        if not t.strip():
            raise ValueError(f"{what} #{i} is empty")
    return texts


def encode_text(tokenizer, text: str, add_special: bool, as_target: bool = False) -> list[int]:
    enc = tokenizer(text_target=text, add_special_tokens=add_special) if as_target else tokenizer(
        text, add_special_tokens=add_special)
    ids = list(enc["input_ids"])
    bos = tokenizer.bos_token_id
    if len(ids) >= 2 and bos is not None and ids[0] == ids[1] == bos:  # double BOS from a chat template
        ids = ids[1:]
    return ids


def _decoder_start(model) -> int:
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = model.config.bos_token_id
    if start is None:
        raise ValueError("Encoder-decoder model without decoder_start_token_id or bos_token_id")
    return int(start)


def _eos_id(model, tokenizer) -> int | None:
    eos = getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    return eos if eos is not None else tokenizer.eos_token_id


def unk_id(tokenizer) -> int:
    for candidate in (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("The tokenizer has no UNK, PAD or EOS token to build baselines from")


def _baseline(ids: torch.Tensor, unk: int, eos: int | None, keep_eos: bool, keep_first: bool) -> torch.Tensor:
    """Inseq's baseline: UNK everywhere, EOS kept (unless ``include_eos_baseline``), BOS of targets kept."""
    base = torch.full_like(ids, unk)
    if keep_eos and eos is not None:
        base = torch.where(ids == eos, ids, base)
    if keep_first:
        base[0] = ids[0]
    return base


def _generate(loaded: LoadedModel, sources: list[list[int]], args: dict, batch_size: int) -> list[list[int]]:
    """Greedy (or as ``args`` say) generation in batches; returns the new token ids of each input."""
    model, tokenizer = loaded.model, loaded.tokenizer
    enc_dec = model.config.is_encoder_decoder
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = input_device(model)
    outputs: list[list[int]] = []
    for first in range(0, len(sources), batch_size):
        chunk = sources[first : first + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            if enc_dec:  # right padding for encoders
                ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
            else:  # left padding so that generation continues right after each prompt
                ids[i, width - len(s) :], mask[i, width - len(s) :] = torch.tensor(s), 1
        kwargs = {"do_sample": False, **args}
        with torch.no_grad(), small_batch_linears(model):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad,
                                 **kwargs)
        for row in out.tolist():
            outputs.append(row if enc_dec else row[width:])
    return outputs


def _clean_generation(new_ids: list[int], tokenizer, eos: int | None, enc_dec: bool) -> list[int]:
    """Cut at the first EOS (kept for encoder-decoder targets, as re-tokenizing Inseq's text adds it) and
    drop padding / other special tokens (Inseq decodes with ``skip_special_tokens``)."""
    special = set(tokenizer.all_special_ids)
    kept = []
    for tok in new_ids:
        if tok == eos:
            if enc_dec:
                kept.append(tok)
            break
        if tok not in special:
            kept.append(tok)
    return kept


def resolve_positions(start: int | None, end: int | None, length: int, default_start: int) -> tuple[int, int]:
    """Inseq's ``attr_pos_start``/``attr_pos_end``: indices into the target, end exclusive, negatives
    from the end; the start is never before ``default_start`` (the prompt length for decoder-only)."""
    s = default_start if start is None else (start + length if start < 0 else start)
    e = length if end is None else (end + length if end < 0 else end)
    if not 0 <= s <= length or not 0 <= e <= length:
        raise ValueError(f"attr_pos_start={start}, attr_pos_end={end} fall outside the target of {length} tokens")
    s = max(s, default_start)
    if s >= e:
        raise ValueError(
            f"Nothing to attribute: start {s} >= end {e} (target of {length} tokens; attribution starts at "
            f"{default_start} at the earliest)"
        )
    return s, e


def _aligned(t: int, pairs: list | None) -> int:
    if pairs:
        matches = [c for o, c in pairs if o == t]
        if matches:
            return min(matches)
    return t


def prepare(loaded: LoadedModel, inputs: Inputs, call: CheckedOptions) -> Prepared:
    model, tokenizer = loaded.model, loaded.tokenizer
    enc_dec = bool(model.config.is_encoder_decoder)
    device = input_device(model)
    cfg = call.options
    add_special = not cfg.skip_special_tokens
    sources = list(inputs.texts)
    n = len(sources)
    source_ids = [encode_text(tokenizer, s, add_special) for s in sources]
    limit = context_length(model.config)

    if inputs.generated_texts is not None:
        targets, target_ids = _given_targets(loaded, sources, source_ids, inputs.generated_texts, add_special)
    else:
        for s, ids in zip(sources, source_ids, strict=True):
            if limit is not None and len(ids) >= limit:
                raise ValueError(f"Input of {len(ids)} tokens does not fit the model's context of {limit} "
                                 f"({loaded.name}): {s[:60]!r}")
        targets, target_ids = _generated_targets(loaded, source_ids, cfg)

    contrast_t, contrast_s = inputs.contrast_targets, inputs.contrast_sources
    if contrast_t is not None and len(contrast_t) != n:
        raise ValueError(f"{len(contrast_t)} contrast targets for {n} inputs: give one per input")
    if contrast_s is not None:
        if not enc_dec:
            raise ValueError("contrast_sources are for encoder-decoder models; use contrast_targets with the "
                             "contrastive prompt included for decoder-only models")
        if len(contrast_s) != n:
            raise ValueError(f"{len(contrast_s)} contrast sources for {n} inputs")
    alignments = _per_example_alignments(cfg.contrast_targets_alignments, n)

    unk, eos = unk_id(tokenizer), _eos_id(model, tokenizer)
    keep_eos = not cfg.include_eos_baseline
    attributed = call.attributed
    examples, contrast_info = [], []
    for i in range(n):
        tgt = torch.tensor(target_ids[i], dtype=torch.long, device=device)
        if limit is not None and len(tgt) > limit:
            raise ValueError(f"Sequence #{i} has {len(tgt)} tokens, longer than {loaded.name}'s context of {limit} "
                             "tokens")
        if enc_dec and limit is not None and len(source_ids[i]) > limit:
            raise ValueError(f"Source #{i} has {len(source_ids[i])} tokens, longer than {loaded.name}'s context of "
                             f"{limit} tokens")
        default_start = 1 if enc_dec else len(source_ids[i])
        if not enc_dec and len(tgt) <= default_start and cfg.attr_pos_start is None:
            raise ValueError(f"Nothing was generated for input #{i}; raise max_new_tokens or give generated_texts")
        start, end = resolve_positions(cfg.attr_pos_start, cfg.attr_pos_end, len(tgt), default_start)
        src = src_base = None
        if enc_dec:
            src = torch.tensor(source_ids[i], dtype=torch.long, device=device)
            src_base = _baseline(src, unk, eos, keep_eos, keep_first=False)
        info = None
        contrast_ids = None
        if contrast_t is not None or contrast_s is not None:
            info = _contrast_for(loaded, i, target_ids[i], source_ids[i], inputs, cfg, alignments[i], start, end,
                                 add_special)
            if attributed.contrastive:
                contrast_ids = info["step_targets"]
        elif attributed.contrastive:
            contrast_ids = tgt[start:end]  # no contrast given: the original is its own contrast (as Inseq)
        examples.append(Example(
            target_ids=tgt, target_baseline=_baseline(tgt, unk, eos, keep_eos, keep_first=enc_dec),
            start=start, end=end, source_ids=src, source_baseline=src_base, contrast_target_ids=contrast_ids,
            contrast_ids=info["ids"] if info is not None else None,
        ))
        contrast_info.append(info)
    return Prepared(examples=examples, source_ids=source_ids, generated_texts=targets, contrast=contrast_info)


def _given_targets(loaded: LoadedModel, sources: list[str], source_ids: list[list[int]], generated_texts,
                   add_special: bool) -> tuple[list[str], list[list[int]]]:
    """Targets of constrained decoding: texts, or token-id sequences as in ``SequenceAttribution.target_ids``."""
    model, tokenizer = loaded.model, loaded.tokenizer
    enc_dec = bool(model.config.is_encoder_decoder)
    given = [generated_texts] if isinstance(generated_texts, str) else list(generated_texts)
    if len(given) != len(sources):
        raise ValueError(f"{len(given)} generated texts for {len(sources)} input texts")
    if given and all(isinstance(t, list | tuple) for t in given):
        target_ids = [[int(x) for x in t] for t in given]
        for i, (src, ids) in enumerate(zip(source_ids, target_ids, strict=True)):
            if not enc_dec and ids[: len(src)] != src:
                raise ValueError(f"Target ids #{i} do not start with the input's {len(src)} token ids")
            if len(ids) <= (1 if enc_dec else len(src)):
                raise ValueError(f"Target ids #{i} contain nothing to attribute")
        return [tokenizer.decode(t, skip_special_tokens=True) for t in target_ids], target_ids
    targets = _as_list(given, "generated text")
    if enc_dec:
        start_tok = _decoder_start(model)
        return targets, [[start_tok, *encode_text(tokenizer, t, add_special, as_target=True)] for t in targets]
    for s, t in zip(sources, targets, strict=True):
        if not t.startswith(s):
            raise ValueError(f"For decoder-only models a generated text must start with its input: {t!r} "
                             f"does not start with {s!r}")
    return targets, [encode_text(tokenizer, t, add_special) for t in targets]


def _generated_targets(loaded: LoadedModel, source_ids: list[list[int]],
                       cfg: AttributeOptions) -> tuple[list[str], list[list[int]]]:
    """Greedy (or ``generation_args``) continuations: the target texts and full target-id sequences."""
    model, tokenizer = loaded.model, loaded.tokenizer
    enc_dec = bool(model.config.is_encoder_decoder)
    new = _generate(loaded, source_ids, dict(cfg.generation_args), cfg.batch_size)
    eos = _eos_id(model, tokenizer)
    new = [_clean_generation(x[1:] if enc_dec else x, tokenizer, eos, enc_dec) for x in new]
    if enc_dec:
        # As Inseq: the target is the generated text tokenized as a target (which appends EOS).
        targets = [tokenizer.decode(x, skip_special_tokens=True) for x in new]
        start_tok = _decoder_start(model)
        add_special = not cfg.skip_special_tokens
        return targets, [[start_tok, *encode_text(tokenizer, t, add_special, as_target=True)] for t in targets]
    target_ids = [s + x for s, x in zip(source_ids, new, strict=True)]
    return [tokenizer.decode(t, skip_special_tokens=True) for t in target_ids], target_ids


def generate_targets(loaded: LoadedModel, texts: Sequence[str], cfg: AttributeOptions) -> list[list[int]]:
    """The target-id sequences :func:`attribute` would generate for ``texts`` (to attribute them later in
    pieces, e.g. one long example's steps on several workers)."""
    add_special = not cfg.skip_special_tokens
    source_ids = [encode_text(loaded.tokenizer, s, add_special) for s in _as_list(texts, "input text")]
    return _generated_targets(loaded, source_ids, cfg)[1]


def _per_example_alignments(alignments, n: int) -> list[list | str | None]:
    """One alignment per input: a list of pairs, ``"auto"`` (resolved in :func:`_contrast_for`) or None."""
    if alignments is None:
        return [None] * n
    if isinstance(alignments, str):
        return [_alignment_method(alignments)] * n
    items = list(alignments)
    if items and all(isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(x, int) for x in p)
                     for p in items):
        return [[tuple(p) for p in items]] * n
    if len(items) != n:
        raise ValueError(
            "contrast_targets_alignments: give one list of (target, contrast) index pairs, 'auto', or one of "
            "those per input"
        )
    return [_alignment_method(per) if isinstance(per, str) else [tuple(p) for p in per] for per in items]


def _alignment_method(name: str) -> str:
    if name not in alignment.ALIGNMENT_METHODS:
        raise ValueError(f"Unknown contrast_targets_alignments method {name!r}; available: "
                         f"{', '.join(alignment.ALIGNMENT_METHODS)}, or (target, contrast) index pairs")
    return name


def _contrast_for(loaded: LoadedModel, i: int, target_ids: list[int], source_ids: list[int], inputs: Inputs,
                  cfg: AttributeOptions, pairs: list | None, start: int, end: int, add_special: bool) -> dict:
    """Contrast ids for example ``i``: the contrastive decoder sequence, its source, and per step the aligned
    position and target token."""
    model, tokenizer = loaded.model, loaded.tokenizer
    enc_dec = bool(model.config.is_encoder_decoder)
    device = input_device(model)
    if inputs.contrast_targets is not None:
        text = inputs.contrast_targets[i]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Contrast target #{i} is empty")
        c_ids = ([_decoder_start(model), *encode_text(tokenizer, text, add_special, as_target=True)] if enc_dec
                 else encode_text(tokenizer, text, add_special))
    else:
        c_ids = list(target_ids)
    c_src = (encode_text(tokenizer, inputs.contrast_sources[i], add_special) if inputs.contrast_sources is not None
             else source_ids)
    if isinstance(pairs, str):  # "auto": one pair per target position, by embedding similarity
        pairs = alignment.auto_align(model, tokenizer, target_ids, c_ids, cfg.contrast_alignment_model)
    if pairs:
        for o, c in pairs:
            if not (0 <= o < len(target_ids) and 0 <= c < len(c_ids)):
                raise ValueError(f"Alignment pair ({o}, {c}) is out of range for target of {len(target_ids)} and "
                                 f"contrast of {len(c_ids)} tokens")
    positions = []
    for t in range(start, end):
        a = _aligned(t, pairs)
        if not 1 <= a < len(c_ids):
            raise ValueError(
                f"Contrast target #{i} has {len(c_ids)} tokens: no token aligned to target position {t} "
                f"(aligned index {a}). Give contrast_targets_alignments or a longer contrast."
            )
        positions.append(a)
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    c = torch.tensor(c_ids, dtype=torch.long, device=device)
    return {"ids": c, "source_ids": torch.tensor(c_src, dtype=torch.long, device=device), "positions": pos,
            "step_targets": c[pos]}


# ---------------------------------------------------------------- 2. step scores


def score_steps(adapter: Adapter, prepared: Prepared, fns: dict[str, StepFunction], args: dict,
                token_budget: int) -> list[dict[str, torch.Tensor]]:
    """Step scores ``{name: [n_steps]}`` per example, from batched full-sequence forwards."""
    if not fns:
        return [{} for _ in prepared.examples]
    needs_contrast = any(f.contrastive for f in fns.values())
    results: list[dict[str, torch.Tensor]] = [{} for _ in prepared.examples]
    order = sorted(range(len(prepared.examples)), key=lambda i: -len(prepared.examples[i].target_ids))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * len(prepared.examples[current[0]].target_ids) > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    with torch.no_grad():
        for batch in batches:
            exs = [prepared.examples[i] for i in batch]
            rows, scored = id_rows(adapter, [(ex.target_ids[: ex.end - 1], ex.source_ids,
                                                    torch.arange(ex.start - 1, ex.end - 1)) for ex in exs])
            logits = adapter.forward(rows, scored).logits
            targets = torch.cat([ex.target_ids[ex.start : ex.end] for ex in exs])
            contrast = _contrast_logits(adapter, prepared, batch, exs) if needs_contrast else None
            rerun = dropout_rerun(adapter, rows, scored)
            ctx = StepContext(logits=logits, target_ids=targets, contrast=contrast, rerun=rerun)
            sizes = [ex.n_steps for ex in exs]
            for name, fn in fns.items():
                values = fn.fn(ctx, **args.get(name, {})).float().cpu()
                for i, v in zip(batch, values.split(sizes), strict=True):
                    results[i][name] = v
    return results


def _contrast_logits(adapter: Adapter, prepared: Prepared, batch: list[int], exs: list[Example]) -> Contrast:
    infos = [prepared.contrast[i] for i in batch]
    if any(info is None for info in infos):
        # no contrast given: the original serves as contrast (same output, as Inseq)
        rows, scored = id_rows(adapter, [(ex.target_ids[: ex.end - 1], ex.source_ids,
                                                torch.arange(ex.start - 1, ex.end - 1)) for ex in exs])
        return Contrast(adapter.forward(rows, scored).logits, torch.cat([ex.target_ids[ex.start:ex.end] for ex in exs]))
    spec = [(info["ids"][: int(info["positions"].max())], info["source_ids"], info["positions"] - 1) for info in infos]
    rows, scored = id_rows(adapter, spec)
    logits = adapter.forward(rows, scored).logits
    # flattened logits follow the (distinct, ascending) scored positions of each row; map steps onto them
    # (several steps may align to the same contrast position)
    order, offset = [], 0
    for info in infos:
        distinct = info["positions"].unique(sorted=True)
        order.append(offset + torch.searchsorted(distinct, info["positions"]))
        offset += len(distinct)
    logits = logits[torch.cat(order)]
    return Contrast(logits, torch.cat([info["step_targets"] for info in infos]))


def _with_contrast_logits(adapter: Adapter, prepared: Prepared) -> Prepared:
    """Attach the contrastive forward's logits ``[n_steps, V]`` to every example (``contrast_force_inputs``):
    the attributed function then compares the original forward with a fixed contrastive one."""
    examples = []
    with torch.no_grad():
        for i, ex in enumerate(prepared.examples):
            contrast = _contrast_logits(adapter, prepared, [i], [ex])
            examples.append(dataclasses.replace(ex, contrast_target_ids=contrast.target_ids,
                                                contrast_logits=contrast.logits))
    return dataclasses.replace(prepared, examples=examples)


# ---------------------------------------------------------------- 3. method


def target_function(call: CheckedOptions):
    """The attributed function as the methods call it: ``f(logits, targets, contrast_ids, rerun) -> [K]``."""
    cfg, step = call.options, call.attributed
    kwargs = dict(cfg.attributed_fn_args)
    if cfg.attributed_fn == "kl_divergence":
        kwargs["contrast_force_inputs"] = cfg.contrast_force_inputs

    def fn(logits: torch.Tensor, picks: Picks, rerun) -> torch.Tensor:
        contrast = None
        if picks.contrast_ids is not None:
            c_logits = picks.contrast_logits if picks.contrast_logits is not None else logits
            contrast = Contrast(c_logits, picks.contrast_ids)
        ctx = StepContext(logits=logits, target_ids=picks.target_ids, contrast=contrast, rerun=rerun,
                          is_attributed_fn=True)
        return step.fn(ctx, **kwargs)

    return fn


def run_method(adapter: Adapter, prepared: Prepared, call: CheckedOptions, on_progress=None,
               special_ids: frozenset[int] = frozenset()) -> list[MethodOutput]:
    cfg = call.options
    request = Request(
        adapter=adapter, examples=prepared.examples, target_fn=target_function(call),
        attribute_target=cfg.attribute_target or not adapter.is_encoder_decoder,
        hidden_reduction=cfg.hidden_reduction, token_budget=cfg.token_budget, steps_per_row=cfg.steps_per_row,
        recompute=cfg.recompute,
        on_progress=on_progress, special_ids=special_ids,
    )
    return call.method.run(request, call.method_args)


# ---------------------------------------------------------------- 4. results


def assemble(loaded: LoadedModel, prepared: Prepared, outputs: list[MethodOutput],
             scores: list[dict[str, torch.Tensor]]) -> list[SequenceAttribution]:
    tokenizer = loaded.tokenizer
    enc_dec = bool(loaded.model.config.is_encoder_decoder)
    sequences = []
    for ex, src_ids, out, sc in zip(prepared.examples, prepared.source_ids, outputs, scores, strict=True):
        tgt_ids = ex.target_ids.tolist()
        sequences.append(SequenceAttribution(
            source_tokens=tuple(tokenizer.convert_ids_to_tokens(src_ids)),
            target_tokens=tuple(tokenizer.convert_ids_to_tokens(tgt_ids)),
            source_ids=tuple(src_ids), target_ids=tuple(tgt_ids),
            source_attributions=out.source.numpy().astype("float32") if out.source is not None and enc_dec else None,
            target_attributions=out.target.numpy().astype("float32") if out.target is not None else None,
            step_scores={k: v.numpy().astype("float32") for k, v in sc.items()},
            attr_pos_start=ex.start, attr_pos_end=ex.end,
            deltas=out.deltas.numpy().astype("float32") if out.deltas is not None else None,
            dims=out.extra_dims, dim_labels=out.extra_labels,
        ))
    return sequences


def _alignment_info(prepared: Prepared) -> list[list[list[int]] | None] | None:
    """Per input, the ``[target position, contrast position]`` used at each attributed step (None: no contrast)."""
    if all(c is None for c in prepared.contrast):
        return None
    return [None if c is None else [[t, p] for t, p in enumerate(c["positions"].tolist(), start=ex.start)]
            for ex, c in zip(prepared.examples, prepared.contrast, strict=True)]


def attribute(loaded: LoadedModel, adapter: Adapter, inputs: Inputs, options: AttributeOptions | CheckedOptions,
              progress=None) -> AttributionOutput:
    """Run the whole pipeline; ``progress(total_steps)`` returns an ``on_progress(steps, tokens)`` callback.
    ``options`` are checked here unless they come checked."""
    call = options if isinstance(options, CheckedOptions) else options.check()
    guard_4bit_gradients(loaded.model)  # bitsandbytes must not repack 4-bit weights in no-grad forwards
    if call.options.token_budget is None:
        budget = token_budget_for(loaded.model)  # one policy for attribute() and dataset actors: the planner's
        call = dataclasses.replace(call, options=dataclasses.replace(call.options, token_budget=budget))
    cfg = call.options
    started = time.perf_counter()
    prepared = prepare(loaded, inputs, call)
    if cfg.contrast_force_inputs and call.attributed.contrastive:
        prepared = _with_contrast_logits(adapter, prepared)
    generated_at = time.perf_counter()
    scores = score_steps(adapter, prepared, call.step_functions, cfg.step_scores_args, cfg.token_budget)
    total_steps = sum(ex.n_steps for ex in prepared.examples)
    on_progress = progress(total_steps) if progress is not None else None
    try:
        outputs = run_method(adapter, prepared, call, on_progress, frozenset(loaded.tokenizer.all_special_ids))
    finally:
        if on_progress is not None and hasattr(on_progress, "close"):
            on_progress.close()
    finished = time.perf_counter()
    sequences = assemble(loaded, prepared, outputs, scores)
    info = {
        "input_texts": list(inputs.texts),
        "generated_texts": prepared.generated_texts,
        "constrained_decoding": inputs.generated_texts is not None,
        **cfg.info(),
        "contrast_targets": list(inputs.contrast_targets) if inputs.contrast_targets else None,
        "contrast_sources": list(inputs.contrast_sources) if inputs.contrast_sources else None,
        "contrast_alignments": _alignment_info(prepared),
        "timing": {"prepare_s": generated_at - started, "attribute_s": finished - generated_at,
                   "total_s": finished - started},
        "attributed_steps": total_steps,
    }
    return AttributionOutput(sequences=tuple(sequences), info=info)
