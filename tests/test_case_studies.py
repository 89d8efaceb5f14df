"""The case studies (distattr.casestudies): fact selection, the CAT map, Kendall tau tables, files and the CLI.

Plumbing on tiny random models; one slow test per study on the embedded model."""

import csv
import json

import numpy as np
import pytest
import torch

import distattr
from distattr.aggregate import pair_difference
from distattr.casestudies import agreement, cat, gender_bias
from distattr.casestudies.tokens import char_span_tokens
from distattr.cli import main
from distattr.methods.patching import trace

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "the big red house is located in the city of"


def _rows(path) -> list[list[str]]:
    return list(csv.reader(path.read_text(encoding="utf-8").splitlines()))


def _dict_rows(path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))


def _facts():
    return [cat.Fact(PROMPT, "the big red house", "paris", "P1", fact_id="0"),
            cat.Fact("the cat was built in", "the cat", "rome", "P1", fact_id="1"),
            cat.Fact("a dog is in", "a dog", "london", "P1", fact_id="2"),
            cat.Fact("the tower is in the", "the tower", "city", "P2", fact_id="3"),
            cat.Fact("the house is in the", "the house", "house", "P2", fact_id="4"),
            cat.Fact("the blue dog is", "the blue dog", "green", "P3", fact_id="5")]  # alone in its relation


def test_false_objects_come_from_the_same_relation_and_are_never_the_true_one():
    facts = _facts()
    chosen = cat.choose_false_objects(facts, seed=3)
    assert [f.fact_id for f in chosen] == ["0", "1", "2", "3", "4"]  # P3 has no other object
    by_relation = {r: {f.true_object for f in facts if f.relation == r} for r in ("P1", "P2")}
    for f in chosen:
        assert f.false_object in by_relation[f.relation] and f.false_object != f.true_object
    assert cat.choose_false_objects(facts, seed=3) == chosen  # deterministic
    picks = {cat.choose_false_objects(facts, seed=s)[0].false_object for s in range(20)}
    assert picks == {"rome", "london"}  # the seed matters; both candidates occur
    only_london = cat.choose_false_objects(facts, accept=lambda f, o: o == "london")
    assert [(f.fact_id, f.false_object) for f in only_london] == [("0", "london"), ("1", "london")]
    given = cat.choose_false_objects([cat.Fact("p a", "a", "x", "R", false_object="y")])
    assert given[0].false_object == "y"  # CounterFact's false object is kept


def test_packaged_facts_get_false_objects_of_their_relation():
    facts = cat.load_facts()
    assert len(facts) == 1209 and facts[0].subject == "Vinson Massif" and facts[0].true_object == "Antarctica"
    chosen = cat.choose_false_objects(facts)
    objects = {}
    for f in facts:
        objects.setdefault(f.relation, set()).add(f.true_object)
    assert len(chosen) == 1208  # relation P190 has a single fact
    assert all(f.false_object in objects[f.relation] and f.false_object.lower() != f.true_object.lower()
               for f in chosen)


def test_facts_formats_and_errors(tmp_path):
    counterfact = [{"case_id": 7, "requested_rewrite": {
        "prompt": "{} is in", "subject": "the cat", "relation_id": "P1",
        "target_true": {"str": "paris", "id": "Q1"}, "target_new": {"str": "rome", "id": "Q2"}}}]
    flat = [{"prompt": "the cat is in", "subject": "the cat", "target_true": " paris", "target_false": " rome"}]
    for records in (counterfact, flat):
        path = tmp_path / "f.json"
        path.write_text(json.dumps(records))
        (f,) = cat.load_facts(path)
        assert (f.prompt, f.subject, f.true_object, f.false_object) == ("the cat is in", "the cat", "paris", "rome")
    path.write_text(json.dumps([{"question": "x"}]))
    with pytest.raises(ValueError, match="expected ROME known facts"):
        cat.load_facts(path)
    with pytest.raises(FileNotFoundError, match="facts file not found"):
        cat.load_facts(tmp_path / "missing.json")


@pytest.mark.parametrize("kind, shift", [("gpt2", 0), ("llama", 1)])  # llama's tokenizer adds a BOS
def test_subject_tokens_and_position_groups(tiny, kind, shift):
    m = tiny(kind)
    fact = cat.Fact(PROMPT, "the big red house", "paris", "P1", false_object="rome")
    traced = cat.tokenize_fact(m.tokenizer, fact)
    assert traced.subject == (shift, shift + 4) and len(traced.prompt_ids) == 10 + shift
    assert traced.object_ids == (m.tokenizer.convert_tokens_to_ids("paris"),)
    groups = cat.position_groups(len(traced.prompt_ids), traced.subject)
    s = shift
    assert groups == ((s,), (s + 1, s + 2), (s + 3,), (s + 4,), tuple(range(s + 5, s + 9)), (s + 9,))
    same_first = cat.Fact(PROMPT, "the big red house", "paris", "P1", false_object="paris")
    assert cat.tokenize_fact(m.tokenizer, same_first) is None  # the objects must start with different tokens
    assert cat.position_groups(3, (0, 1)) == ((0,), (), (0,), (1,), (), (2,))  # one-token subject: first = last
    with pytest.raises(ValueError, match="must end before"):
        cat.position_groups(3, (1, 3))


def test_group_scores_and_average_skip_empty_groups():
    scores = np.arange(12, dtype=np.float64).reshape(6, 2)  # 6 positions, 2 layers
    groups = ((0,), (1, 2), (3,), (4,), (), (5,))
    table = cat.group_scores(scores, groups)
    np.testing.assert_array_equal(table[1], [3.0, 4.0])
    assert np.isnan(table[4]).all()
    maps = np.stack([table, table + 1.0])
    maps[1, 1] = np.nan  # the second fact has no middle token
    mean, counts = cat.average_map(maps)
    assert mean.shape == (2, 6) and counts == (2, 1, 2, 2, 0, 2)
    np.testing.assert_allclose(mean[:, 0], [0.5, 1.5])
    np.testing.assert_allclose(mean[:, 1], [3.0, 4.0])  # only the first fact
    assert np.isnan(mean[:, 4]).all()


