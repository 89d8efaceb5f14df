"""The HTML view in a real headless browser: Debian's ``chromium`` (``.ci/install --dev`` installs it).

Chromium's own ``--dump-dom`` (the DOM after the inline script ran) and ``--screenshot`` flags cover rendering;
when the ``playwright`` package is importable it also drives the same chromium to click the display switch
and hover cells. No test downloads a browser; without chromium these tests are skipped.
"""

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_views import decoder_only, encoder_decoder, parse, with_layers

from distattr.results import AttributionOutput
from distattr.viz.common import display_tokens
from distattr.viz.html import render_fragment, render_html

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium is not installed (bash .ci/install --dev installs Debian's chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT = 180


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url], capture_output=True,
                          text=True, timeout=TIMEOUT, check=True)


def dump_dom(tmp_path: Path, page: Path, fragment: str = "") -> str:
    return chromium(tmp_path, page.as_uri() + fragment, "--dump-dom").stdout


def long_example() -> AttributionOutput:
    """520 prompt tokens and 48 generated ones (a compact table), plus an encoder-decoder example."""
    tokens = ["<s>"] + [f"p{i}<&>" for i in range(519)] + [f"g{i}" for i in range(48)]
    return AttributionOutput((decoder_only(tokens, n_prompt=520, seed=7), encoder_decoder()),
                             info={"model_name": "tiny", "attribution_method": "saliency"})


@pytest.fixture(scope="module")
def long_page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("html")
    out = long_example()
    path = folder / "long.html"
    path.write_text(render_html(out), encoding="utf-8")
    return out, path


def check_cells(dom: str, out: AttributionOutput, mode: str) -> None:
    """Every block's tables hold every token and one cell per (token, generated token), showing ``mode``."""
    doc = parse(dom)
    normalize, rescale = mode == "normalized", mode == "rescaled"
    expected = []
    for seq in out:
        shown = seq.aggregate(normalize=normalize, rescale=rescale)
        for tokens, scores in ((seq.source_tokens, shown.source_attributions),
                               (seq.target_tokens, shown.target_attributions)):
            if scores is not None:
                expected.append((seq, tokens, scores))
    assert len(doc.tables) == len(expected)
    for table, (seq, tokens, scores) in zip(doc.tables, expected, strict=True):
        header, body = table[0], table[1:]
        shown = dict(zip((*seq.source_tokens, *seq.target_tokens),  # tokens as read, decided once per example
                         display_tokens((*seq.source_tokens, *seq.target_tokens)), strict=True))
        assert [c[2] for c in header[1:]] == [f"{seq.attr_pos_start + i}{shown[t]}"
                                               for i, t in enumerate(seq.generated_tokens)]
        for r, token in enumerate(tokens):
            row = body[r]
            assert row[0][2] == f"{r}{shown[token]}"
            assert len(row) == 1 + scores.shape[1]
            for (tag, attrs, text), value in zip(row[1:], scores[r], strict=True):
                assert tag == "td"
                if np.isnan(value):
                    assert text == "" and "nan" in attrs["class"]
                else:
                    assert np.float32(attrs["title"].split("\n")[0]) == value
                    assert text == f"{value:.3f}".replace("-0.000", "0.000")


def test_chromium_renders_every_token_and_cell_of_a_long_page(long_page, tmp_path):
    out, path = long_page
    dom = dump_dom(tmp_path, path)
    root = dom[dom.index('<div class="distattr'):].split(">", 1)[0]
    assert "data-ready" in root and "js" in root  # the inline script ran
    assert '<div class="controls">' in dom  # and showed the display switch
    assert '<table class="heatmap compact">' in dom
    check_cells(dom, out, "normalized")
    steps = [row for table in parse(dom).tables for row in table if row[0][2] == "probability"]
    assert len(steps) == 2 and all(len(row) == 1 + len(seq.generated_tokens) for row, seq in zip(steps, out,
                                                                                              strict=True))


