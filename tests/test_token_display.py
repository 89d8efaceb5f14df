"""Tokens as people read them in the views: byte-level BPE and SentencePiece pieces from real (offline, trained
here) tokenizers shown as text, line breaks and tabs as markers, the raw piece kept on hover and in the results."""

from html import escape

import numpy as np
import pytest
from rich.console import Console
from test_views import parse

from distattr.results import AttributionOutput, SequenceAttribution
from distattr.viz.common import BYTE_OF_CHAR, display_token, display_tokens, guess_byte_level
from distattr.viz.html import render_html

CORPUS = ["the cat is in paris", "a café in rome costs 5€ 😀", "the dog said that\n\tit was there",
          "naïve façade déjà vu", "the tower is big and red", "tokyo 日本"] * 20
TEXT = "the café costs 5€ 😀\n\tit is there"


def byte_level_tokenizer(vocab_size: int = 400):
    """A GPT-2 style byte-level BPE tokenizer (``tokenizers``' ByteLevel pre-tokenizer and decoder), trained here on
    :data:`CORPUS`; ``vocab_size=256 + 2`` has no merges: every byte is a piece of its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>")


def sentencepiece_tokenizer(byte_fallback: bool = False):
    """A SentencePiece-style tokenizer as ``transformers`` builds T5's and Llama 2's: ``▁`` marks word starts
    (Metaspace). ``byte_fallback`` (Llama 2): a character-level BPE whose unknown characters become ``<0xNN>``
    pieces; otherwise (T5) a Unigram model trained here on :data:`CORPUS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if byte_fallback:
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
        for ch in "▁abcdefghijklmnopqrstuvwxyz":
            vocab[ch] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    else:
        tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    if not byte_fallback:
        tok.train_from_iterator(CORPUS + ["mě je čas wyłącznie"], trainers.UnigramTrainer(
            vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def pieces(tokenizer, text: str) -> list[str]:
    """The raw pieces of ``text``, as the engine stores them (``convert_ids_to_tokens``)."""
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def as_read(text: str) -> str:
    return text.replace("\n", "↵").replace("\t", "⇥")


def joined(labels: list[str]) -> str:
    """The labels of a sequence joined into its text (a piece made only of spaces is shown as ``␣``)."""
    return "".join(label.replace("␣", " ") for label in labels)


def example(tokens, n_prompt: int = 2) -> SequenceAttribution:
    n = len(tokens)
    scores = np.random.default_rng(0).random((n, n - n_prompt)).astype(np.float32)
    return SequenceAttribution(tuple(tokens[:n_prompt]), tuple(tokens), tuple(range(n_prompt)), tuple(range(n)),
                               None, scores, {}, n_prompt, n)


# ---------------------------------------------------------------- byte-level BPE


def test_byte_table_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert {char: byte for byte, char in bytes_to_unicode().items()} == BYTE_OF_CHAR


def test_byte_level_pieces_read_as_the_text():
    tokens = pieces(byte_level_tokenizer(), TEXT)
    assert any(t.startswith("Ġ") for t in tokens) and "Ċ" in "".join(tokens)  # raw byte-level pieces
    assert guess_byte_level(tokens) is True
    labels = display_tokens(tokens)
    assert joined(labels) == as_read(TEXT)  # spaces, é, €, the emoji; a line break and a tab as markers
    assert not any(ch in "".join(labels) for ch in "ĠĊĉ")


@pytest.mark.parametrize("char", ["é", "€", "😀", "日本"])
def test_multibyte_characters_round_trip_through_the_byte_decoding(char):
    tokenizer = byte_level_tokenizer()
    tokens = pieces(tokenizer, f"a {char}")
    assert char not in "".join(tokens)  # stored as byte-level characters ("Ã©", "âĤ¬", ...)
    assert joined(display_tokens(tokens)) == f"a {char}"
    whole = "Ġ" + "".join(next(k for k, v in BYTE_OF_CHAR.items() if v == b) for b in char.encode())
    assert display_token(whole) == f" {char}"  # one piece holding the whole character reads alone too


def test_a_partial_byte_sequence_shows_its_bytes():
    tokens = pieces(byte_level_tokenizer(vocab_size=258), "a 5€")  # no merges: one piece per byte
    assert tokens == ["a", "Ġ", "5", "â", "Ĥ", "¬"]
    assert display_tokens(tokens) == ["a", "␣", "5", "<0xE2>", "<0x82>", "<0xAC>"]
    assert display_token("âĤ") == "<0xE2><0x82>"  # part of "€", alone: a clear byte split
    assert display_token("âĤ", byte_level=True) == "<0xE2><0x82>"


def test_markers_for_spaces_line_breaks_and_tabs():
    assert [display_token(t) for t in ("Ġthe", "Ċ", "ĊĊ", "ĉ", "Ġ", "ĠĠĠ", "\n", "\r\n", "\x01")] == [
        " the", "↵", "↵↵", "⇥", "␣", "␣␣␣", "↵", "␍↵", "<0x01>"]
    assert [display_token(t) for t in ("", "<|endoftext|>", "<s>", "the")] == ["''", "<|endoftext|>", "<s>", "the"]


# ---------------------------------------------------------------- SentencePiece


def test_sentencepiece_word_starts_read_as_spaces():
    tokens = pieces(sentencepiece_tokenizer(), "the cat is in paris")
    assert tokens[0].startswith("▁") and guess_byte_level(tokens) is False
    assert joined(display_tokens(tokens)) == " the cat is in paris"


def test_sentencepiece_letters_are_never_read_as_bytes():
    tokens = pieces(sentencepiece_tokenizer(), "mě je čas wyłącznie")
    assert any(ch in "".join(tokens) for ch in "čěł")  # Latin Extended-A: byte-level characters for control bytes
    assert joined(display_tokens(tokens)) == " mě je čas wyłącznie"


def test_sentencepiece_byte_fallback_pieces():
    tokens = pieces(sentencepiece_tokenizer(byte_fallback=True), "ab\ncd é")
    assert "<0x0A>" in tokens and "<0xC3>" in tokens  # Llama 2 style: unknown characters as bytes
    assert joined(display_tokens(tokens)) == " ab↵cd <0xC3><0xA9>"


# ---------------------------------------------------------------- views


def test_html_shows_tokens_as_read_and_the_raw_piece_on_hover():
    tokens = ["<|endoftext|>", *pieces(byte_level_tokenizer(), 'the "café" <b>costs\n5€')]
    page = render_html(AttributionOutput((example(tokens),)), normalize=False)
    table = parse(page).tables[0]
    labels = display_tokens(tokens)
    for position, ((tag, attrs, text), raw, label) in enumerate(zip(table[0][1:], tokens[2:], labels[2:],
                                                                    strict=True), start=2):  # the columns
        assert tag == "th" and attrs["title"] == f"{position} {raw}"  # the raw piece on hover
        assert text == f"{position}{label}"  # the token as read
    for row, raw, label in zip(table[1:], tokens, labels, strict=True):
        assert row[0][1]["title"].split(" ", 1)[1] == raw and row[0][2].endswith(label)
    for raw in tokens:
        if any(ch in raw for ch in '<>&"'):
            assert f' {escape(raw)}"' in page  # escaped in the attribute (the parser read it back whole)
    assert "Ġ" not in "".join(text for row in table for _, _, text in row)
    cells = [c for row in table[1:] for c in row if c[0] == "td" and "title" in c[1]]
    assert cells and cells[0][1]["title"].split("\n")[1] == f"{labels[0]} → {labels[2]}"  # hover readout as read


def test_console_shows_tokens_as_read():
    tokens = ["<|endoftext|>", *pieces(byte_level_tokenizer(), "the café costs\n5€ 😀")]
    console = Console(width=240, record=True, color_system=None, file=open("/dev/null", "w"))  # noqa: SIM115
    AttributionOutput((example(tokens),)).show(console=console)
    text = console.export_text()
    for label in display_tokens(tokens):
        assert label.strip() in text
    assert not any(ch in text for ch in "ĠĊ") and "↵" in text and "😀" in text


def test_plot_labels_tokens_as_read():
    pytest.importorskip("matplotlib")
    from distattr.viz.plot import plot_figure

    tokens = ["<|endoftext|>", *pieces(byte_level_tokenizer(), "the café\ncosts")]
    fig = plot_figure(example(tokens))
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == display_tokens(tokens)


def test_results_keep_the_raw_pieces(tmp_path):
    """Display only: a real attribution with a byte-level tokenizer stores its pieces as the tokenizer gives them."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import distattr

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                       pad_token_id=tokenizer.pad_token_id)).eval()
    m = distattr.load_model(model, "saliency", tokenizer=tokenizer)
    out = m.attribute("the café", "the café costs 5€", show_progress=False)
    seq = out[0]
    assert "Ġcaf" in "".join(seq.target_tokens) and "€" not in "".join(seq.target_tokens)
    assert "€" in out.html() and "Ġcost" in out.html()  # shown as read, raw on hover
    out.save(tmp_path / "out.json")
    assert distattr.load(tmp_path / "out.json")[0].target_tokens == seq.target_tokens