def test_check_facts_agrees_with_greedy_generation(tiny):
    m = tiny("gpt2")
    prompts = ["the cat is in the", "a dog was built in", PROMPT]
    facts = []
    for i, p in enumerate(prompts):
        ids = m.tokenizer(p, return_tensors="pt")["input_ids"]
        new = m.model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=1)[0, ids.shape[1]:]
        words = m.tokenizer.convert_ids_to_tokens(new.tolist())
        facts.append(cat.Fact(p, p.split()[1], " ".join(words), "R", false_object="tower", fact_id=str(i)))
        wrong = "seven" if words[1] != "seven" else "eight"  # right first word, wrong second word
        facts.append(cat.Fact(p, p.split()[1], f"{words[0]} {wrong}", "R", false_object="tower"))
    traced = [cat.tokenize_fact(m.tokenizer, f) for f in facts]
    checks = cat.check_facts(m, traced, batch_size=4)
    assert [c.known for c in checks] == [True, False] * 3
    for t, c in zip(traced, checks, strict=True):  # probabilities of the first tokens after the prompt
        with torch.no_grad():
            probs = m.model(torch.tensor([t.prompt_ids])).logits[0, -1].softmax(-1)
        assert c.p_true == pytest.approx(float(probs[t.object_ids[0]]), rel=1e-4)
        assert c.p_false == pytest.approx(float(probs[t.false_first]), rel=1e-4)


def test_run_cat_writes_the_map_csv_png_and_results(tiny, tmp_path):
    m = tiny("llama")
    facts = [cat.Fact(PROMPT, "the big red house", "paris", "P1", fact_id="a"),
             cat.Fact("the cat was built in the city of", "the cat", "rome", "P1", fact_id="b"),
             cat.Fact("a small dog is located in", "a small dog", "london", "P1", fact_id="c")]
    layers = cat.mlp_layers(m)
    assert layers == ("model.layers.0.mlp", "model.layers.1.mlp")
    with pytest.raises(ValueError, match="No statement left"):  # the random model knows none of them
        cat.run_cat(m, tmp_path / "none", facts, show_progress=False)
    summary = cat.run_cat(m, tmp_path / "out", facts, known_only=False, batch_size=2, show_progress=False)
    assert summary.counts["traced"] == 3 and summary.counts["known"] == 0
    assert summary.map.shape == (2, 6) and summary.group_counts == (3, 2, 3, 3, 3, 3)
    rows = _rows(summary.files["map_csv"])
    assert rows[0] == ["layer", "module", *cat.GROUPS] and [r[1] for r in rows[1:]] == list(layers)
    np.testing.assert_allclose(np.array(rows[1:])[:, 2:].astype(float), summary.map, rtol=1e-6)
    assert summary.files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = _stored(summary.files["results_cat_attributions"])
    assert len(stored) == 3 and stored[0].dims == ("layer",) and stored[0].dim_labels == (layers,)
    # the map is the average of the stored attributions, grouped by position
    traced = [cat.tokenize_fact(m.tokenizer, f) for f in cat.choose_false_objects(facts)]
    manual = []
    for seq, t in zip(stored, traced, strict=True):
        n = len(t.prompt_ids)
        assert seq.target_attributions.shape == (n + 1, 1, 2) and np.isnan(seq.target_attributions[n]).all()
        manual.append(cat.group_scores(seq.target_attributions[:n, 0], cat.position_groups(n, t.subject)))
    np.testing.assert_allclose(np.nanmean(np.stack(manual), axis=0).T, summary.map, rtol=1e-5)
    # the stored attribution is layer gradient x activation of p(true) - p(false), summed over the hidden size
    false = f"{PROMPT} {traced[0].fact.false_object}"
    direct = m.attribute(PROMPT, PROMPT + " paris", method="layer_gradient_x_activation", target_layer=list(layers),
                         attributed_fn="contrast_prob_diff", contrast_targets=false, hidden_reduction="sum",
                         show_progress=False)[0]
    np.testing.assert_allclose(stored[0].target_attributions, direct.target_attributions, rtol=1e-4, atol=1e-7)
    diff = stored[0].step_scores["contrast_prob_diff"][0]
    assert diff == pytest.approx(stored[0].step_scores["probability"][0] - stored[0].step_scores["contrast_prob"][0])
    facts_rows = _dict_rows(summary.files["facts_csv"])
    assert [r["fact_id"] for r in facts_rows] == ["a", "b", "c"] and facts_rows[0]["subject_tokens"].count("|") == 3
    with pytest.raises(ValueError, match="encoder-decoder"):
        cat.run_cat(tiny("t5"), tmp_path / "t5", facts)


# ---------------------------------------------------------------- CAT vs causal tracing: agreement


def _hand_maps():
    """Two [facts, groups, layers] maps with ties, an empty group (NaN) and a constant fact."""
    rng = np.random.default_rng(7)
    a = rng.normal(size=(6, 6, 4)).round(1)  # rounding makes ties
    b = a + rng.normal(scale=0.8, size=a.shape).round(1)
    a[1, 1] = b[1, 1] = np.nan  # fact 1 has no middle subject token
    b[4, 2, 1] = np.nan  # a cell missing on one side only
    b[5] = 0.25  # constant: no rho
    return a, b


