"""Aggregation: subwords to words (BPE and SentencePiece, with and without a tokenizer), spans, slices,
aggregation functions over any dim, pipelines, step score merges, pair differences, results read back from
disk, error messages, and parity with Inseq 0.7.1's aggregators."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import distattr
from distattr.aggregate import (
    AGGREGATION_FUNCTIONS,
    Normalize,
    Reduce,
    Rescale,
    Slice,
    Spans,
    Words,
    apply,
    merge_spans,
    pair_difference,
    step_merge_rule,
    word_spans,
)
from distattr.results import AttributionOutput, SequenceAttribution
from distattr.steps import STEP_FUNCTIONS

TEXT = "the Eiffel tower is located in Paris, café\n\nNew"
WORDS = ["the", " Eiffel", " tower", " is", " located", " in", " Paris,", " café", "\n\nNew"]


# --- tokenizers built from vocabularies: no hub, no downloads -----------------------------------------------


def byte_level_tokenizer():
    """GPT-2-style byte-level BPE pieces (``Ġ`` = space, ``Ċ`` = newline), as a unigram model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<|endoftext|>", "the", "Ġthe", "ĠE", "iff", "el", "Ġtower", "Ġis", "Ġloc", "ated", "Ġin", "ĠPar",
              "is", ",", "Ġcaf", "ĠĊ", "New", "Ġ"]
    alphabet = [c for c in sorted(pre_tokenizers.ByteLevel.alphabet()) if c not in pieces]
    tok = Tokenizer(models.Unigram([(p, -1.0) for p in pieces] + [(c, -10.0) for c in alphabet], unk_id=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


SP_PIECES = ["<unk>", "<pad>", "<s>", "</s>", "▁the", "▁E", "iff", "el", "▁tower", "▁is", "▁loc", "ated", "▁in",
             "▁Par", "is", ",", "▁caf", "▁", "New", "▁cat", "▁of", "▁city", "▁a", "re"]


def sentencepiece_tokenizer(llama: bool = True, byte_fallback: bool = True, bos: bool = False):
    """SentencePiece-style pieces (``▁`` = space): Llama's layout (normaliser, byte fallback, no pre-tokenizer)
    or T5's (Metaspace pre-tokenizer). Without byte fallback the vocabulary fits the tiny models (66 ids)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    letters = sorted(set("abcdefghijklmnopqrstuvwxyzé.!?"))
    vocab = [(p, -1.0) for p in SP_PIECES] + [(c, -10.0) for c in letters if c not in SP_PIECES]
    if byte_fallback:
        vocab += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=byte_fallback))
    if llama:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def words_of(tokens, spans):
    return ["".join(tokens[a:b]) for a, b in spans]


# --- hand-built results ---------------------------------------------------------------------------------------


def make_seq(source_tokens, target_tokens, attr_pos_start, *, decoder_only, dims=None, seed=0,
             step_scores=("probability", "entropy")) -> SequenceAttribution:
    """Random scores with Inseq's layout: target token ``attr_pos_start + c`` and later are NaN in column ``c``."""
    rng = np.random.default_rng(seed)
    dims = dims or {}
    n_steps = len(target_tokens) - attr_pos_start
    shape = tuple(dims.values())
    tgt = rng.normal(size=(len(target_tokens), n_steps, *shape)).astype(np.float32)
    for c in range(n_steps):
        tgt[attr_pos_start + c:, c] = np.nan
    src = None if decoder_only else rng.normal(size=(len(source_tokens), n_steps, *shape)).astype(np.float32)
    target_ids = tuple(range(100, 100 + len(target_tokens)))
    source_ids = target_ids[: len(source_tokens)] if decoder_only else tuple(range(len(source_tokens)))
    return SequenceAttribution(
        source_tokens=tuple(source_tokens), target_tokens=tuple(target_tokens), source_ids=tuple(source_ids),
        target_ids=tuple(target_ids), source_attributions=src, target_attributions=tgt,
        step_scores={
            name: rng.uniform(0.05, 1.0, n_steps).astype(np.float32) for name in step_scores
        },
        attr_pos_start=attr_pos_start, attr_pos_end=len(target_tokens),
        deltas=rng.normal(size=n_steps).astype(np.float32), dims=tuple(dims),
        dim_labels=tuple(tuple(f"{d}{i}" for i in range(n)) for d, n in dims.items()),
    )


GPT2_TARGET = ["The", "ĠE", "iff", "el", "ĠTower", "Ġis", "Ġin", "ĠPar", "is", ",", "ĠFr", "ance", "<|endoftext|>"]
SP_SOURCE = ["▁The", "▁E", "iff", "el", "▁Tower", "▁is", "▁in", "▁Par", "is", "▁.", "</s>"]
SP_TARGET = ["<pad>", "▁La", "▁Tor", "re", "▁E", "iff", "el", "▁è", "▁a", "▁Pa", "ri", "gi", "▁.", "</s>"]


def gpt2_seq(**kwargs):
    """Decoder-only: the prompt is "The E", generation starts inside the word "Eiffel"."""
    return make_seq(GPT2_TARGET[:2], GPT2_TARGET, 2, decoder_only=True, **kwargs)


def sp_seq(**kwargs):
    return make_seq(SP_SOURCE, SP_TARGET, 1, decoder_only=False, **kwargs)


def same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and np.allclose(a, b, equal_nan=True, rtol=1e-6, atol=1e-7)


def block(x, rows, cols, fn="absmax"):
    """``fn`` over the rows ``rows`` and columns ``cols`` of ``x`` (reference for merged cells)."""
    piece = x[rows][:, cols].reshape(-1, *x.shape[2:])
    return AGGREGATION_FUNCTIONS[fn](piece, 0)


# --- word boundaries ------------------------------------------------------------------------------------------


def test_byte_level_bpe_words_from_tokenizer_and_from_markers_agree():
    tok = byte_level_tokenizer()
    ids = tok(TEXT)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert "Ã" in "".join(tokens) and "Ċ" in "".join(tokens)  # a two-byte character and newlines
    by_tokenizer = word_spans(tokens, ids, tok)
    assert [tok.decode(ids[a:b]) for a, b in by_tokenizer] == WORDS
    assert word_spans(tokens) == by_tokenizer
    assert words_of(tokens, by_tokenizer)[1] == "ĠEiffel"


@pytest.mark.parametrize("llama", [True, False], ids=["llama-layout", "t5-layout"])
def test_sentencepiece_words_from_tokenizer_and_from_markers_agree(llama):
    tok = sentencepiece_tokenizer(llama=llama, byte_fallback=llama)
    text = TEXT if llama else TEXT.replace("\n\n", " ")  # newlines are byte tokens <0x0A> with byte fallback
    ids = tok(text)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    spans = word_spans(tokens, ids, tok)
    assert word_spans(tokens) == spans
    expected = ["▁the", "▁Eiffel", "▁tower", "▁is", "▁located", "▁in", "▁Paris,", "▁café"]
    assert words_of(tokens, spans)[:8] == expected
    assert words_of(tokens, spans)[8:] == (["<0x0A><0x0A>New"] if llama else ["▁New"])


def test_wordpiece_suffixes_join_their_word_with_a_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[UNK]", "[CLS]", "the", "e", "##iff", "##el", "tower", ",", "paris"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]")
    ids = [1, *tok("the eiffel tower, paris", add_special_tokens=False)["input_ids"]]
    tokens = tok.convert_ids_to_tokens(ids)
    assert words_of(tokens, word_spans(tokens, ids, tok)) == ["[CLS]", "the", "e##iff##el", "tower,", "paris"]


def test_special_tokens_are_words_of_their_own():
    tok = sentencepiece_tokenizer(bos=True)
    ids = tok("the Eiffel tower")["input_ids"] + [tok.eos_token_id]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "<s>" and tokens[-1] == "</s>"
    assert words_of(tokens, word_spans(tokens, ids, tok)) == ["<s>", "▁the", "▁Eiffel", "▁tower", "</s>"]
    assert words_of(GPT2_TARGET, word_spans(GPT2_TARGET)) == [
        "The", "ĠEiffel", "ĠTower", "Ġis", "Ġin", "ĠParis,", "ĠFrance", "<|endoftext|>"]
    # a special token followed by a token without a marker (GPT-2's first word) still starts a word
    assert words_of(["<|endoftext|>", "The", "Ġcat"], word_spans(["<|endoftext|>", "The", "Ġcat"])) == [
        "<|endoftext|>", "The", "Ġcat"]


def test_whitespace_only_tokens_join_the_next_word():
    assert words_of(["▁in", "▁", "1", "9", "▁."], word_spans(["▁in", "▁", "1", "9", "▁."])) == ["▁in", "▁19", "▁."]
    assert words_of(["a", "Ġ", "ĠĠ", "b"], word_spans(["a", "Ġ", "ĠĠ", "b"])) == ["a", "ĠĠĠb"]
    assert words_of(["a", "Ċ"], word_spans(["a", "Ċ"])) == ["a", "Ċ"]


def test_a_tokenizer_that_does_not_match_the_result_is_refused():
    tok = byte_level_tokenizer()
    ids = tok("the tower")["input_ids"]
    with pytest.raises(ValueError, match="tokenizer does not match the result: token 1"):
        word_spans(["the", "Ġcastle"], ids, tok)


def test_token_strings_without_markers_need_a_tokenizer(tiny):
    out = tiny("gpt2").attribute("the cat is located in", generation_args={"max_new_tokens": 2},
                                 show_progress=False)
    with pytest.raises(ValueError, match="no word-start markers .* pass the tokenizer"):
        Words()(out[0])
    # the tiny word-level tokenizer: every token is a word, so nothing merges
    tok = tiny("gpt2").tokenizer
    words = out.apply(Words(tok))
    assert words[0].target_tokens == out[0].target_tokens
    assert same(words[0].target_attributions, out[0].target_attributions)


# --- merging both axes ----------------------------------------------------------------------------------------


def test_words_merge_rows_and_columns_of_a_decoder_only_result():
    seq = gpt2_seq()
    out = Words()(seq)
    assert out.target_tokens == ("The", "ĠEiffel", "ĠTower", "Ġis", "Ġin", "ĠParis,", "ĠFrance", "<|endoftext|>")
    assert out.target_ids == (100, -1, 104, 105, 106, -1, -1, 112)
    # generation started inside "Eiffel": the merged word is the first explained one, from its explained pieces
    assert (out.attr_pos_start, out.attr_pos_end) == (1, 8)
    assert out.generated_tokens == out.target_tokens[1:]
    assert out.source_tokens == ("The", "ĠE") and out.source_ids == (100, 101)  # the prompt, regrouped alike
    t = seq.target_attributions  # [13, 11]: columns explain target tokens 2..12
    eiffel, paris = [1, 2, 3], [7, 8, 9]
    cols = {"ĠEiffel": [0, 1], "ĠParis,": [5, 6, 7]}
    assert out.target_attributions.shape == (8, 7)
    np.testing.assert_allclose(out.target_attributions[0, 0], block(t, [0], cols["ĠEiffel"]))
    np.testing.assert_allclose(out.target_attributions[1, 4], block(t, eiffel, cols["ĠParis,"]))
    np.testing.assert_allclose(out.target_attributions[5, 5], block(t, paris, [8, 9]))  # Paris, -> France
    # a word's row in its own column: what its earlier pieces gave its later ones (NaN ignored, as Inseq)
    np.testing.assert_allclose(out.target_attributions[5, 4], block(t, paris, cols["ĠParis,"]))
    assert np.isnan(out.target_attributions[6, 4]) and np.isnan(out.target_attributions[7, 6])
    # step scores: probability multiplies, entropy adds (registry rules); deltas keep the largest |delta|
    p, h = seq.step_scores["probability"], seq.step_scores["entropy"]
    np.testing.assert_allclose(out.step_scores["probability"][[0, 4, 5]], [p[0:2].prod(), p[5:8].prod(),
                                                                           p[8:10].prod()], rtol=1e-6)
    np.testing.assert_allclose(out.step_scores["entropy"][4], h[5:8].sum(), rtol=1e-6)
    np.testing.assert_allclose(out.step_scores["probability"][[1, 2, 3, 6]], p[[2, 3, 4, 10]])
    d = seq.deltas[5:8]
    assert out.deltas[4] == d[np.abs(d).argmax()]
    assert out.target_attributions.dtype == np.float32 and out.step_scores["probability"].dtype == np.float32


def test_words_merge_source_rows_and_target_columns_of_an_encoder_decoder_result():
    seq = sp_seq()
    out = Words(fn="sum")(seq)
    assert out.source_tokens == ("▁The", "▁Eiffel", "▁Tower", "▁is", "▁in", "▁Paris", "▁.", "</s>")
    assert out.target_tokens == ("<pad>", "▁La", "▁Torre", "▁Eiffel", "▁è", "▁a", "▁Parigi", "▁.", "</s>")
    assert (out.attr_pos_start, out.attr_pos_end) == (1, 9)
    assert out.source_attributions.shape == (8, 8) and out.target_attributions.shape == (9, 8)
    s = seq.source_attributions
    np.testing.assert_allclose(out.source_attributions[1, 5], s[1:4, 8:11].sum(), rtol=1e-5)  # Eiffel -> Parigi
    np.testing.assert_allclose(out.source_attributions[5, 0], s[7:9, 0].sum(), rtol=1e-5)  # Paris -> La
    np.testing.assert_allclose(out.source_attributions[0, 1], s[0, 1:3].sum(), rtol=1e-5)  # The -> Torre


def test_column_fn_combines_the_columns_of_a_word_differently():
    seq = sp_seq()
    out = Words(fn="sum", column_fn="mean")(seq)
    s = seq.source_attributions
    np.testing.assert_allclose(out.source_attributions[1, 5], s[1:4, 8:11].mean(axis=1).sum(), rtol=1e-5)


def test_words_keep_extra_dims_and_merge_elementwise():
    seq = sp_seq(dims={"layer": 2, "head": 3})
    out = Words(fn="max")(seq)
    assert out.source_attributions.shape == (8, 8, 2, 3) and out.dims == ("layer", "head")
    np.testing.assert_allclose(out.source_attributions[1, 5],
                               seq.source_attributions[1:4, 8:11].max(axis=(0, 1)))


def test_spans_merge_explicit_ranges_and_a_single_span_may_be_given_bare():
    seq = sp_seq()
    out = Spans(source=[(0, 2), (7, 10)], target=(2, 7), fn="mean")(seq)
    assert out.source_tokens[:2] == ("▁The▁E", "iff") and out.source_tokens[6] == "▁Paris▁."
    assert out.target_tokens == ("<pad>", "▁La", "▁Torre▁Eiffel", "▁è", "▁a", "▁Pa", "ri", "gi", "▁.", "</s>")
    np.testing.assert_allclose(out.source_attributions[0, 1], seq.source_attributions[0:2, 1:6].mean(), rtol=1e-5)
    assert same(Spans()(seq).source_attributions, seq.source_attributions)


# --- slices ---------------------------------------------------------------------------------------------------


def test_slice_keeps_the_source_span_of_interest():
    seq = sp_seq()
    out = Slice(source=slice(1, 4))(seq)
    assert out.source_tokens == ("▁E", "iff", "el") and out.source_ids == (1, 2, 3)
    assert same(out.source_attributions, seq.source_attributions[1:4])
    assert same(out.target_attributions, seq.target_attributions)
    assert same(Slice(source=(-3, -1))(seq).source_attributions, seq.source_attributions[-3:-1])


def test_slice_of_a_decoder_only_target_keeps_the_explained_tokens():
    seq = gpt2_seq()
    out = Slice(target=(0, 1))(seq)  # keep "The" as the only context, plus everything explained
    assert out.target_tokens == ("The", *GPT2_TARGET[2:])
    assert out.source_tokens == ("The",)
    assert (out.attr_pos_start, out.attr_pos_end) == (1, 12)
    assert same(out.target_attributions, seq.target_attributions[[0, *range(2, 13)]])
    assert out.generated_tokens == seq.generated_tokens


def test_slice_steps_and_dims():
    seq = sp_seq(dims={"layer": 3, "head": 2})
    out = Slice(steps=(2, 5), dims={"layer": -1, "head": [1]})(seq)
    assert (out.attr_pos_start, out.attr_pos_end) == (3, 6)
    assert out.generated_tokens == tuple(SP_TARGET[3:6])
    assert out.dims == ("head",) and out.dim_labels == (("head1",),)
    assert same(out.source_attributions, seq.source_attributions[:, 2:5, -1][..., [1]])
    assert same(out.step_scores["probability"], seq.step_scores["probability"][2:5])
    assert same(out.deltas, seq.deltas[2:5])


# --- aggregation functions and reductions over dims -----------------------------------------------------------


def test_every_aggregation_function_ignores_nan_and_keeps_all_nan_groups():
    x = np.array([[0.3, np.nan, np.nan], [-0.7, 2.0, np.nan], [0.1, -3.0, np.nan]], dtype=np.float32)
    expected = {
        "sum": [-0.3, -1.0, np.nan], "mean": [-0.1, -0.5, np.nan], "max": [0.3, 2.0, np.nan],
        "min": [-0.7, -3.0, np.nan], "prod": [-0.021, -6.0, np.nan], "absmax": [-0.7, -3.0, np.nan],
        "vnorm": [np.sqrt(0.59), np.sqrt(13.0), np.nan],
    }
    assert sorted(expected) == sorted(AGGREGATION_FUNCTIONS)
    for name, values in expected.items():
        got = AGGREGATION_FUNCTIONS[name](x, 0)
        np.testing.assert_allclose(got, values, rtol=1e-5, err_msg=name)
        assert got.dtype == np.float32, name


@pytest.mark.slow
def test_aggregation_functions_equal_inseqs_without_nan():
    import torch
    from inseq.data.aggregation_functions import AggregationFunction

    x = np.random.default_rng(3).normal(size=(4, 5, 6)).astype(np.float32)
    for name, fn in AGGREGATION_FUNCTIONS.items():
        theirs = AggregationFunction.available_classes()[name]()
        for axis in range(3):
            np.testing.assert_allclose(fn(x, axis), theirs(torch.tensor(x), dim=axis).numpy(), rtol=1e-5,
                                       err_msg=f"{name} axis {axis}")


@pytest.mark.parametrize("fn", sorted(AGGREGATION_FUNCTIONS))
def test_reduce_any_dim_with_any_function(fn):
    seq = sp_seq(dims={"layer": 2, "head": 3})
    out = Reduce(fn, dim="layer")(seq)
    assert out.dims == ("head",) and out.dim_labels == (("head0", "head1", "head2"),)
    assert same(out.source_attributions, AGGREGATION_FUNCTIONS[fn](seq.source_attributions, 2))
    assert same(out.target_attributions, AGGREGATION_FUNCTIONS[fn](seq.target_attributions, 2))
    out = Reduce(fn, dim="head")(out)
    assert out.dims == () and out.source_attributions.shape == seq.source_attributions.shape[:2]


def test_inseq_display_default_is_a_pipeline(tiny):
    out = tiny("llama", "attention").attribute("the cat is located in", generation_args={"max_new_tokens": 3},
                                               show_progress=False)
    seq = out[0]
    assert seq.dims == ("layer", "head")
    piped = seq.apply(Reduce("mean", "head"), Normalize(), Reduce("mean", "layer"), Normalize())
    assert same(piped.target_attributions, seq.aggregate().target_attributions)
    rescaled = seq.apply(Reduce("mean", "head"), Reduce("mean", "layer"), Rescale())
    assert same(rescaled.target_attributions, seq.aggregate(normalize=False, rescale=True).target_attributions)


def test_pipeline_order_matters_and_is_the_order_given():
    seq = sp_seq(dims={"layer": 2, "head": 3})
    words_then_norm = apply(seq, Words(fn="sum"), Reduce("mean", "layer"), Reduce("mean", "head"), Normalize())
    norm_then_words = apply(seq, Reduce("mean", "layer"), Reduce("mean", "head"), Normalize(), Words(fn="sum"))
    assert words_then_norm.source_tokens == norm_then_words.source_tokens
    both = np.concatenate([words_then_norm.source_attributions, words_then_norm.target_attributions])
    np.testing.assert_allclose(np.nansum(np.abs(both), axis=0), 1.0, rtol=1e-5)  # normalised last: columns sum to 1
    assert not same(words_then_norm.source_attributions, norm_then_words.source_attributions)
    vnorm_layers_first = apply(seq, Reduce("vnorm", "layer"), Reduce("mean", "head"))
    mean_heads_first = apply(seq, Reduce("mean", "head"), Reduce("vnorm", "layer"))
    assert not same(vnorm_layers_first.source_attributions, mean_heads_first.source_attributions)


def test_stages_return_new_results_and_never_mutate():
    seq = sp_seq()
    before = {k: v.copy() for k, v in seq.step_scores.items()}
    src = seq.source_attributions.copy()
    apply(seq, Words(), Slice(source=(0, 3)), Normalize())
    assert same(seq.source_attributions, src) and seq.source_tokens == tuple(SP_SOURCE)
    assert all(same(seq.step_scores[k], before[k]) for k in before)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Words().fn = "sum"


# --- step score merge rules -----------------------------------------------------------------------------------


def test_step_score_merge_rules_come_from_the_step_registry():
    rules = {name: step.merge for name, step in STEP_FUNCTIONS.items()}
    for name in ("probability", "perplexity", "contrast_prob", "mc_dropout_prob_avg"):
        assert rules[name] == "prod", name
    for name in ("entropy", "crossentropy", "pcxmi", "kl_divergence", "in_context_pvi", "contrast_prob_diff"):
        assert rules[name] == "sum", name
    x = np.array([0.5, 0.4], dtype=np.float32)
    assert step_merge_rule("probability")(x, 0) == pytest.approx(0.2)
    assert step_merge_rule("probability", {"probability": "sum"})(x, 0) == pytest.approx(0.9)  # logprob=True


def test_exact_merges_crossentropy_and_perplexity_agree_with_probability():
    p = np.array([0.5, 0.2, 0.9, 0.3], dtype=np.float32)
    seq = dataclasses.replace(gpt2_seq(step_scores=()), step_scores={
        "probability": np.concatenate([[0.7], p, np.full(6, 0.8)]).astype(np.float32)})
    seq = dataclasses.replace(seq, step_scores={
        **seq.step_scores, "crossentropy": -np.log(seq.step_scores["probability"]),
        "perplexity": 1 / seq.step_scores["probability"]})
    out = Words()(seq)
    prob = out.step_scores["probability"]
    np.testing.assert_allclose(out.step_scores["crossentropy"], -np.log(prob), rtol=1e-5)
    np.testing.assert_allclose(out.step_scores["perplexity"], 1 / prob, rtol=1e-5)


def test_contrast_prob_diff_adds_where_inseqs_product_flips_the_sign():
    seq = dataclasses.replace(gpt2_seq(step_scores=()), step_scores={
        "contrast_prob_diff": np.full(11, -0.5, dtype=np.float32)})
    merged = Words()(seq).step_scores["contrast_prob_diff"]
    assert merged[0] == -1.0  # "Eiffel": two steps, each less likely than the contrast
    # Inseq's rule (prod) would give +0.25: the contrast word more likely reads as less likely
    assert Words(step_merge={"contrast_prob_diff": "prod"})(seq).step_scores["contrast_prob_diff"][0] == 0.25


def test_unknown_step_scores_need_a_rule_only_when_steps_merge():
    seq = dataclasses.replace(gpt2_seq(step_scores=()), step_scores={"my_score": np.ones(11, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"No merge rule for step score 'my_score': pass step_merge=\{'my_score'"):
        Words()(seq)
    assert Words(step_merge={"my_score": "mean"})(seq).step_scores["my_score"].shape == (7,)
    assert Spans(target=(0, 2))(seq).step_scores["my_score"].shape == (11,)  # prompt only: no step merges


def test_a_registered_step_function_brings_its_merge_rule(monkeypatch):
    from distattr import steps

    monkeypatch.setattr(steps, "STEP_FUNCTIONS", dict(steps.STEP_FUNCTIONS))  # keep the registry clean for others
    distattr.register_step_function(lambda ctx: ctx.logits.max(-1).values, "test_agg_max_logit", merge="max",
                                    overwrite=True)
    seq = dataclasses.replace(gpt2_seq(step_scores=()), step_scores={
        "test_agg_max_logit": np.arange(11, dtype=np.float32)})
    assert Words()(seq).step_scores["test_agg_max_logit"][0] == 1.0


# --- pairs ----------------------------------------------------------------------------------------------------


def test_pair_difference_is_a_minus_b():
    a, b = sp_seq(seed=1), sp_seq(seed=2)
    d = pair_difference(a, b)
    assert same(d.source_attributions, a.source_attributions - b.source_attributions)
    assert same(d.target_attributions, a.target_attributions - b.target_attributions)
    assert same(d.step_scores["probability"], a.step_scores["probability"] - b.step_scores["probability"])
    assert d.deltas is None and d.source_tokens == a.source_tokens
    out = pair_difference(AttributionOutput((a,), {}), AttributionOutput((b,), {}))
    assert same(out[0].source_attributions, d.source_attributions)
    assert out.info["aggregation"] == ["pair_difference(a, b) = a - b"]


def test_pair_difference_needs_the_same_tokens_or_an_explicit_minimal_pair():
    a = sp_seq()
    b = dataclasses.replace(a, source_tokens=("▁A", *SP_SOURCE[1:]))
    with pytest.raises(ValueError, match="different source tokens .*first difference at 0.*same_tokens=False"):
        pair_difference(a, b)
    d = pair_difference(a, b, same_tokens=False)
    assert d.source_tokens[0] == "▁The → ▁A" and d.source_ids[0] == -1 and d.source_ids[1] == a.source_ids[1]
    with pytest.raises(ValueError, match="different source tokens"):
        pair_difference(a, Slice(source=(0, 3))(a))
    with pytest.raises(ValueError, match="different step scores"):
        pair_difference(a, dataclasses.replace(a, step_scores={}))
    with pytest.raises(ValueError, match="different dims"):
        pair_difference(a, dataclasses.replace(a, dims=("layer",)))


# --- results read back from disk ------------------------------------------------------------------------------


def test_words_from_stored_ids_after_a_round_trip(tmp_path):
    """A real attribution on a tiny Llama with a SentencePiece-style tokenizer, saved and loaded back."""
    from tiny import tiny_model

    model, _ = tiny_model("llama")
    tok = sentencepiece_tokenizer(byte_fallback=False, bos=True)
    assert len(tok) <= model.config.vocab_size
    m = distattr.load_model(model, "saliency", tokenizer=tok)
    out = m.attribute("the Eiffel tower is located in the city of", generation_args={"max_new_tokens": 6},
                      step_scores=["probability", "entropy"], show_progress=False)
    back = distattr.load(out.save(tmp_path / "raw.json"))
    pipeline = (Words(tok), Normalize())
    mem, disk = out.apply(*pipeline), back.apply(*pipeline)
    marker = back.apply(Words(), Normalize())  # no tokenizer: the '▁' markers of the stored strings
    for x, y, z in zip(mem, disk, marker, strict=True):
        assert x.target_tokens == y.target_tokens == z.target_tokens
        assert "▁Eiffel" in x.target_tokens and "▁located" in x.target_tokens
        assert same(x.target_attributions, y.target_attributions)
        assert same(x.target_attributions, z.target_attributions)
        assert same(x.step_scores["probability"], y.step_scores["probability"])
    assert disk.info["aggregation"] == [repr(Words()), "Normalize()"]
    again = distattr.load(mem.save(tmp_path / "words.json"))  # merged tokens (id -1) survive the file too
    assert again[0].target_ids == mem[0].target_ids and -1 in again[0].target_ids
    assert same(again[0].target_attributions, mem[0].target_attributions)
    with pytest.raises(ValueError, match="already merged"):
        Words(tok)(again[0])
    assert Words()(again[0]).target_tokens == again[0].target_tokens  # markers: merging words again is a no-op


# --- errors ---------------------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors():
    seq, dec = sp_seq(dims={"layer": 2}), gpt2_seq()
    with pytest.raises(ValueError, match="Unknown aggregation function 'median'. Available: absmax, max"):
        Reduce("median", "layer")
    with pytest.raises(ValueError, match="Unknown aggregation function"):
        Words(fn="avg")
    with pytest.raises(ValueError, match=r"Dim 'head' is not in this result: its dims are \('layer',\)"):
        Reduce("mean", "head")(seq)
    with pytest.raises(ValueError, match="no extra dims"):
        Reduce("mean", "layer")(dec)
    with pytest.raises(ValueError, match=r"target span \(10, 20\) is out of range for 14 target tokens"):
        Spans(target=[(10, 20)])(seq)
    with pytest.raises(ValueError, match=r"source spans overlap: \(0, 3\) and \(2, 5\)"):
        Spans(source=[(2, 5), (0, 3)])(seq)
    with pytest.raises(ValueError, match=r"source span \(3, 3\) is empty"):
        Spans(source=[(3, 3)])(seq)
    with pytest.raises(ValueError, match="pairs of ints"):
        Spans(source=[(1, 2, 3)])
    with pytest.raises(ValueError, match="decoder-only result.*target_tokens"):
        Spans(source=[(0, 2)])(dec)
    with pytest.raises(ValueError, match="decoder-only result.*slice target"):
        Slice(source=(0, 1))(dec)
    with pytest.raises(ValueError, match="out of range for 11 positions"):
        Slice(source=(5, 20))(seq)
    with pytest.raises(ValueError, match="contiguous"):
        Slice(source=slice(0, 6, 2))(seq)
    with pytest.raises(ValueError, match="out of range for dim 'layer' of size 2"):
        Slice(dims={"layer": 5})(seq)
    with pytest.raises(TypeError, match="must be callable"):
        apply(seq, "subwords")
    with pytest.raises(ValueError, match="rows for 11 source tokens"):
        merge_spans(dataclasses.replace(seq, source_attributions=seq.source_attributions[:3]))


# --- parity with Inseq's aggregators --------------------------------------------------------------------------


def to_inseq(seq: SequenceAttribution):
    import torch
    from inseq.data import FeatureAttributionSequenceOutput
    from inseq.utils.typing import TokenWithId

    def tensor(x):
        return None if x is None else torch.tensor(x)

    return FeatureAttributionSequenceOutput(
        source=[TokenWithId(t, i) for t, i in zip(seq.source_tokens, seq.source_ids, strict=True)],
        target=[TokenWithId(t, i) for t, i in zip(seq.target_tokens, seq.target_ids, strict=True)],
        source_attributions=tensor(seq.source_attributions), target_attributions=tensor(seq.target_attributions),
        step_scores={k: tensor(v) for k, v in seq.step_scores.items()},
        attr_pos_start=seq.attr_pos_start, attr_pos_end=seq.attr_pos_end,
    )


def assert_same_as_inseq(ours: SequenceAttribution, theirs, step_scores=True):
    assert list(ours.source_tokens) == [t.token for t in theirs.source]
    assert list(ours.target_tokens) == [t.token for t in theirs.target]
    assert list(ours.target_ids) == [t.id for t in theirs.target]
    assert (ours.attr_pos_start, ours.attr_pos_end) == (theirs.attr_pos_start, theirs.attr_pos_end)
    for name in ("source_attributions", "target_attributions"):
        x, y = getattr(ours, name), getattr(theirs, name)
        assert same(x, None if y is None else y.numpy()), name
    if step_scores:
        for k, v in ours.step_scores.items():
            np.testing.assert_allclose(v, theirs.step_scores[k].numpy(), rtol=1e-6, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("dims", [None, {"layer": 2, "head": 3}], ids=["token-level", "layer-head"])
def test_words_equal_inseqs_subwords_aggregator(dims):
    seq = sp_seq(dims=dims)
    assert_same_as_inseq(Words()(seq), to_inseq(seq).aggregate("subwords", do_post_aggregation_checks=False))
    seq = gpt2_seq(dims=dims)  # decoder-only, generation starting inside a word
    theirs = to_inseq(seq).aggregate("subwords", special_chars=("Ġ", "Ċ"), do_post_aggregation_checks=False)
    assert_same_as_inseq(Words()(seq), theirs)


@pytest.mark.slow
@pytest.mark.parametrize("fn", ["sum", "mean", "max", "min", "prod", "vnorm", "absmax"])
def test_source_spans_equal_inseqs_spans_aggregator(fn):
    """Source rows hold no NaN, so every function is the same question as Inseq's (which does not skip NaN)."""
    seq = dataclasses.replace(sp_seq(), target_attributions=None)
    ours = Spans(source=[(1, 4), (7, 9)], fn=fn)(seq)
    theirs = to_inseq(seq).aggregate("spans", source_spans=[(1, 4), (7, 9)], aggregate_fn=fn)
    assert_same_as_inseq(ours, theirs)


@pytest.mark.slow
def test_inseq_subwords_leave_the_last_word_of_a_sequence_unmerged():
    """Inseq 0.7.1's SubwordAggregator.get_spans skips a trailing word: two pieces stay apart, three or more lose
    their last piece. distattr merges it."""
    seq = make_seq(["▁the", "▁Eif", "fel", "▁to", "wer"], ["<pad>", "▁la", "▁tor", "r", "e"], 1, decoder_only=False)
    theirs = to_inseq(seq).aggregate("subwords")
    assert [t.token for t in theirs.source] == ["▁the", "▁Eiffel", "▁to", "wer"]
    assert [t.token for t in theirs.target] == ["<pad>", "▁la", "▁torr", "e"]
    ours = Words()(seq)
    assert ours.source_tokens == ("▁the", "▁Eiffel", "▁tower")
    assert ours.target_tokens == ("<pad>", "▁la", "▁torre")


@pytest.mark.slow
def test_inseqs_pair_aggregator_returns_b_minus_a():
    a, b = sp_seq(seed=1), sp_seq(seed=2)
    theirs = to_inseq(a) - to_inseq(b)
    assert same(theirs.source_attributions.numpy(), b.source_attributions - a.source_attributions)
    ours = pair_difference(b, a)  # Inseq's a - b
    assert_same_as_inseq(ours, theirs)
    assert same(pair_difference(a, b).source_attributions, -theirs.source_attributions.numpy())
