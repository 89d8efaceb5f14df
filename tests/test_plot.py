"""The matplotlib heatmaps: ``out.plot("fig.png")`` (Agg, no display needed)."""

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from test_views import decoder_only, encoder_decoder, with_layers

from distattr.results import AttributionOutput, SequenceAttribution
from distattr.viz.common import color_limit
from distattr.viz.plot import MAX_SIDE, MIN_LABEL_PT, plot_figure, plot_paths

pytest.importorskip("matplotlib", reason="matplotlib is the optional 'viz' extra")

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def read_png(path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)[..., :3]


def test_plot_writes_a_png_with_source_target_and_step_scores(tmp_path):
    seq = encoder_decoder()
    path = seq.plot(tmp_path / "sub" / "fig.png", dpi=100)
    assert path == tmp_path / "sub" / "fig.png"
    width, height = png_size(path)
    assert 250 < width < 1500 and 250 < height < 1500
    pixels = read_png(path)
    red = (pixels[..., 0] > 0.6) & (pixels[..., 2] < 0.35)
    blue = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.35)
    assert red.sum() > 100 and blue.sum() > 100  # signed scores: both ends of the diverging scale
    fig = seq.plot()
    heatmaps = [ax for ax in fig.axes if ax.images and ax.get_ylabel() in ("Source", "Target")]
    assert [ax.get_ylabel() for ax in heatmaps] == ["Source", "Target"]
    assert [t.get_text() for t in heatmaps[0].get_yticklabels()] == list(seq.source_tokens)
    assert [t.get_text() for t in heatmaps[0].get_xticklabels()] == list(seq.generated_tokens)
    steps = next(ax for ax in fig.axes if [t.get_text() for t in ax.get_yticklabels()] == ["probability"])
    assert steps.images


def test_plot_colour_scale_is_symmetric_and_nan_cells_blank():
    seq = decoder_only()
    fig = seq.plot(normalize=False)
    image = fig.axes[0].images[0]
    limit = color_limit([seq.aggregate(normalize=False)])
    assert image.norm.vmin == pytest.approx(-limit) and image.norm.vmax == pytest.approx(limit)
    data = image.get_array()
    assert np.array_equal(np.ma.getmaskarray(data), np.isnan(seq.target_attributions))  # NaN: masked, not drawn
    assert image.get_cmap().get_bad()[3] == 0  # transparent over a hatched background
    assert image.get_cmap().name.startswith("RdBu_r")


def test_plot_of_several_examples_shares_the_scale_and_writes_one_file_each(tmp_path):
    out = AttributionOutput((decoder_only(seed=0, scale=0.5), decoder_only(seed=1, scale=2.0), encoder_decoder()))
    written = out.plot(tmp_path / "fig.png", normalize=False, dpi=60)
    assert written == [tmp_path / f"fig-{i}.png" for i in range(3)]
    assert all(png_size(p)[0] > 100 for p in written)
    figures = out.plot(normalize=False)
    limit = color_limit(out.aggregate(normalize=False).sequences)
    assert [f.axes[0].images[0].norm.vmax for f in figures] == pytest.approx([limit] * 3)
    assert [f.get_suptitle() for f in figures] == ["Example 0", "Example 1", "Example 2"]
    assert out.plot(tmp_path / "one.png", index=1, dpi=60) == [tmp_path / "one.png"]
    assert out.plot(tmp_path / "ex{index}.pdf", index=[0, 2]) == [tmp_path / "ex0.pdf", tmp_path / "ex2.pdf"]
    assert (tmp_path / "ex2.pdf").read_bytes()[:5] == b"%PDF-"
    assert AttributionOutput(out.sequences[:1]).plot(tmp_path / "single.png", dpi=60) == [tmp_path / "single.png"]
    assert plot_paths("a/b.svg", [4]) == [Path("a/b.svg")] and plot_paths("b.png", [0, 1])[1] == Path("b-1.png")
    with pytest.raises(IndexError):
        out.plot(tmp_path / "x.png", index=5)


def test_plot_aggregates_extra_dims_like_the_other_views():
    seq = with_layers()
    fig = seq.plot()
    shown = fig.axes[0].images[0].get_array()
    expected = seq.aggregate().target_attributions
    assert np.allclose(np.ma.filled(shown, np.nan), expected, equal_nan=True)


def test_plot_of_a_long_sequence_stays_legible(tmp_path):
    tokens = ["<s>"] + [f"p{i}" for i in range(540)] + [f"g{i}" for i in range(30)]
    seq = decoder_only(tokens, n_prompt=541, seed=4)
    fig = seq.plot()
    width, height = fig.get_size_inches()
    assert height < MAX_SIDE + 6 and width < MAX_SIDE + 6  # grows with the sequence, up to a bound
    ax = fig.axes[0]
    labels = ax.get_yticklabels()
    assert 100 < len(labels) < len(tokens)  # every k-th token labelled, no overlap
    assert all(label.get_fontsize() >= MIN_LABEL_PT for label in labels)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(seq.generated_tokens)  # few columns: all
    path = seq.plot(tmp_path / "long.png", dpi=40)
    w, h = png_size(path)
    assert h > 800 and h > 5 * w / 2  # tall and narrow, as the data


def test_plot_handles_tricky_tokens_and_step_scores_alone(tmp_path):
    tokens = ["$\\frac{", "$x$", "_a^b", "\n", "", "日本"]
    seq = decoder_only(tokens, n_prompt=2)
    fig = seq.plot()  # no mathtext: "$\frac{" would not parse
    assert "$\\frac{" in [t.get_text() for t in fig.axes[0].get_yticklabels()]
    seq.plot(tmp_path / "tricky.png", dpi=50)
    steps_only = SequenceAttribution(("a",), ("a", "b", "c"), (0,), (0, 1, 2), None, None,
                                     {"probability": np.array([0.5, 0.25], dtype=np.float32)}, 1, 3)
    assert png_size(steps_only.plot(tmp_path / "steps.png", dpi=50))[0] > 50
    empty = SequenceAttribution(("a",), ("a", "b"), (0,), (0, 1), None, None, {}, 1, 2)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_figure(empty)


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'distattr\[viz\]'"):
        decoder_only().plot(tmp_path / "fig.png")
    with pytest.raises(ImportError, match="matplotlib"):
        AttributionOutput((decoder_only(),)).plot(tmp_path / "fig.png")
    assert not (tmp_path / "fig.png").exists()
    from distattr.cli import main

    code = main(["attribute", "hello", "--model", str(tmp_path / "no-model"), "--png", str(tmp_path / "fig.png")])
    assert code == 2 and "distattr[viz]" in capsys.readouterr().err  # before loading any model