def test_chromium_switches_the_display_from_the_url(long_page, tmp_path):
    out, path = long_page
    dom = dump_dom(tmp_path, path, "#raw")
    assert 'data-mode="raw"' in dom
    check_cells(dom, out, "raw")  # the script rewrote every cell: text, exact value, colour
    small = AttributionOutput((with_layers(), encoder_decoder()))
    page = tmp_path / "small.html"
    page.write_text(render_html(small, normalize=False), encoding="utf-8")
    dom = dump_dom(tmp_path, page, "#rescaled")
    assert 'data-mode="rescaled"' in dom and '<span class="mode-label">rescaled by the global max</span>' in dom
    check_cells(dom, small, "rescaled")


def test_chromium_screenshot(long_page, tmp_path):
    out, _ = long_page
    path = tmp_path / "one.html"  # the colour scale is shared by the examples: show the long one alone
    path.write_text(render_html(AttributionOutput(out.sequences[:1])), encoding="utf-8")
    shot = tmp_path / "page.png"
    chromium(tmp_path, path.as_uri(), f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 900)
    image = pytest.importorskip("PIL.Image", reason="pillow decodes the screenshot")
    with image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 110) & (pixels[..., 2] < 120)
    assert red.sum() > 2000  # heatmap cells were painted


def test_chromium_runs_notebook_fragments_side_by_side(tmp_path):
    """A notebook puts several outputs in one document: each fragment initialises itself, once."""
    a, b = AttributionOutput((decoder_only(),)), AttributionOutput((with_layers(),))
    page = tmp_path / "notebook.html"
    page.write_text("<!DOCTYPE html><html><body><div class='cell'>" + render_fragment(a)
                    + "</div><div class='cell'>" + render_fragment(b, normalize=False) + "</div></body></html>",
                    encoding="utf-8")
    dom = dump_dom(tmp_path, page)
    roots = [chunk.split(">", 1)[0] for chunk in dom.split('<div class="distattr')[1:]]
    assert len(roots) == 2 and all("data-ready" in r for r in roots)
    assert 'data-mode="normalized"' in roots[0] and 'data-mode="raw"' in roots[1]
    assert dom.count('<div class="controls">') == 2


def test_playwright_clicks_the_switch_and_hovers_cells(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    seq = decoder_only(["<s>", "a", "b"] + [f"w{i}" for i in range(45)], n_prompt=3, seed=2)  # a compact table
    path = tmp_path / "page.html"
    path.write_text(render_html(AttributionOutput((seq,))), encoding="utf-8")
    raw = seq.aggregate(normalize=False).target_attributions
    norm = seq.aggregate().target_attributions
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS[1:])
        except sync_api.Error as err:  # e.g. a playwright too old for this chromium: not this project's bug
            pytest.skip(f"playwright cannot drive {CHROMIUM}: {str(err).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(path.as_uri())
            first = page.locator("section#example-0 td[data-r]").first
            assert np.float32(first.text_content()) == pytest.approx(norm[0, 0], abs=5e-4)
            page.click("button[data-mode=raw]")
            assert page.locator(".distattr").get_attribute("data-mode") == "raw"
            assert np.float32(first.get_attribute("title").split("\n")[0]) == raw[0, 0]
            assert page.locator("button[data-mode=raw]").get_attribute("aria-pressed") == "true"
            assert page.locator(".mode-label").text_content() == "raw"
            first.hover()
            readout = page.locator(".readout").text_content()
            first_row, first_column = display_tokens((seq.target_tokens[0], seq.generated_tokens[0]))
            assert readout.startswith(f"{first_row} → {first_column}")
            assert page.locator("th.hl").count() == 2  # its row and column headers are highlighted
            page.click("button[data-mode=normalized]")
            assert np.float32(first.get_attribute("title").split("\n")[0]) == norm[0, 0]
            assert first.bounding_box()["width"] < 20  # compact: colour only
            page.check("input.numbers")
            assert "numbers" in page.locator(".distattr").get_attribute("class")
            assert first.bounding_box()["width"] > 30  # the numbers are shown again
        finally:
            browser.close()
