"""Dataset-wide statistics over stores (distattr/statistics: summaries, reductions, correlation, faithfulness, report).

Known answers come from plain per-example numpy loops over ``store[i]`` (an independent read path), scipy on the
joined data, and the model itself for faithfulness."""

from __future__ import annotations

import functools
import math
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import torch

import distattr
from distattr.statistics import chunks, correlation, reductions, summaries
from distattr.statistics.faithfulness import faithfulness
from distattr.statistics.synthetic import TOPICS, write_synthetic_store
from distattr.store import open_store, save_outputs

pytestmark = pytest.mark.usefixtures("one_thread")
N_SYNTHETIC = 120
SMALL_BLOCKS = 16 << 10  # 16 slots of the synthetic store per task: several slot blocks
TEXTS = ["the cat is in the house", "paris is a big city in france", "the dog said that it was red",
         "one two three four five"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """120 synthetic examples in slabs of 4 units (slot order != dataset order), steps in chunks of 8."""
    url = str(tmp_path_factory.mktemp("stats") / "synthetic.zarr")
    info = write_synthetic_store(url, N_SYNTHETIC, seed=3, prompt=(4, 20), steps=12, steps_chunk=8, slab_units=4)
    return open_store(url), info


@pytest.fixture(scope="module")
def sequences(synthetic):
    """The synthetic examples read one by one (``store[i]``), once."""
    store, _ = synthetic
    return [store[i][0] for i in range(len(store))]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Small stores of real attributions of tiny models: gpt2 saliency, gpt2 attention (layer x head), t5
    saliency with the target prefix attributed."""
    from tiny import tiny_model

    root = tmp_path_factory.mktemp("tiny-stores")
    out = {}
    for name, kind, method, kwargs in (("saliency", "gpt2", "saliency", {}),
                                       ("attention", "gpt2", "attention", {}),
                                       ("t5", "t5", "saliency", {"attribute_target": True})):
        model, tok = tiny_model(kind)
        m = distattr.load_model(model, method, tokenizer=tok)
        res = m.attribute(TEXTS, generation_args={"max_new_tokens": 5}, step_scores=["probability"],
                          show_progress=False, **kwargs)
        metas = [{"topic": TOPICS[i % 2], "n": i} for i in range(len(TEXTS))]
        save_outputs(str(root / f"{name}.zarr"), res, ids=[f"q{i}" for i in range(len(TEXTS))], metas=metas,
                     unit_size=2)
        out[name] = open_store(str(root / f"{name}.zarr"))
    return out


# ---------------------------------------------------------------- numpy references


def _columns(seq, select=None):
    """Per explained column: a list of (side, position, token id, value vector over the extra dims) of its
    context cells (non-NaN), read from one SequenceAttribution."""
    enc_dec = seq.source_attributions is not None
    mats = [(True, seq.source_attributions, seq.source_ids)] if enc_dec else []
    if seq.target_attributions is not None:
        mats.append((False, seq.target_attributions, seq.target_ids))
    dims = tuple(seq.dims)
    out = []
    for c in range(seq.attr_pos_end - seq.attr_pos_start):
        cells = []
        for in_source, m, ids in mats:
            for r in range(m.shape[0]):
                v = np.asarray(m[r, c], dtype=np.float64).reshape(-1) if not dims else np.asarray(m[r, c], np.float64)
                if select:
                    v = v[tuple(select.get(d, slice(None)) for d in dims)]
                v = np.atleast_1d(v).reshape(-1)
                if np.isnan(v).all():
                    continue
                side = "source" if in_source or (not enc_dec and r < len(seq.source_ids)) else "prefix"
                cells.append((side, r, int(ids[r]), in_source, v))
        out.append(cells)
    return out


def _reference_summary(seq, select=None):
    shares, ents, norms, masses = [], [], [], []
    token_share = defaultdict(float)
    for cells in _columns(seq, select):
        m = np.array([np.nanmean(np.abs(v)) for *_, v in cells])
        total = m.sum()
        if not cells or total <= 0:
            continue
        p = m / total
        shares.append(sum(pi for pi, cell in zip(p, cells, strict=True) if cell[0] == "source"))
        nz = p[p > 0]
        ents.append(-(nz * np.log(nz)).sum())
        if len(p) >= 2:
            norms.append(ents[-1] / np.log(len(p)))
        masses.append(total)
        for pi, (side, r, *_rest) in zip(p, cells, strict=True):
            token_share[(side, r, _rest[1])] += pi
    n = len(shares)
    top = sorted(token_share.items(), key=lambda kv: -kv[1])[0]
    return {"share_source": np.mean(shares), "entropy": np.mean(ents), "entropy_normalized": np.mean(norms),
            "mass": np.mean(masses), "top1_share": top[1] / n, "top1_key": top[0]}


def _reference_cells(seqs, key, value="normalized", bins=10):
    """{group: [values]} over every example, by one key, from per-example loops."""
    groups = defaultdict(list)
    for seq in seqs:
        for c, cells in enumerate(_columns(seq)):
            t = seq.attr_pos_start + c
            total = sum(np.abs(v[0]) for *_, v in cells)
            for side, r, token, in_source, v in cells:
                x = v[0]
                x = {"normalized": abs(x) / total if total > 0 else np.nan, "abs": abs(x), "raw": x}[value]
                if np.isnan(x):
                    continue
                if key == "position":
                    denom = len(seq.source_ids) if in_source else t
                    k = min(math.floor(r / denom * bins), bins - 1) / bins
                elif key == "distance":
                    if in_source:
                        continue
                    k = t - r
                elif key == "side":
                    k = side
                elif key == "token":
                    k = token
                else:
                    k = c
                groups[k].append(x)
    return groups


# ---------------------------------------------------------------- summaries


def test_summaries_equal_per_example_numpy(synthetic, sequences):
    store, info = synthetic
    table = summaries.summarize(store, block_bytes=SMALL_BLOCKS)  # several slot blocks, two step blocks each
    assert list(table["example_index"]) == list(range(len(store)))
    assert chunks.grid(store, block_bytes=SMALL_BLOCKS).shape == (8, 2)
    for i in range(len(store)):
        seq = sequences[i]
        ref = _reference_summary(seq)
        row = table.iloc[i]
        assert row["example_id"] == f"ex-{i:07d}"
        for name in ("share_source", "entropy", "entropy_normalized", "mass", "top1_share"):
            assert row[name] == pytest.approx(ref[name], rel=1e-6), name
        assert (row["top1_side"], row["top1_position"]) == ref["top1_key"][:2]
        assert row["top1_token"] == seq.target_tokens[row["top1_position"]]
        assert row["share_prefix"] == pytest.approx(1 - ref["share_source"])
        assert row["probability_mean"] == pytest.approx(np.mean(seq.step_scores["probability"]), rel=1e-6)
        assert row["topic"] == TOPICS[i % len(TOPICS)]
    # the planted recency bias: more focus, more attribution on the last tokens, lower entropy
    rho = pd.Series(info.focus).corr(table["entropy_normalized"], method="spearman")
    assert rho < -0.3


@pytest.mark.parametrize("name", ["saliency", "attention", "t5"])
def test_summaries_of_real_stores(stores, name):
    store = stores[name]
    table = summaries.summarize(store, top_k=2)
    assert len(table) == len(TEXTS)
    for i in range(len(TEXTS)):
        seq = store[i][0]
        ref = _reference_summary(seq)
        for metric in ("share_source", "entropy", "entropy_normalized", "mass", "top1_share"):
            assert table[metric][i] == pytest.approx(ref[metric], rel=1e-6), (metric, i)
        side, position, _ = ref["top1_key"]
        assert (table["top1_side"][i], table["top1_position"][i]) == (side, position)
        tokens = seq.source_tokens if name == "t5" and side == "source" else seq.target_tokens
        assert table["top1_token"][i] == tokens[position]
    assert {"top2_token", "topic", "n"} <= set(table.columns) and "top3_token" not in table.columns


def test_summaries_select_one_layer(stores):
    store = stores["attention"]
    table = summaries.summarize(store, select={"layer": -1})
    for i in range(len(TEXTS)):
        ref = _reference_summary(store[i][0], select={"layer": 1})
        assert table["entropy"][i] == pytest.approx(ref["entropy"], rel=1e-6)
        assert table["share_source"][i] == pytest.approx(ref["share_source"], rel=1e-6)
    with pytest.raises(ValueError, match="no dim 'block'"):
        summaries.summarize(store, select={"block": 0})
    with pytest.raises(ValueError, match="out of range"):
        summaries.summarize(store, select={"layer": 2})


def test_write_table_parquet_and_csv(stores, tmp_path):
    table = summaries.summarize(stores["saliency"])
    back = pd.read_parquet(summaries.write_table(table, tmp_path / "s.parquet"))
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert len(pd.read_csv(summaries.write_table(table, tmp_path / "s.csv"))) == len(table)
    with pytest.raises(ValueError, match="unknown table format"):
        summaries.write_table(table, tmp_path / "s.xlsx")


# ---------------------------------------------------------------- filters


def test_where_filters(synthetic, stores):
    store, _ = synthetic
    full = summaries.summarize(store)
    science = summaries.summarize(store, where=["topic=science"])
    assert list(science["example_index"]) == list(full["example_index"][full["topic"] == "science"])
    two = summaries.summarize(store, where=["topic=science", "topic=art", "n_source>=12"])
    expected = full[full["topic"].isin(["science", "art"]) & (full["n_source"] >= 12)]
    assert list(two["example_index"]) == list(expected["example_index"])
    assert list(summaries.summarize(stores["saliency"], where=["n!=1", "n<3"])["example_id"]) == ["q0", "q2"]
    assert summaries.summarize(store, where=["topic=none"]).empty
    assert reductions.reduce_store(store, "position", where=["topic=none"]).empty
    with pytest.raises(ValueError, match="no example has field"):
        chunks.selection(store, ["colour=red"])
    with pytest.raises(ValueError, match="expects FIELD=VALUE"):
        chunks.parse_where(["topic"])
    with pytest.raises(ValueError, match="is a number"):
        chunks.selection(store, ["n_source>=many"])


# ---------------------------------------------------------------- reductions


@pytest.mark.parametrize("key", ["position", "distance", "side", "token", "step"])
def test_reduction_means_equal_numpy(synthetic, sequences, key):
    store, _ = synthetic
    table = reductions.reduce_store(store, key, quantiles=(0.25, 0.5, 0.9), block_bytes=SMALL_BLOCKS,
                                    max_quantile_groups=200)
    reference = _reference_cells(sequences, key)
    assert len(table) == len(reference)
    with_quantiles = table["resolution"].notna()
    assert with_quantiles.sum() == min(len(table), 200)
    if not with_quantiles.all():  # the most frequent groups get quantiles
        assert table["count"][with_quantiles].min() >= table["count"][~with_quantiles].max()
    for _, row in table.iterrows():
        values = np.array(reference[row[key]])
        assert row["count"] == len(values)
        assert row["mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert row["std"] == pytest.approx(values.std(ddof=1), rel=1e-6) if len(values) > 1 else np.isnan(row["std"])
        assert (row["min"], row["max"]) == pytest.approx((values.min(), values.max()))
        for q in (0.25, 0.5, 0.9):
            if not np.isnan(row["resolution"]):
                assert abs(row[f"q{q * 100:g}"] - np.quantile(values, q)) <= row["resolution"] + 1e-12
    if key == "token":
        first = table.iloc[0]
        assert first["token_text"] == f"w{first['token']}"


@pytest.mark.parametrize("name", ["t5", "saliency"])
def test_reductions_of_real_stores(stores, name):
    store = stores[name]
    for key, value in (("position", "normalized"), ("distance", "abs"), ("side", "raw")):
        table = reductions.reduce_store(store, key, value=value, bins=4)
        reference = _reference_cells([store[i][0] for i in range(len(store))], key, value, bins=4)
        assert sorted(reference) == sorted(table[key])
        for _, row in table.iterrows():
            assert row["mean"] == pytest.approx(np.mean(reference[row[key]]), rel=1e-9)


def test_column_values_by_layer_and_head(stores):
    store = stores["attention"]
    table = reductions.reduce_store(store, ("layer", "head"), value="entropy", quantiles=())
    assert len(table) == 4 and list(table["layer"]) == ["0", "0", "1", "1"]
    expected = defaultdict(list)
    for i in range(len(store)):
        seq = store[i][0]
        a = seq.target_attributions  # [T, steps, layer, head]
        for c in range(a.shape[1]):
            col = np.abs(a[:, c].astype(np.float64))
            for lay in range(2):
                for h in range(2):
                    v = col[:, lay, h][~np.isnan(col[:, lay, h])]
                    p = v / v.sum()
                    expected[(str(lay), str(h))].append(-(p[p > 0] * np.log(p[p > 0])).sum())
    for _, row in table.iterrows():
        assert row["mean"] == pytest.approx(np.mean(expected[(row["layer"], row["head"])]), rel=1e-9)
        assert row["count"] == len(expected[(row["layer"], row["head"])])
    share = reductions.reduce_store(store, "head", value="share_source", select={"layer": 0}, quantiles=())
    assert len(share) == 2 and share["mean"].between(0, 1).all()


def test_reduction_errors(stores, synthetic):
    store, _ = synthetic
    with pytest.raises(ValueError, match="cannot group by 'layer'"):
        reductions.reduce_store(store, "layer")
    with pytest.raises(ValueError, match="summarises whole columns"):
        reductions.reduce_store(store, "position", value="entropy")
    with pytest.raises(ValueError, match="unknown value"):
        reductions.reduce_store(store, "position", value="median")
    with pytest.raises(ValueError, match="selected away"):
        reductions.reduce_store(stores["attention"], "layer", select={"layer": 0})


def test_reductions_are_chunked_dask_graphs(synthetic):
    """Memory is bounded because each task holds one block: the graph has one task per block of at most
    ``block_bytes`` of attributions, and combines at most ``split_every`` partial results at a time."""
    store, _ = synthetic
    block_bytes = SMALL_BLOCKS
    cut = chunks.grid(store, block_bytes=block_bytes)
    schema = store.schema
    per_slot = 4 * schema.max_target * schema.steps_chunk
    assert cut.slots * per_slot <= block_bytes and cut.slots % 16 == 0
    spec = reductions.make_spec(store, ("position",), "normalized", 10)
    blocks, grid = chunks.map_blocks(store, functools.partial(reductions._block_stats, spec=spec),
                                     selected=chunks.selection(store), block_bytes=block_bytes, name="reduce-block")
    assert blocks.shape == (math.ceil(schema.n_slots / cut.slots), 2) and grid == cut
    total = chunks.tree(blocks.ravel(), reductions.GroupStats.merge, split_every=4, name="combine")
    graph = dict(total.__dask_graph__())
    block_tasks = [k for k in graph if str(k).startswith("reduce-block-")]
    combines = [k for k in graph if str(k).startswith("combine-")]
    assert len(block_tasks) == blocks.size > 8
    assert len(combines) >= blocks.size // 4
    reads = [k for k in graph if "from-zarr" in str(k)]
    assert len(reads) >= blocks.shape[0], "attributions are read by dask, one Zarr slice per block"
    # every task sees one bounded block: at most grid.slots slots and one step chunk
    shapes, _ = chunks.map_blocks(store, lambda b: b.target.shape, selected=chunks.selection(store),
                                  block_bytes=block_bytes)
    for shape in chunks.compute(*shapes.ravel()):
        assert shape[0] <= cut.slots and shape[2] <= schema.steps_chunk
    (stats,) = chunks.compute(total)
    (direct,) = chunks.compute(chunks.tree(blocks.ravel(), reductions.GroupStats.merge))
    np.testing.assert_array_equal(stats.count, direct.count)


# ---------------------------------------------------------------- correlation


def test_correlation_equals_scipy_on_the_joined_rows(stores, synthetic, tmp_path):
    from scipy import stats

    store, info = synthetic
    table = summaries.summarize(store)
    rng = np.random.default_rng(0)
    ids = list(table["example_id"].sample(frac=0.7, random_state=1)) + ["not-in-store-1", "not-in-store-2"]
    y = rng.normal(size=len(ids))
    y[3] = np.nan
    labels = pd.DataFrame({"example_id": ids, "y": y})
    path = tmp_path / "labels.csv"
    labels.to_csv(path, index=False)
    joined = correlation.join_labels(table, correlation.read_labels(path))
    (res,) = correlation.correlate(joined, "entropy", "y")
    manual = table.merge(labels, on="example_id").dropna(subset=["y", "entropy"])
    assert res.n == len(manual) == len(ids) - 3 and res.dropped == 1
    tau = stats.kendalltau(manual["entropy"], manual["y"])
    rho = stats.spearmanr(manual["entropy"], manual["y"])
    assert (res.kendall_tau, res.kendall_p) == pytest.approx((tau.statistic, tau.pvalue))
    assert (res.spearman_rho, res.spearman_p) == pytest.approx((rho.statistic, rho.pvalue))
    # the planted focus is what drives the entropy: a strong, significant negative correlation
    focus = pd.DataFrame({"example_id": table["example_id"], "focus": info.focus})
    (strong,) = correlation.correlate(correlation.join_labels(table, focus), "entropy_normalized", "focus")
    assert strong.kendall_tau < -0.2 and strong.kendall_p < 1e-3
    # labels from a metadata field
    (meta,) = correlation.correlate(summaries.summarize(stores["saliency"]), "share_source", "n")
    assert meta.n == len(TEXTS)


def test_correlation_errors(synthetic, tmp_path):
    store, _ = synthetic
    table = summaries.summarize(store)
    pd.DataFrame({"example_id": ["x", "y"], "y": [1, 2]}).to_csv(tmp_path / "none.csv", index=False)
    with pytest.raises(ValueError, match="no label id matches"):
        correlation.join_labels(table, correlation.read_labels(tmp_path / "none.csv"))
    pd.DataFrame({"id": ["a", "a"], "y": [1, 2]}).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(ValueError, match="more than once"):
        correlation.read_labels(tmp_path / "dup.csv", "id")
    with pytest.raises(ValueError, match="no id column"):
        correlation.read_labels(tmp_path / "dup.csv")
    with pytest.raises(ValueError, match="no column 'missing'"):
        correlation.correlate(table, "missing", "share_source")
    with pytest.raises(ValueError, match="holds no numbers"):
        correlation.correlate(table, "share_source", "topic")


# ---------------------------------------------------------------- faithfulness


@pytest.fixture(scope="module")
def gpt2_model():
    from tiny import tiny_model

    model, tok = tiny_model("gpt2")
    return model, tok


def _probability(model, ids, target):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids)])).logits[0, -1]
    return float(torch.softmax(logits.float(), -1)[target])


@pytest.mark.parametrize("mode", ["replace", "delete"])
def test_faithfulness_equals_a_hand_computed_case(stores, gpt2_model, mode):
    model, tok = gpt2_model
    m = distattr.load_model(model, "saliency", tokenizer=tok)
    store = stores["saliency"]
    result = faithfulness(store, m, fractions=(0.3, 1.0), mode=mode, limit=2)
    assert sorted(result.steps["example_id"].unique()) == ["q0", "q1"]
    special = set(tok.all_special_ids)
    for i, c in ((0, 0), (1, 3)):
        seq = store[i][0]
        t = seq.attr_pos_start + c
        ids = np.array(seq.target_ids)
        scores = np.abs(seq.target_attributions[:t, c])
        candidates = [r for r in range(t) if not np.isnan(scores[r]) and ids[r] not in special]
        ranked = sorted(candidates, key=lambda r: -scores[r])
        full = _probability(model, ids[:t], ids[t])
        row = result.steps[(result.steps["example_index"] == i) & (result.steps["step"] == c)].iloc[0]
        assert row["p_full"] == pytest.approx(full, rel=1e-5)
        for f in (0.3, 1.0):
            k = math.ceil(f * len(ranked))
            assert row[f"k_{f:g}"] == k
            for name, removed in (("comprehensiveness", ranked[:k]), ("sufficiency", ranked[k:])):
                if mode == "replace":
                    changed = ids[:t].copy()
                    changed[removed] = tok.unk_token_id
                else:
                    changed = np.delete(ids[:t], removed)
                    changed = changed if len(changed) else np.array([tok.unk_token_id])
                expected = full - _probability(model, changed, ids[t])
                assert row[f"{name}_{f:g}"] == pytest.approx(expected, abs=1e-6), (name, f)
    assert result.steps["sufficiency_1"].abs().max() < 1e-6  # keeping every candidate changes nothing
    summary = result.summary()
    assert list(summary["metric"]) == ["at 0.3", "at 1", "AOPC"]
    assert summary["comprehensiveness"].iloc[-1] == pytest.approx(
        result.examples["aopc_comprehensiveness"].mean())


def test_occlusion_ranking_beats_random_at_one_token(gpt2_model, tmp_path):
    """Signed occlusion's top token is, by construction, the single replacement that lowers p(y) most: its
    comprehensiveness at k = 1 is at least that of any other ranking, step by step."""
    model, tok = gpt2_model
    m = distattr.load_model(model, "occlusion", tokenizer=tok, absolute=False)
    res = m.attribute(TEXTS, generation_args={"max_new_tokens": 6}, show_progress=False)
    save_outputs(str(tmp_path / "occ.zarr"), res)
    store = open_store(str(tmp_path / "occ.zarr"))
    tiny_fraction = 1e-6  # k = ceil(f * candidates) = 1
    best = faithfulness(store, m, fractions=(tiny_fraction,), rank="signed")
    for seed in (0, 1):
        rand = faithfulness(store, m, fractions=(tiny_fraction,), rank="random", seed=seed)
        a = best.steps[f"comprehensiveness_{tiny_fraction:g}"].to_numpy()
        b = rand.steps[f"comprehensiveness_{tiny_fraction:g}"].to_numpy()
        assert (a >= b - 1e-6).all()
        assert a.mean() > b.mean() + 0.05


def test_faithfulness_checks(stores, gpt2_model):
    from tiny import tiny_model

    model, tok = gpt2_model
    m = distattr.load_model(model, "saliency", tokenizer=tok)
    with pytest.raises(ValueError, match="fractions"):
        faithfulness(stores["saliency"], m, fractions=(0.0,))
    with pytest.raises(ValueError, match="unknown mode"):
        faithfulness(stores["saliency"], m, mode="mask")
    other, other_tok = tiny_model("llama")
    with pytest.warns(UserWarning, match="config hash"):
        faithfulness(stores["saliency"], distattr.load_model(other, "saliency", tokenizer=other_tok), limit=1)


def test_faithfulness_encoder_decoder(stores):
    """Encoder tokens and the decoder prefix are both candidates; the decoder-start token never is."""
    from tiny import tiny_model

    model, tok = tiny_model("t5")
    m = distattr.load_model(model, "saliency", tokenizer=tok)
    store = stores["t5"]
    result = faithfulness(store, m, fractions=(0.5, 1.0), limit=2)
    steps = result.steps
    seqs = [store[i][0] for i in range(2)]
    assert len(steps) == sum(s.attr_pos_end - s.attr_pos_start for s in seqs)
    assert steps["sufficiency_1"].abs().max() < 1e-6
    special = set(tok.all_special_ids)
    seq, c = seqs[1], 2
    t = seq.attr_pos_start + c
    source, target = np.array(seq.source_ids), np.array(seq.target_ids)
    row = steps[(steps["example_index"] == 1) & (steps["step"] == c)].iloc[0]
    removable_src = [r for r in range(len(source)) if source[r] not in special]
    removable_tgt = [r for r in range(1, t) if target[r] not in special]
    assert row["candidates"] == len(removable_src) + len(removable_tgt)
    blank_src, blank_tgt = source.copy(), target[:t].copy()
    blank_src[removable_src] = tok.unk_token_id
    blank_tgt[removable_tgt] = tok.unk_token_id

    def p(src, tgt):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(src)[None], decoder_input_ids=torch.tensor(tgt)[None]).logits[0, -1]
        return float(torch.softmax(logits, -1)[target[t]])

    full = p(source, target[:t])
    assert row["p_full"] == pytest.approx(full, rel=1e-5)
    assert row["comprehensiveness_1"] == pytest.approx(full - p(blank_src, blank_tgt), abs=1e-6)


# ---------------------------------------------------------------- report and command line


def test_report_is_self_contained(stores, tmp_path):
    from distattr.statistics import report

    store = stores["attention"]
    table = summaries.summarize(store)
    reduced = reductions.reduce_store(store, ("layer", "head"), value="entropy")
    by_pos = reductions.reduce_store(store, "position")
    results = report.Results(summaries=table, reductions=((("layer", "head"), "entropy", reduced),
                                                           (("position",), "normalized", by_pos)))
    html = report.report_html(store, results)
    assert html.count("data:image/png;base64,") == 3
    assert "http" not in html.replace("data:image", "") and "<script" not in html
    assert "entropy by layer x head" in html and "Per-example summaries" in html


def test_cli_stats(synthetic, tmp_path, capsys):
    from distattr.cli import main

    store, info = synthetic
    labels = pd.DataFrame({"example_id": [f"ex-{i:07d}" for i in range(len(info.focus))], "focus": info.focus})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    code = main(["stats", store.url, "--summaries", str(tmp_path / "s.parquet"), "--by", "position",
                 "--by", "step:entropy", "--by", "token", "--where", "topic!=sports", "--labels",
                 str(tmp_path / "labels.csv"), "--label-column", "focus", "--metric", "entropy_normalized",
                 "--metric", "share_source", "--plots", str(tmp_path / "plots"), "--report",
                 str(tmp_path / "report.html"), "--tables", str(tmp_path / "tables"), "-q"])
    out = capsys.readouterr().out
    assert code == 0
    assert "== normalized by position" in out and "== Correlation with labels" in out
    table = pd.read_parquet(tmp_path / "s.parquet")
    assert "sports" not in set(table["topic"]) and len(table) == sum(1 for i in range(N_SYNTHETIC) if i % 4 != 1)
    corr = pd.read_csv(tmp_path / "tables" / "correlations.csv")
    assert corr["kendall_tau"][0] < -0.2
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "summaries.png", "by-position-normalized.png", "by-step-entropy.png", "by-token-normalized.png",
        "correlation-entropy_normalized-focus.png", "correlation-share_source-focus.png"}
    assert (tmp_path / "report.html").read_text().count("data:image/png") == 6
    assert main(["stats", store.url, "--by", "layer"]) == 2
    assert "cannot group by 'layer'" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "nothing.zarr")]) == 2


def test_cli_faithfulness_with_a_model_folder(stores, gpt2_model, tmp_path, capsys):
    from distattr.cli import main

    model, tok = gpt2_model
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    with pytest.warns(UserWarning, match="config hash"):  # saved to a folder: another _name_or_path
        code = main(["stats", stores["saliency"].url, "--faithfulness", "--model", str(tmp_path / "model"),
                     "--fractions", "0.2", "0.5", "--limit", "2", "--tables", str(tmp_path / "t"), "-q"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Faithfulness, abs ranking (replace)" in out and "Faithfulness, random ranking" in out
    steps = pd.read_csv(tmp_path / "t" / "faithfulness-abs-steps.csv")
    assert set(steps["example_id"]) == {"q0", "q1"}
    assert list(steps.columns[:3]) == ["example_index", "example_id", "step"]