def test_spearman_of_maps_matches_scipy():
    from scipy.stats import spearmanr

    a, b = _hand_maps()
    rho = agreement.per_fact_spearman(a, b)
    for i in range(5):
        ok = np.isfinite(a[i]) & np.isfinite(b[i])
        assert ok.sum() == (24 - 4 if i == 1 else 24 - (i == 4))
        assert rho[i] == pytest.approx(spearmanr(a[i][ok], b[i][ok]).statistic, abs=1e-12)
    assert np.isnan(rho[5])  # constant map
    assert agreement.spearman([1, 2, 2, 3], [4, 1, 1, 0]) == pytest.approx(spearmanr([1, 2, 2, 3], [4, 1, 1, 0])[0])
    assert np.isnan(agreement.spearman([1, 2], [2, 1])) and np.isnan(agreement.spearman([1, np.nan, 3], [1, 2, 3]))
    result = agreement.agreement(a, b, resamples=50)
    assert (result.n_facts, result.n_defined) == (6, 5)
    assert result.per_fact_mean.value == pytest.approx(rho[:5].mean())
    mean_a, mean_b = agreement.mean_map(a), agreement.mean_map(b)
    assert np.isfinite(mean_a).all()  # the empty group of fact 1 is skipped, not NaN-propagated
    np.testing.assert_allclose(mean_a[1], a[[0, 2, 3, 4, 5], 1].mean(axis=0))
    assert result.averaged_map.value == pytest.approx(spearmanr(mean_a.ravel(), mean_b.ravel()).statistic)
    assert result.n_cells == 24
    np.testing.assert_allclose(cat.average_map(a)[0], mean_a.T)  # CAT's map is the same mean


def test_bootstrap_interval_contains_the_estimate_and_is_deterministic_with_the_seed():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6, 5))
    b = a + rng.normal(scale=1.5, size=a.shape)
    first = agreement.agreement(a, b, resamples=300, seed=3)
    assert first == agreement.agreement(a, b, resamples=300, seed=3)
    other = agreement.agreement(a, b, resamples=300, seed=4)
    assert other.per_fact_mean.value == first.per_fact_mean.value and other.per_fact_mean != first.per_fact_mean
    for stat in (first.per_fact_mean, first.averaged_map):
        assert stat.low < stat.value < stat.high and stat.high - stat.low < 0.5
    assert 0 < first.per_fact_mean.value < first.averaged_map.value  # averaging cancels the per-fact noise
    draws = agreement.bootstrap_draws(40, 300, 3)
    assert draws.shape == (300, 40) and draws.min() >= 0 and draws.max() < 40
    assert agreement.agreement(a, b, draws=draws) == first
    one = agreement.agreement(a[:1], b[:1], resamples=20).per_fact_mean  # one fact: every draw is that fact
    assert one.low == one.value == one.high == agreement.spearman(a[0], b[0])
    with pytest.raises(ValueError, match="resamples"):
        agreement.bootstrap_draws(4, 0)


def first_rho(a, b):
    return agreement.spearman(a[0], b[0])


def test_agreement_per_relation_and_normalized_maps():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 6, 3))
    b = a.copy()
    b[3:] = -a[3:]  # relation R2: reversed maps
    relations = ["R1", "R1", "R1", "R2", "R2"]
    groups = agreement.by_relation(a, b, relations, resamples=100)
    assert list(groups) == ["R1", "R2"]
    assert (groups["R1"].n_facts, groups["R2"].n_facts) == (3, 2)
    for relation, sign in (("R1", 1), ("R2", -1)):
        assert groups[relation].per_fact_mean.value == pytest.approx(sign)
        assert groups[relation].averaged_map.value == pytest.approx(sign)
    assert groups["R2"].per_fact_mean.low == pytest.approx(-1) == groups["R2"].per_fact_mean.high
    pairs = cat.agreements({"cat": a, "causal-tracing": b, "atp": b * 2}, relations, resamples=100)
    assert list(pairs) == ["cat_vs_tracing", "atp_vs_tracing", "cat_vs_atp"]
    assert pairs["atp_vs_tracing"]["overall"]["per_fact_mean"]["value"] == pytest.approx(1)
    assert pairs["cat_vs_tracing"]["by_relation"]["R2"]["averaged_map"]["value"] == pytest.approx(-1)
    assert pairs["cat_vs_tracing"]["by_relation"]["R1"]["n_facts"] == 3
    # normalised: every fact's largest |value| is 1, an all-zero map stays 0, NaN cells stay NaN
    maps = np.stack([a[0], np.zeros((6, 3)), a[1] * 100])
    maps[2, 1] = np.nan
    scaled = agreement.normalize_maps(maps)
    assert np.nanmax(np.abs(scaled), axis=(1, 2)).tolist() == [1.0, 0.0, 1.0]
    np.testing.assert_allclose(scaled[2], maps[2] / np.nanmax(np.abs(maps[2])))
    assert np.isnan(scaled[2, 1]).all()
    assert agreement.per_fact_spearman(scaled, maps)[[0, 2]].tolist() == pytest.approx([1, 1])


