"""Views: the rich console heatmaps and the self-contained HTML page."""

from html.parser import HTMLParser

import numpy as np
import pytest
from rich.console import Console

from distattr.results import AttributionOutput, SequenceAttribution
from distattr.viz.common import color_limit, display_tokens
from distattr.viz.console import coolwarm, show_console
from distattr.viz.html import render_html

TRICKY = ["<s>", "The", "Ġ<b>", "&amp;", '"q"', "it's", "[bold]x[/bold]", "\n", "Ġcity", "Ġof", "!"]


def decoder_only(tokens=TRICKY, n_prompt=4, seed=0, scale=1.0) -> SequenceAttribution:
    rng = np.random.default_rng(seed)
    n, n_gen = len(tokens), len(tokens) - n_prompt
    scores = (rng.random((n, n_gen)) * scale).astype(np.float32)
    for c in range(n_gen):
        scores[n_prompt + c:, c] = np.nan  # future tokens, as the engine leaves them
    steps = {"probability": rng.random(n_gen).astype(np.float32),
             "entropy": (rng.random(n_gen) * 3).astype(np.float32)}
    return SequenceAttribution(tuple(tokens[:n_prompt]), tuple(tokens), tuple(range(n_prompt)), tuple(range(n)),
                               None, scores, steps, n_prompt, n)


def encoder_decoder(seed=1) -> SequenceAttribution:
    rng = np.random.default_rng(seed)
    src, tgt = ("the", "<cat>", "</s>"), ("<pad>", "a", "b", "</s>")
    source = rng.standard_normal((3, 3)).astype(np.float32)
    target = rng.standard_normal((4, 3)).astype(np.float32)
    target[np.triu_indices(4, k=1)[0], np.clip(np.triu_indices(4, k=1)[1] - 1, 0, 2)] = np.nan
    return SequenceAttribution(src, tgt, (0, 1, 2), (0, 1, 2, 3), source, target,
                               {"probability": rng.random(3).astype(np.float32)}, 1, 4)


def record(out, width=200, **kwargs) -> str:
    console = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))  # noqa: SIM115
    show_console(out, console=console, **kwargs)
    return console.export_text()


# ---------------------------------------------------------------- console


def test_console_shows_every_token_and_step_score():
    seq = decoder_only()
    text = record(AttributionOutput((seq,)))
    for label in display_tokens(seq.target_tokens):  # as read: " <b>" and "↵", not "Ġ<b>" and "\n"
        assert label in text
    assert "Ġ" not in text
    assert "[bold]x[/bold]" in text  # shown literally, not read as rich markup
    for name in seq.step_scores:
        assert name in text
    agg = seq.aggregate()
    assert f"{agg.target_attributions[0, 0]:.2f}" in text
    assert f"{seq.step_scores['entropy'][0]:.2f}" in text
    assert text.count("Example 0 · Target") == 1


def test_console_wraps_columns_in_a_narrow_terminal():
    tokens = ["<s>", "a", "b"] + [f"w{i}" for i in range(20)]
    seq = decoder_only(tokens, n_prompt=3)
    text = record(AttributionOutput((seq,)), width=60)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 60
    n_tables = text.count("Example 0 · Target")
    assert n_tables > 1 and f"(1/{n_tables})" in text
    for name in seq.step_scores:  # step scores under every part
        assert sum(line.count(name) for line in lines) == n_tables
    for token in tokens:
        assert token in text
    wide = record(AttributionOutput((seq,)), width=400)
    assert wide.count("Example 0 · Target") == 1


def test_console_nan_cells_are_blank_and_step_scores_optional():
    seq = decoder_only(["a", "b", "c"], n_prompt=1)
    text = record(AttributionOutput((seq,)), normalize=False, step_scores=False)
    last_row = next(line for line in text.splitlines() if line.startswith("│ 2 "))
    assert not any(ch.isdigit() for ch in last_row[4:])  # row 2 ("c") explains nothing yet: all NaN
    assert "probability" not in text and "entropy" not in text
    assert "nan" not in text.lower()


def test_console_encoder_decoder_has_source_and_target_blocks():
    out = AttributionOutput((encoder_decoder(), decoder_only()))
    text = record(out)
    assert "Example 0 · Source" in text and "Example 0 · Target" in text and "Example 1 · Target" in text
    assert "Example 1 · Source" not in text
    assert text.count("probability") == 2  # once per example, under its last block
    assert "<cat>" in text