def test_cat_compared_with_causal_tracing_and_atp_writes_maps_and_agreement(tiny, tmp_path):
    m = tiny("llama")
    facts = [cat.Fact(PROMPT, "the big red house", "paris", "P1", fact_id="a"),
             cat.Fact("the cat was built in the city of", "the cat", "rome", "P1", fact_id="b"),
             cat.Fact("the tower is located in the", "the tower", "city", "P2", fact_id="c"),
             cat.Fact("a small dog is in the", "a small dog", "house", "P2", fact_id="d")]
    comparison = cat.Comparison(window=1, samples=3, resamples=40)
    summary = cat.run_cat(m, tmp_path, facts, known_only=False, limit=3, compare=comparison, show_progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert names >= {"cat_map.csv", "tracing_map.csv", "atp_map.csv", "compare_maps.png", "agreement.json",
                     "agreement_facts.csv", "fact_maps.npz", "cat_summary.json"}
    assert (tmp_path / "compare_maps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    traced = [cat.tokenize_fact(m.tokenizer, f) for f in cat.choose_false_objects(facts)][:3]
    # the tracing map is the mean of trace()'s scores grouped like CAT's, with ROME's corruption of the subject
    manual = []
    for t in traced:
        r = trace(m, t.fact.prompt, t.object_ids[0], t.subject, component="mlp", window=1, samples=3, seed=0)
        n = len(t.prompt_ids)
        manual.append(cat.group_scores(r.scores.T.astype(np.float64), cat.position_groups(n, t.subject)))
    rows = _rows(tmp_path / "tracing_map.csv")
    assert rows[0] == ["layer", "module", *cat.GROUPS] and [r[1] for r in rows[1:]] == ["mlp of layers 0-0",
                                                                                     "mlp of layers 1-1"]
    table = np.array([[float(v) if v else np.nan for v in r[2:]] for r in rows[1:]])
    np.testing.assert_allclose(table, np.nanmean(np.stack(manual), axis=0).T, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(summary.compared["causal-tracing"], table, rtol=1e-6, atol=1e-12)
    assert _rows(tmp_path / "atp_map.csv")[0] == ["layer", "module", *cat.GROUPS]
    # the AtP map comes from the registered method with the same corruption
    t = traced[0]
    ids = [*t.prompt_ids, t.object_ids[0]]
    out = m.attribute(t.fact.prompt, [ids], method="attribution_patching", attr_pos_end=len(ids),
                      method_args=comparison.patching_args(t.subject, 0), show_progress=False).sequences[0]
    first = cat.group_scores(out.target_attributions[: len(t.prompt_ids), 0].astype(np.float64),
                             cat.position_groups(len(t.prompt_ids), t.subject))
    per_fact = _dict_rows(tmp_path / "agreement_facts.csv")
    assert list(per_fact[0]) == ["fact_id", "relation", "n_prompt_tokens", "p_clean", "p_corrupted",
                                 "cat_vs_tracing", "atp_vs_tracing", "cat_vs_atp"]
    assert [(r["fact_id"], r["relation"]) for r in per_fact] == [("a", "P1"), ("b", "P1"), ("c", "P2")]
    assert float(per_fact[0]["atp_vs_tracing"]) == pytest.approx(agreement.spearman(first, manual[0]), abs=1e-5)
    doc = json.loads((tmp_path / "agreement.json").read_text())
    assert doc["n_facts"] == 3 and doc["relations"] == {"P1": 2, "P2": 1} and doc["normalize"] is False
    assert doc["causal_tracing"]["window"] == 1 and doc["causal_tracing"]["noise_samples"] == 3
    assert doc["bootstrap"]["resamples"] == 40
    overall = doc["comparisons"]["cat_vs_tracing"]["overall"]
    rhos = [float(r["cat_vs_tracing"]) for r in per_fact if r["cat_vs_tracing"]]
    assert overall["n_facts"] == 3 and overall["per_fact_mean"]["value"] == pytest.approx(np.mean(rhos), abs=1e-5)
    assert set(doc["comparisons"]["atp_vs_tracing"]["by_relation"]) == {"P1", "P2"}
    assert any("cat vs tracing: Spearman per fact" in line for line in summary.lines())
    saved = np.load(tmp_path / "fact_maps.npz")
    assert saved["tracing"].shape == (3, 6, 2) and saved["relation"].tolist() == ["P1", "P1", "P2"]
    np.testing.assert_allclose(saved["tracing"], np.stack(manual), rtol=1e-5, atol=1e-9)
    recomputed = agreement.agreement(saved["cat"], saved["tracing"], resamples=40)
    assert recomputed.as_dict() == overall
    # normalised: the same facts, each map divided by its largest |value| before averaging
    norm = cat.run_cat(m, tmp_path / "norm", facts, known_only=False, limit=3, normalize=True,
                       compare=cat.Comparison(methods=("causal-tracing",), window=1, samples=3, resamples=40),
                       show_progress=False)
    np.testing.assert_allclose(norm.compared["causal-tracing"],
                               cat.average_map(agreement.normalize_maps(np.stack(manual)))[0], rtol=1e-5, atol=1e-9)
    assert json.loads((tmp_path / "norm" / "cat_summary.json").read_text())["normalize"] is True
    assert not (tmp_path / "norm" / "atp_map.csv").exists()
    assert list(json.loads((tmp_path / "norm" / "agreement.json").read_text())["comparisons"]) == ["cat_vs_tracing"]
    with pytest.raises(ValueError, match="one or more of causal-tracing, atp"):
        cat.Comparison(methods=("rome",))
    with pytest.raises(ValueError, match="window"):
        cat.Comparison(window=0)
    with pytest.raises(ValueError, match="every decoder block's MLP"):
        cat.run_cat(m, tmp_path / "x", facts, layers=["model.layers.0.mlp"], compare=comparison)


def test_cli_cat_compare_on_a_tiny_llama(tiny_dir, tmp_path, capsys):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": f.prompt, "subject": f.subject, "target_true": f.true_object,
                                  "relation_id": f.relation} for f in _facts()]))
    model = tiny_dir("llama")
    capsys.readouterr()  # saving the tiny model reports progress
    base = ["case-study", "cat", "--model", model, "--facts", str(facts), "--all-facts", "--limit", "3", "--quiet"]
    code = main([*base, "--output", str(tmp_path / "out"), "--compare", "causal-tracing,atp", "--trace-window", "2",
                 "--trace-samples", "2", "--resamples", "30", "--normalize"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "cat vs tracing: Spearman per fact" in out.out and "atp vs tracing" in out.out and out.err == ""
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "cat_map.csv", "cat_map.png", "cat_facts.csv", "cat_summary.json", "cat_attributions.zarr", "tracing_map.csv",
        "atp_map.csv", "compare_maps.png", "agreement.json", "agreement_facts.csv", "fact_maps.npz"}
    doc = json.loads((tmp_path / "out" / "agreement.json").read_text())
    assert (doc["n_facts"], doc["normalize"], doc["bootstrap"]["resamples"]) == (3, True, 30)
    assert (doc["causal_tracing"]["component"], doc["causal_tracing"]["window"]) == ("mlp", 2)
    assert doc["atp"]["noise_samples"] == 2
    for name in ("cat_map.csv", "tracing_map.csv", "atp_map.csv"):
        rows = _rows(tmp_path / "out" / name)
        assert rows[0] == ["layer", "module", *cat.GROUPS] and len(rows) == 3
    for bad, message in ((["--compare", "causal-tracing,rome"], "--compare: 'rome'"),
                         (["--trace-samples", "3"], "--trace-samples needs --compare"),
                         (["--compare", "atp", "--trace-window", "0"], "--trace-window must be at least 1"),
                         (["--compare", "atp", "--trace-component", "head"], "--trace-component")):
        assert main([*base, "--output", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_kendall_matches_scipy():
    from scipy.stats import kendalltau

    x = [0.1, 0.5, np.nan, 0.3, 0.9, 0.2, 0.7, 0.7]
    y = [10.0, 40.0, 5.0, 35.0, 80.0, 12.0, 20.0, 60.0]
    t = gender_bias.kendall(x, y)
    ref = kendalltau([0.1, 0.5, 0.3, 0.9, 0.2, 0.7, 0.7], [10.0, 40.0, 35.0, 80.0, 12.0, 20.0, 60.0])
    assert (t.tau, t.p, t.n) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue), 7)
    assert gender_bias.kendall([1, 2, 3, 4], [2, 4, 6, 8]).tau == pytest.approx(1.0)
    assert np.isnan(gender_bias.kendall([1, np.nan], [1, 2]).tau)


def test_swap_pronoun_and_occupations_file(tmp_path):
    assert gender_bias.swap_pronoun("He is a doctor.", ("he", "she")) == ("he", "She is a doctor.")
    assert gender_bias.swap_pronoun("the shepherd said she", ("he", "she")) == ("she", "the shepherd said he")
    assert gender_bias.swap_pronoun("It is a doctor.", ("he", "she")) is None
    bad = tmp_path / "bad.tsv"
    bad.write_text("job\tshare\nnurse\t90\n")
    with pytest.raises(ValueError, match="missing column"):
        gender_bias.load_occupations(bad)
    with pytest.raises(FileNotFoundError, match="paper, winogender"):
        gender_bias.load_occupations(tmp_path / "nope.tsv")


def test_the_paper_49_occupations_are_the_default_and_winogender_60_an_option():
    paper = gender_bias.load_occupations()
    assert paper == gender_bias.load_occupations("paper")
    assert len(paper) == 49 and paper[0] == gender_bias.Occupation("technician", "technician", 40.34)
    assert {"consultant", "scientist", "physician", "doctor"} <= {o.slot for o in paper}  # the English terms
    turkish = gender_bias.load_occupations("paper", encoder_decoder=True)
    assert [o.label for o in turkish] == [o.label for o in paper] and [o.pct_female for o in turkish] == [
        o.pct_female for o in paper]
    assert turkish[0] == gender_bias.Occupation("teknisyen", "technician", 40.34)
    assert "bilim insanı" in {o.slot for o in turkish}  # multi-word: its first token is read
    assert gender_bias.load_occupations("paper", "turkish") == turkish
    winogender = gender_bias.load_occupations("winogender")
    assert len(winogender) == 60 and winogender[0] == gender_bias.Occupation("technician", "technician", 40.34)
    assert gender_bias.load_occupations("winogender", encoder_decoder=True) == winogender  # no Turkish column
    assert {o.slot for o in paper} - {o.slot for o in winogender} == {"consultant"}  # joined on "counselor"


def test_base_reference_is_the_distance_from_parity_and_the_paper_table_ships():
    assert gender_bias.distance_from_parity([90.0, 10.0, 50.0, 37.9]) == [40.0, 40.0, 0.0, pytest.approx(12.1)]
    paper = gender_bias.load_paper_table()
    assert len(paper) == 14
    assert paper[("probability", "y_pron", "gender_swap")] == ("-0.44", True)
    assert paper[("saliency", "x_occ", "base")] == ("0.25", True)
    assert paper[("saliency", "x_occ", "gender_swap")] == ("-0.00", False)
    assert paper[("integrated_gradients", "x_pron", "base")] == ("-0.08", False)
    assert paper[("input_x_gradient", "x_pron", "gender_swap")] == ("0.22", True)


class _NoOffsets:
    """A tokenizer that cannot return offsets (like a slow SentencePiece tokenizer)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, return_offsets_mapping=False, **kwargs):
        if return_offsets_mapping:
            raise NotImplementedError
        return self.tok(text, **kwargs)


@pytest.mark.parametrize("kind", ["llama", "marian"])  # BOS in front / EOS at the end
def test_char_span_tokens_with_and_without_offsets(tiny, kind):
    tok = tiny(kind).tokenizer
    text = "it is a big red house said she"
    ids = tok(text)["input_ids"]
    for word, (a, b) in (("big red house", (3, 6)), ("it", (0, 1)), ("she", (7, 8))):
        start = text.index(word)
        lead = 1 if kind == "llama" else 0
        expected = (a + lead, b + lead)
        assert char_span_tokens(tok, text, start, start + len(word), ids) == expected
        assert char_span_tokens(_NoOffsets(tok), text, start, start + len(word), ids) == expected


OCCUPATIONS = [gender_bias.Occupation(w, w, float(p)) for w, p in
               (("cat", 10), ("dog", 75), ("big house", 30), ("tower", 5), ("city", 60), ("paris", 90))]


def test_gender_bias_base_uses_distance_from_parity_and_swap_the_he_she_pair_difference(tiny, tmp_path):
    m = tiny("gpt2")
    s = gender_bias.run_gender_bias(m, tmp_path, occupations=OCCUPATIONS, template="the {occupation} said that",
                                    method_args={"integrated_gradients": {"n_steps": 4}}, show_progress=False)
    assert s.n_occupations == 6 and sum(s.base_counts.values()) == 6 and s.n_without_pronoun == 0
    assert [r[0] for r in s.rows] == ["p(y_pron)", "∇ x_occ", "IG x_occ", "I×G x_occ"]
    rows = _dict_rows(s.files["occupations_csv"])
    p_he, p_she = (np.array([float(r[f"p_{p}"]) for r in rows]) for p in ("he", "she"))
    for r, he, she in zip(rows, p_he, p_she, strict=True):  # base = the more probable pronoun
        assert r["base_pronoun"] == ("he" if he > she else "she")
        with torch.no_grad():
            ids = m.tokenizer(f"the {r['occupation']} said that", return_tensors="pt")["input_ids"]
            probs = m.model(ids).logits[0, -1].softmax(-1)
        assert he == pytest.approx(float(probs[m.tokenizer.convert_tokens_to_ids("he")]), rel=1e-4)
    pct = [o.pct_female for o in OCCUPATIONS]
    parity = [abs(p - 50) for p in pct]
    base_p = [max(a, b) for a, b in zip(p_he, p_she, strict=True)]
    assert s.rows[0][1] == gender_bias.kendall(base_p, parity) != gender_bias.kendall(base_p, pct)
    assert [float(r["p_swap"]) for r in rows] == pytest.approx(p_he - p_she, rel=1e-5, abs=1e-9)
    assert s.rows[0][2] == gender_bias.kendall(p_he - p_she, pct)
    assert [r["occupation_first_token"] for r in rows] == ["cat", "dog", "big", "tower", "city", "paris"]
    for k, method in enumerate(gender_bias.METHODS, start=1):
        he_results, she_results = (_stored(s.files[f"results_gender_{method}_{p}"]) for p in ("he", "she"))
        base, swap = [], []
        for r, he, she in zip(rows, he_results, she_results, strict=True):
            he, she = he.aggregate(), she.aggregate()  # Inseq's display normalisation, then the pair difference
            diff = pair_difference(he, she, same_tokens=False)
            paper_code = she.aggregate("pair", paired_attr=he)  # the paper's appendix: She paired with He
            np.testing.assert_array_equal(paper_code.target_attributions, diff.target_attributions)
            # row 1 = the occupation's first token ("big" of "big house"), column 0 = the pronoun
            assert float(r[f"{method}_x_occ_he"]) == pytest.approx(float(he.target_attributions[1, 0]), rel=1e-5)
            assert float(r[f"{method}_x_occ_swap"]) == pytest.approx(float(diff.target_attributions[1, 0]),
                                                                    rel=1e-5, abs=1e-7)
            base.append(float(r[f"{method}_x_occ_{r['base_pronoun']}"]))
            swap.append(float(r[f"{method}_x_occ_swap"]))
            if r["occupation"] == "big house":  # the first token, not the occupation's two tokens together
                assert float(he.target_attributions[1, 0]) != pytest.approx(
                    float(he.target_attributions[1:3, 0].sum()), rel=1e-3)
        assert s.rows[k][1] == gender_bias.kendall(base, parity) and s.rows[k][2] == gender_bias.kendall(swap, pct)
    share = dict(s.fixed)["p(she) / (p(he) + p(she))"]
    assert share == gender_bias.kendall(p_she / (p_he + p_she), pct)
    table = s.files["table_md"].read_text()
    assert "| ∇ x_occ |" in table and "GenderSwap" in table and "| paper Base |" in table
    stored = _stored(s.files["results_gender_saliency_she"])
    assert len(stored) == 6 and stored[0].generated_tokens == ("she",)


def test_table_3_2_csv_has_the_paper_cells_with_the_paper_values_and_the_model(tiny, tmp_path):
    m = tiny("gpt2")
    s = gender_bias.run_gender_bias(m, tmp_path, occupations=OCCUPATIONS, template="the {occupation} said that",
                                    method_args={"integrated_gradients": {"n_steps": 2}}, show_progress=False)
    rows = _dict_rows(s.files["table_3_2_csv"])
    assert tuple(_rows(s.files["table_3_2_csv"])[0]) == gender_bias.TABLE_COLUMNS == (
        "model", "occupations", "measure", "method", "token", "case", "reference", "tau", "p_value", "significant",
        "n", "paper_tau", "paper_significant", "ig_delta_max", "ig_delta_mean", "ig_n_steps_max", "ig_not_converged")
    assert [(r["measure"], r["token"], r["case"]) for r in rows] == [
        ("p(y_pron)", "y_pron", "base"), ("p(y_pron)", "y_pron", "gender_swap")] + [
        (label, token, case) for label in ("∇", "IG", "I×G") for token in ("x_pron", "x_occ")
        for case in ("base", "gender_swap")]
    assert {r["model"] for r in rows} == {s.model} == {"GPT2LMHeadModel"}
    assert {r["occupations"] for r in rows} == {"given"}
    paper = gender_bias.load_paper_table()
    for r in rows:
        assert (r["paper_tau"], r["paper_significant"] == "*") == paper[(r["method"], r["token"], r["case"])]
        assert r["reference"] == ("|bls_pct_female - 50|" if r["case"] == "base" else "bls_pct_female")
        if r["token"] == "x_pron":  # decoder-only: no source pronoun, so no value of ours
            assert (r["tau"], r["p_value"], r["n"]) == ("", "", "0")
        else:
            assert r["n"] == "6" and r["significant"] == ("*" if float(r["p_value"]) < 0.05 else "")
        ig = r["method"] == "integrated_gradients"
        assert (r["ig_delta_max"] != "") == ig and (r["ig_n_steps_max"] != "") == ig
    by_cell = {(c.method, c.token, c.case): c.tau for c in s.cells}
    assert by_cell[("probability", "y_pron", "base")] == s.rows[0][1]
    assert float(rows[1]["tau"]) == pytest.approx(s.rows[0][2].tau, rel=1e-5)
    conv = s.convergence["integrated_gradients"]
    ig_row = next(r for r in rows if r["method"] == "integrated_gradients")
    assert float(ig_row["ig_delta_max"]) == pytest.approx(max(c.delta_max for c in conv.values()), rel=1e-5)
    summary = json.loads(s.files["summary"].read_text())
    assert summary["model"] == "GPT2LMHeadModel" and summary["model_info"]["model_class"] == "GPT2LMHeadModel"
    assert len(summary["table_3_2"]) == 14 and summary["gender_swap"] == "he - she"
    assert summary["convergence"]["integrated_gradients"]["she"]["delta_max"] == pytest.approx(conv["she"].delta_max)
    assert summary["convergence"]["integrated_gradients"]["he"]["examples"] == 6


def test_integrated_gradients_doubles_n_steps_until_every_delta_is_below_the_threshold(tiny):
    m = tiny("marian")
    inputs = ["it is a cat", "it is a big red house", "it is a dog"]
    targets = ["she is a cat", "he is a big red house", "she is a dog"]

    def max_delta(n: int, i: int) -> float:
        seq = m.attribute([inputs[i]], [targets[i]], method="integrated_gradients", n_steps=n, show_progress=False)[0]
        return float(np.abs(seq.deltas).max())

    assert all(max_delta(1, i) >= 0.05 for i in range(3))  # the tiny model starts above the paper's threshold
    out, conv = gender_bias.attribute_until_converged(m, inputs, targets, "integrated_gradients", {"n_steps": 1},
                                                      show_progress=False)
    assert conv.not_converged == 0 and conv.n_steps == tuple(out.info["n_steps_per_example"])
    assert max(conv.n_steps) >= 4 and len(set(conv.n_steps)) > 1  # per example
    for i, (seq, n) in enumerate(zip(out, conv.n_steps, strict=True)):
        assert float(np.abs(seq.deltas).max()) < 0.05 <= max_delta(n // 2, i)  # the first n_steps that converged
        assert conv.example_delta[i] == pytest.approx(float(np.abs(seq.deltas).max()))
    every = np.concatenate([np.abs(seq.deltas) for seq in out])
    assert (conv.delta_max, conv.delta_mean) == (pytest.approx(every.max()), pytest.approx(every.mean()))
    # the cap: examples still above the threshold keep their last result and are counted
    capped, at_cap = gender_bias.attribute_until_converged(m, inputs, targets, "integrated_gradients",
                                                           {"n_steps": 1}, max_n_steps=2, show_progress=False)
    assert at_cap.n_steps == (2, 2, 2) and at_cap.not_converged == 3 and at_cap.delta_max >= 0.05
    assert at_cap.as_dict()["n_steps_counts"] == {"2": 3}
    with pytest.raises(ValueError, match="max_n_steps"):
        gender_bias.attribute_until_converged(m, inputs, targets, "integrated_gradients", {"n_steps": 8},
                                              max_n_steps=4, show_progress=False)
    assert gender_bias.reports_deltas("integrated_gradients")
    assert not gender_bias.reports_deltas("integrated_gradients", {"return_convergence_delta": False})
    assert not gender_bias.reports_deltas("saliency")


def test_gender_bias_translation_path(tiny, tmp_path):
    m = tiny("marian")
    translations = [("he is a " if i % 2 else "she is a ") + o.slot for i, o in enumerate(OCCUPATIONS)]
    translations[0] = "it is a cat"  # no pronoun: left out
    s = gender_bias.run_gender_bias(m, tmp_path / "given", occupations=OCCUPATIONS, template="it is a {occupation}",
                                    source_pronoun="it", translations=translations,
                                    method_args={"integrated_gradients": {"n_steps": 1}}, show_progress=False)
    assert s.encoder_decoder and s.base_counts == {"he": 3, "she": 2} and s.n_without_pronoun == 1
    assert [r[0] for r in s.rows] == ["p(y_pron)", "∇ x_pron", "∇ x_occ", "IG x_pron", "IG x_occ", "I×G x_pron",
                                      "I×G x_occ"]
    assert all(t.n == 5 for _, b, w in s.rows for t in (b, w))
    rows = _dict_rows(s.files["occupations_csv"])
    assert rows[1]["text_she"] == "she is a dog" and rows[1]["text_he"] == "he is a dog"
    assert rows[2]["occupation_first_token"] == "big" and rows[0]["p_swap"] == ""
    for method in ("saliency", "input_x_gradient"):
        # the stores hold the 5 occupations with a pronoun: their first one is "dog"
        he, she = (_stored(s.files[f"results_gender_{method}_{p}"])[0].aggregate() for p in ("he", "she"))
        assert np.nansum(she.source_attributions[:, 0]) == pytest.approx(1.0, rel=1e-5)  # shares over the source
        diff = pair_difference(he, she, same_tokens=False)
        # source rows: "it" (0) is x_pron, "dog" (3) x_occ; column 0 is the pronoun
        assert float(rows[1][f"{method}_x_pron_swap"]) == pytest.approx(float(diff.source_attributions[0, 0]),
                                                                       rel=1e-5, abs=1e-7)
        assert float(rows[1][f"{method}_x_occ_swap"]) == pytest.approx(float(diff.source_attributions[3, 0]),
                                                                      rel=1e-5, abs=1e-7)
        assert float(rows[1][f"{method}_x_occ_she"]) == pytest.approx(float(she.source_attributions[3, 0]), rel=1e-5)
    # integrated gradients ran until converged: this tiny model needs more than one step
    conv = s.convergence["integrated_gradients"]
    assert all(c.not_converged == 0 and c.delta_max < 0.05 for c in conv.values())
    assert max(max(c.n_steps) for c in conv.values()) > 1
    assert {r["integrated_gradients_n_steps_he"] for r in rows[1:]} - {""} and rows[0][
        "integrated_gradients_n_steps_he"] == ""
    table = _dict_rows(s.files["table_3_2_csv"])
    ig = [r for r in table if r["method"] == "integrated_gradients"]
    assert len(ig) == 4 and all(float(r["ig_delta_max"]) < 0.05 and r["ig_not_converged"] == "0" for r in ig)
    # without given translations the model translates; the tiny random model writes no pronoun
    s = gender_bias.run_gender_bias(m, tmp_path / "generated", occupations=OCCUPATIONS[:3],
                                    template="it is a {occupation}", methods=["saliency"], max_new_tokens=4,
                                    show_progress=False)
    assert s.n_without_pronoun + sum(s.base_counts.values()) == 3


def test_gender_bias_named_occupation_set_and_limit(tiny, tmp_path):
    s = gender_bias.run_gender_bias(tiny("gpt2"), tmp_path, occupations="winogender", limit=3, methods=["saliency"],
                                    show_progress=False)
    assert s.n_occupations == 3 and s.occupation_set == "winogender (first 3)"
    assert [r["occupation"] for r in _dict_rows(s.files["occupations_csv"])] == [
        "technician", "accountant", "supervisor"]
    assert s.template == "The {occupation} said that"


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return tiny_dir("gpt2")


def test_cli_case_studies(model_dir, tmp_path, capsys):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": f.prompt, "subject": f.subject, "target_true": f.true_object,
                                  "relation_id": f.relation} for f in _facts()]))
    code = main(["case-study", "cat", "--model", model_dir, "--facts", str(facts), "--output", str(tmp_path / "cat"),
                 "--all-facts", "--limit", "3", "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "3 statements traced" in out.out and out.err == ""
    assert {p.name for p in (tmp_path / "cat").iterdir()} == {
        "cat_map.csv", "cat_map.png", "cat_facts.csv", "cat_summary.json", "cat_attributions.zarr"}
    occupations = tmp_path / "occ.tsv"
    occupations.write_text("occupation\tbls_pct_female\n" + "".join(f"{o.slot}\t{o.pct_female}\n"
                                                                   for o in OCCUPATIONS))
    code = main(["case-study", "gender-bias", "--model", model_dir, "--occupations", str(occupations), "--template",
                 "the {occupation} said that", "--n-steps", "2", "--max-n-steps", "8", "--delta-threshold", "0.001",
                 "--output", str(tmp_path / "gb"), "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "| IG x_occ |" in out.out and (tmp_path / "gb" / "gender_bias_table.md").read_text() == out.out
    assert {p.name for p in (tmp_path / "gb").iterdir()} >= {
        "table_3_2.csv", "gender_bias_table.md", "gender_bias_summary.json", "gender_bias_occupations.csv"}
    summary = json.loads((tmp_path / "gb" / "gender_bias_summary.json").read_text())
    runs = summary["convergence"]["integrated_gradients"]
    assert {r["threshold"] for r in runs.values()} == {0.001} and {r["max_n_steps"] for r in runs.values()} == {8}
    assert summary["model"] == model_dir and summary["occupations"] == str(occupations)  # the model as loaded
    code = main(["case-study", "gender-bias", "--model", model_dir, "--occupations", "winogender", "--limit", "2",
                 "--methods", "saliency", "--output", str(tmp_path / "gb60"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    rows = _dict_rows(tmp_path / "gb60" / "table_3_2.csv")
    assert {r["occupations"] for r in rows} == {"winogender (first 2)"} and {r["model"] for r in rows} == {model_dir}
    capsys.readouterr()
    assert main(["case-study", "gender-bias", "--n-steps", "32", "--max-n-steps", "16", "--output",
                 str(tmp_path / "z")]) == 2
    assert "--max-n-steps" in capsys.readouterr().err
    assert main(["case-study", "cat", "--model", model_dir, "--facts", str(tmp_path / "nope.json"), "--output",
                 str(tmp_path / "x")]) == 2
    assert "facts file not found" in capsys.readouterr().err
    assert main(["case-study", "gender-bias", "--methods", "nonsense", "--output", str(tmp_path / "y")]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["case-study"]) == 2


@pytest.mark.slow
def test_case_studies_on_the_embedded_model(tmp_path, capsys):
    code = main(["case-study", "cat", "--output", str(tmp_path / "cat"), "--limit", "4", "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads((tmp_path / "cat" / "cat_summary.json").read_text())
    assert summary["counts"]["traced"] == 4 and len(summary["map"]) == 30 and len(summary["map"][0]) == 6
    rows = _dict_rows(tmp_path / "cat" / "cat_facts.csv")
    assert all(float(r["p_true"]) > float(r["p_false"]) for r in rows)  # known facts: the true token is the argmax
    occupations = tmp_path / "occ.tsv"
    occupations.write_text("occupation\tbls_pct_female\nnurse\t90.0\nengineer\t10.7\nteacher\t73.0\n"
                           "carpenter\t1.8\n")
    code = main(["case-study", "gender-bias", "--occupations", str(occupations), "--n-steps", "8", "--output",
                 str(tmp_path / "gb"), "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert {r["model"] for r in _dict_rows(tmp_path / "gb" / "table_3_2.csv")} == {"smollm2-135m"}
    rows = _dict_rows(tmp_path / "gb" / "gender_bias_occupations.csv")
    model = distattr.load_model("smollm2-135m")
    tok = model.tokenizer
    for r in rows:
        with torch.no_grad():
            ids = tok(f"The {r['occupation']} said that", return_tensors="pt")["input_ids"]
            probs = model.model(ids).logits[0, -1].softmax(-1)
        for p in ("he", "she"):
            assert float(r[f"p_{p}"]) == pytest.approx(float(probs[tok.convert_tokens_to_ids(f"Ġ{p}")]), rel=1e-3)


def _stored(path) -> list:
    """The sequences of a case study's result store, in input order."""
    store = distattr.open_store(str(path))
    assert store.complete
    return [out.sequences[0] for out in store]