def test_show_method_uses_the_console_view():
    out = AttributionOutput((decoder_only(),))
    console = Console(width=120, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    out.show(console=console)
    assert "Example 0 · Target" in console.export_text()


def test_colour_scale_is_symmetric_like_inseq():
    a, b = decoder_only(seed=0, scale=0.5), decoder_only(seed=1, scale=2.0)
    limit = color_limit([a, b])
    assert limit == pytest.approx(float(np.nanmax(b.target_attributions)))
    assert coolwarm(limit, limit) == (180, 4, 38)  # red: positive
    assert coolwarm(-limit, limit) == (59, 76, 192)  # blue: negative
    assert coolwarm(0.0, limit) == (221, 220, 220)
    assert coolwarm(10 * limit, limit) == (180, 4, 38)  # clipped
    negative = decoder_only(scale=-1.0)
    assert color_limit([negative]) == pytest.approx(float(np.nanmax(np.abs(negative.target_attributions))))


# ---------------------------------------------------------------- HTML


class Tables(HTMLParser):
    """Collects every table as rows of cells ``(tag, attrs, text)``, plus every src/href attribute."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables, self.cell, self.refs, self.headings, self._h3 = [], None, [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.refs += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = [tag, attrs, ""]
        self._h3 = tag == "h3"

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append(tuple(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[2] += data
        if self._h3:
            self.headings.append(data)
            self._h3 = False


def parse(page: str) -> Tables:
    parser = Tables()
    parser.feed(page)
    return parser


def test_html_is_self_contained():
    page = render_html(AttributionOutput((decoder_only(), encoder_decoder())))
    assert page.startswith("<!DOCTYPE html>")
    for banned in ("http://", "https://", "<script src", "<link", "@import", "url("):
        assert banned not in page
    assert parse(page).refs == []


def test_html_cells_hold_exact_values_and_escaped_tokens():
    seqs = (decoder_only(), encoder_decoder())
    page = render_html(AttributionOutput(seqs), normalize=False)
    assert "Ġ<b>" not in page and "Ġ&lt;b&gt;" in page and "&amp;amp;" in page and "&quot;q&quot;" in page
    assert '<span class="tok"> &lt;b&gt;</span>' in page  # shown as read; the raw piece is in the title
    assert "[bold]x[/bold]" in page
    doc = parse(page)
    blocks = [(seqs[0].target_tokens, seqs[0].target_attributions, seqs[0]),
              (seqs[1].source_tokens, seqs[1].source_attributions, None),
              (seqs[1].target_tokens, seqs[1].target_attributions, seqs[1])]
    assert len(doc.tables) == len(blocks)
    assert doc.headings == ["Target", "Source", "Target"]
    for table, (rows, scores, with_steps) in zip(doc.tables, blocks, strict=True):
        header, body = table[0], table[1:]
        seq = with_steps if with_steps is not None else seqs[1]
        columns = seq.generated_tokens
        labels = display_tokens((*seq.source_tokens, *seq.target_tokens))  # one tokenizer: decided once
        shown = dict(zip((*seq.source_tokens, *seq.target_tokens), labels, strict=True))
        assert [c[2] for c in header[1:]] == [f"{seq.attr_pos_start + i}{shown[t]}" for i, t in enumerate(columns)]
        n_steps = len(with_steps.step_scores) if with_steps is not None else 0
        assert len(body) == len(rows) + n_steps
        for r, token in enumerate(rows):
            row = body[r]
            assert row[0][0] == "th" and row[0][2] == f"{r}{shown[token]}"
            cells = row[1:]
            assert len(cells) == len(columns)  # one cell per (token, generated step)
            for c, (tag, attrs, text) in enumerate(cells):
                value = scores[r, c]
                assert tag == "td"
                if np.isnan(value):
                    assert text == "" and "title" not in attrs
                else:
                    assert np.float32(attrs["title"].split("\n")[0]) == value  # exact float32
                    assert text == f"{value:.3f}".replace("-0.000", "0.000")
        for k, (name, values) in enumerate((with_steps.step_scores if with_steps is not None else {}).items()):
            row = body[len(rows) + k]
            assert row[0][2] == name
            assert [np.float32(c[1]["title"].split("\n")[0]) for c in row[1:]] == list(values)


def test_html_normalizes_by_default_and_shares_the_colour_scale():
    seqs = (decoder_only(seed=0, scale=0.5), decoder_only(seed=3, scale=2.0))
    out = AttributionOutput(seqs)
    doc = parse(render_html(out))
    agg = out.aggregate()
    first = doc.tables[0][1][1]
    assert np.float32(first[1]["title"].split("\n")[0]) == agg[0].target_attributions[0, 0]
    limit = color_limit(agg.sequences)
    peak_cell = [c for t in doc.tables for row in t[1:] for c in row
                 if c[0] == "td" and "title" in c[1] and np.float32(c[1]["title"].split("\n")[0]) == limit]
    assert peak_cell and "rgba(178,24,43,1.000)" in peak_cell[0][1]["style"]
    assert out.html() == render_html(out)


def test_html_escapes_info_texts():
    out = AttributionOutput((decoder_only(),), info={"input_texts": ["a <script>alert(1)</script> & b"],
                                                     "model_name": "m<1>", "attribution_method": "saliency"})
    page = render_html(out)
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "m&lt;1&gt;" in page
    assert page.count("<script") == 1  # the page's own inline script only


def with_layers(seed=5, n_layers=3) -> SequenceAttribution:
    """A decoder-only example with an extra ``layer`` dim, some scores negative."""
    base = decoder_only(seed=seed)
    rng = np.random.default_rng(seed)
    scores = np.repeat(base.target_attributions[..., None], n_layers, axis=-1)
    scores = scores * rng.uniform(-1.0, 2.0, size=scores.shape).astype(np.float32)
    return SequenceAttribution(base.source_tokens, base.target_tokens, base.source_ids, base.target_ids, None,
                               scores.astype(np.float32), base.step_scores, base.attr_pos_start,
                               base.attr_pos_end, dims=("layer",),
                               dim_labels=(tuple(f"L{i}" for i in range(n_layers)),))


def score_cells(page: str):
    """``(attrs, text)`` of every attribution cell with a value, table by table, row by row."""
    return [(attrs, text) for table in parse(page).tables for row in table[1:] for tag, attrs, text in row
            if tag == "td" and "data-r" in attrs]


@pytest.mark.parametrize("normalize,rescale,mode", [(True, False, "normalized"), (False, True, "rescaled"),
                                                    (False, False, "raw")])
def test_html_cells_carry_raw_and_normalized_scores_for_the_switch(normalize, rescale, mode):
    seq = with_layers()
    page = render_html(AttributionOutput((seq,)), normalize=normalize, rescale=rescale)
    assert f'data-mode="{mode}"' in page and '<button type="button" data-mode="raw"' in page
    shown = seq.aggregate(normalize=normalize, rescale=rescale).target_attributions
    raw = seq.aggregate(normalize=False).target_attributions  # extra dims averaged, not normalised
    norm = seq.aggregate().target_attributions
    cells = score_cells(page)
    finite = ~np.isnan(raw.T)  # cells are listed row by row: transpose to walk [token, step] in that order
    assert len(cells) == int(finite.sum())
    for (attrs, text), r, n, s in zip(cells, raw[~np.isnan(raw)], norm[~np.isnan(norm)], shown[~np.isnan(shown)],
                                      strict=True):
        assert np.float32(attrs["data-r"]) == r and np.float32(attrs["data-n"]) == n
        lines = attrs["title"].split("\n")
        assert np.float32(lines[0]) == s and text == f"{s:.3f}".replace("-0.000", "0.000")
        assert (np.float32(lines[2].removeprefix("raw ")) == r) if mode != "raw" else len(lines) == 2
    for name in ("normalized", "rescaled", "raw"):  # colour limit of every display, for the switch
        assert f"data-limit-{name}=" in page
    peak = float(np.nanmax(np.abs(raw)))
    assert f'data-peak="{str(np.float32(peak))}"' in page


def test_html_fragment_for_notebooks_is_scoped():
    out = AttributionOutput((decoder_only(), encoder_decoder()))
    fragment = out._repr_html_()
    assert fragment.startswith('<div class="distattr"') and fragment.rstrip().endswith("</div>")
    for banned in ("<html", "<body", "<!DOCTYPE", "<h1", "http"):
        assert banned not in fragment
    css = fragment[fragment.index("<style>") + 7:fragment.index("</style>")]
    selectors = [rule.split("{")[0].strip() for rule in css.split("}") if "{" in rule]
    assert selectors and all(part.strip().startswith(".distattr") for sel in selectors for part in sel.split(","))
    assert fragment in render_html(out).replace("<h1>distattr attributions</h1>\n", "")  # + heading, document
    assert out[1]._repr_html_().count("<table") == 2  # one example: source and target


def test_html_long_generations_use_compact_tables():
    tokens = ["<s>", "a"] + [f"w{i}" for i in range(60)]
    long_page = render_html(AttributionOutput((decoder_only(tokens, n_prompt=2),)))
    assert '<table class="heatmap compact">' in long_page and 'class="numbers"' in long_page
    short_page = render_html(AttributionOutput((decoder_only(),)))
    assert "heatmap compact" not in short_page and 'class="numbers"' not in short_page
    for page in (long_page, short_page):
        assert "http" not in page and parse(page).refs == []


def test_console_caption_gives_the_colour_scale():
    out = AttributionOutput((decoder_only(), encoder_decoder()))
    limit = color_limit(out.aggregate().sequences)
    text = " ".join(record(out, width=200).split())
    assert f"colours {-limit:.3g} … {limit:.3g}" in text
    assert text.count("colours") == 3  # under each block's last table
