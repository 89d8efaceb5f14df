"""The survey and the dispatch of a dataset job: fingerprint, per-unit check between the two passes, examples
longer than the model's context; data read from fsspec URLs and DatasetDicts; the model identity."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

from distattr.jobs.data import DataError, Fields, Record, Rows, record_digest, records
from distattr.jobs.plan import PlanConfig, Size, checked_units, plan_units, sizer, survey
from distattr.models.identity import model_identity
from distattr.models.loading import context_length as model_context

WORDS = ("the", "cat", "is", "in", "house", "and", "dog", "was", "on", "a", "big", "red", "tower", "paris")
FIELDS = Fields(text="prompt", id="uid")
CFG = PlanConfig(unit_size=4, window=2, split_steps=None)


def example_rows(n: int) -> list[dict]:
    return [{"prompt": " ".join(WORDS[i % 5 : i % 5 + 1 + i % 7]), "uid": f"ex-{i}", "topic": i % 3} for i in range(n)]


def word_size(record: Record) -> Size:
    """Token counts without a tokenizer: one token per word, two generated."""
    n = len(record.text.split())
    return Size(n, n + 2, 2)


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dispatch(source, info, fields: Fields = FIELDS) -> tuple[list, BaseException | None]:
    """The units ``checked_units`` let through before it raised (or all of them), and what it raised."""
    passed = []
    try:
        for unit in checked_units(plan_units(records(Rows(source), fields), word_size, CFG), info):
            passed.append(unit)
    except DataError as err:
        return passed, err
    return passed, None


# ---------------------------------------------------------------- fingerprint and per-unit check


def test_fingerprint_covers_kept_fields_and_positions():
    rows = example_rows(6)
    fields = Fields(text="prompt", id="uid", keep=("topic",))
    base = survey(records(Rows(rows), fields), word_size, CFG).fingerprint
    assert survey(records(Rows(rows), fields), word_size, CFG).fingerprint == base
    changed = [dict(r) for r in rows]
    changed[3]["topic"] = 99
    assert survey(records(Rows(changed), fields), word_size, CFG).fingerprint != base
    one = Record(index=0, id="a", text="the cat", meta=(("topic", "1"),))
    assert record_digest(one) != record_digest(Record(index=1, id="a", text="the cat", meta=(("topic", "1"),)))


def test_survey_records_a_digest_and_the_parts_of_every_unit():
    cfg = PlanConfig(unit_size=4, window=2, split_steps=2)
    rows = example_rows(10)

    def size(record: Record) -> Size:  # row 4 has 7 steps: split into 4 parts of 2
        return Size(2, 9, 7) if record.index == 4 else word_size(record)

    info = survey(records(Rows(rows), FIELDS), size, cfg)
    units = list(plan_units(records(Rows(rows), FIELDS), size, cfg))
    assert info.n_units == len(units) == len(info.unit_digests) == len(info.unit_parts)
    assert info.unit_parts.dtype == np.uint32 and info.unit_digests.dtype == np.uint64
    assert info.unit_parts.tolist() == [u.n_parts for u in units]
    assert 4 in info.unit_parts.tolist()  # ceil(7 / 2): the split example
    assert info.n_split == 1
    assert len(set(info.unit_digests.tolist())) == info.n_units
    with pytest.raises(ValueError):
        info.unit_parts[0] = 2  # read-only


def test_unchanged_data_passes_every_unit_unchanged(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", example_rows(21))
    info = survey(records(Rows(path), FIELDS), word_size, CFG)
    passed, err = dispatch(path, info)
    assert err is None
    assert passed == list(plan_units(records(Rows(path), FIELDS), word_size, CFG))
    assert len(passed) == info.n_units == 6


def _edit_text(rows):
    rows[13]["prompt"] = rows[13]["prompt"] + " red"
    return rows


def _append(rows):
    return rows + [{"prompt": "the big tower", "uid": "ex-new", "topic": 0}]


def _swap(rows):
    rows[9], rows[10] = rows[10], rows[9]
    return rows


@pytest.mark.parametrize("edit, changed_rows", [(_edit_text, {13}), (_append, {20}), (_swap, {9, 10})])
def test_file_edited_between_survey_and_dispatch_stops_before_the_changed_unit(tmp_path, edit, changed_rows):
    rows = example_rows(20)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    info = survey(records(Rows(path), FIELDS), word_size, CFG)
    surveyed = list(plan_units(records(Rows(path), FIELDS), word_size, CFG))
    write_jsonl(path, edit([dict(r) for r in rows]))
    passed, err = dispatch(path, info)
    assert err is not None
    message = str(err)
    assert "\n" not in message
    assert message.startswith("the data changed between the survey and the dispatch (unit ")
    assert "Do not edit the data while a job reads it" in message
    # the units that went through are the survey's own (earlier windows, and units of the changed window that
    # kept their examples); the one holding a changed row did not go through
    assert passed == surveyed[: len(passed)]
    first_window = min(changed_rows) // (CFG.window * CFG.unit_size)
    assert first_window * CFG.window <= len(passed) < info.n_units
    assert not changed_rows & {r.index for u in passed for r in u.records}


def test_list_that_changes_order_is_refused_at_the_first_unit():
    rows = example_rows(12)
    info = survey(records(Rows(rows), FIELDS), word_size, CFG)
    passed, err = dispatch(rows[::-1], info)
    assert passed == [] and "(unit 0, " in str(err)


def test_dispatch_with_fewer_units_than_the_survey_is_refused(tmp_path):
    rows = example_rows(20)
    info = survey(records(Rows(rows), FIELDS), word_size, CFG)
    passed, err = dispatch(rows[:8], info)
    assert len(passed) == 2
    assert "the dispatch ended after 2 of the survey's 5 units" in str(err)


# ---------------------------------------------------------------- examples longer than the model's context


def long_rows(lengths: list[int]) -> list[dict]:
    return [{"prompt": " ".join(["the"] * n), "uid": f"q-{i}"} for i, n in enumerate(lengths)]


def test_model_context_of_the_tiny_configs():
    from tiny import _config

    assert {k: model_context(_config(k)) for k in ("gpt2", "llama", "t5", "bart", "marian")} == \
        {"gpt2": 128, "llama": 128, "t5": None, "bart": 128, "marian": 128}


def test_decoder_examples_longer_than_the_context_are_named_in_one_error():
    from tiny import tiny_model

    model, tok = tiny_model("gpt2")
    size = sizer(tok, False, True, 8, model_context(model.config))
    fits = long_rows([120, 3])  # 120 prompt + 8 generated = 128: exactly the context
    assert survey(records(Rows(fits), FIELDS), size, CFG).max_target == 128
    rows = long_rows([3, 121, 5, 200, 130, 140, 150, 160, 170])
    with pytest.raises(DataError) as err:
        survey(records(Rows(rows), FIELDS), size, CFG)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("7 examples are longer than the model's context of 128 tokens (row 1 id 'q-1': "
                              "121 prompt + 8 generated; row 3 id 'q-3': 200 prompt + 8 generated;")
    assert "row 6 id 'q-6'" in message and "row 7 id" not in message and "; ...)" in message
    assert message.endswith("drop or shorten them, or lower --max-new-tokens")
    unlimited = sizer(tok, False, True, 8)
    assert survey(records(Rows(rows), FIELDS), unlimited, CFG).max_target == 208


def test_llama_target_longer_than_the_context():
    from tiny import tiny_model

    model, tok = tiny_model("llama")
    size = sizer(tok, False, True, None, model_context(model.config))
    rows = [{"prompt": "the cat", "target": "the cat " + "dog " * 130, "uid": "t"}]
    with pytest.raises(DataError, match=r"^1 example is longer than the model's context of 128 tokens \(row 0 id "
                                        r"'t': 3 prompt \+ 130 target\): drop or shorten it$"):
        survey(records(Rows(rows), Fields(text="prompt", target="target", id="uid")), size, CFG)


@pytest.mark.parametrize("kind", ["bart", "marian"])
def test_encoder_decoder_source_longer_than_the_context(kind):
    from tiny import tiny_model

    model, tok = tiny_model(kind)
    size = sizer(tok, True, True, 4, model_context(model.config))
    with pytest.raises(DataError, match=r"1 example is longer than the model's context of 128 tokens \(row 1 id "
                                        r"'q-1': 201 source, 13 generated\)"):
        survey(records(Rows(long_rows([5, 200])), FIELDS), size, CFG)


def test_t5_has_no_fixed_context():
    from tiny import tiny_model

    model, tok = tiny_model("t5")
    size = sizer(tok, True, True, 4, model_context(model.config))
    assert survey(records(Rows(long_rows([5, 600])), FIELDS), size, CFG).max_source == 601


# ---------------------------------------------------------------- data from URLs and DatasetDicts


def test_memory_urls_in_every_streamed_format():
    import fsspec
    import pandas as pd

    rows = example_rows(9)
    fs = fsspec.filesystem("memory")
    fs.pipe("/survey/d.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    fs.pipe("/survey/d.json", json.dumps(rows).encode())
    fs.pipe("/survey/d.csv", pd.DataFrame(rows).to_csv(index=False).encode())
    fs.pipe("/survey/d.parquet", pd.DataFrame(rows).to_parquet())
    fields = Fields(text="prompt", id="uid", keep=("topic",))
    expected = [(r.id, r.text) for r in records(Rows(rows), fields)]
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet"):
        assert [(r.id, r.text) for r in records(Rows(f"memory://survey/{name}"), fields)] == expected, name
    with pytest.raises(DataError, match="^data not found: memory://survey/nope.jsonl$"):
        Rows("memory://survey/nope.jsonl")


def test_file_url(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", example_rows(3))
    assert list(Rows(f"file://{path}")) == list(Rows(path))


def test_dataset_dict_needs_a_split(tmp_path):
    import datasets

    train, test = example_rows(5), example_rows(8)[5:]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)})
    dd.save_to_disk(str(tmp_path / "dd"))
    dd.save_to_disk("memory://survey-dd")  # a folder at a URL (datasets copies it to a temporary folder)
    for source in (tmp_path / "dd", "memory://survey-dd", dd):
        with pytest.raises(DataError, match="is a DatasetDict with splits train, test: choose one with --split$"):
            Rows(source)
        with pytest.raises(DataError, match="has no split 'dev': it is a DatasetDict with splits train, test"):
            Rows(source, split="dev")
        assert [r["uid"] for r in Rows(source, split="test")] == ["ex-5", "ex-6", "ex-7"]
        assert [r["uid"] for r in Rows(source, split="train")] == [r["uid"] for r in train]
    with pytest.raises(DataError, match="applies only to a DatasetDict"):
        Rows(train, split="train")


def test_jsonl_and_parquet_on_s3(s3_server):
    import pandas as pd
    import s3fs

    rows = example_rows(30)
    fs = s3fs.S3FileSystem(**s3_server, skip_instance_cache=True)
    fs.pipe("distattr-test/data/d.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    fs.pipe("distattr-test/data/d.parquet", pd.DataFrame(rows).to_parquet(row_group_size=8))
    for name in ("d.jsonl", "d.parquet"):
        got = list(records(Rows(f"s3://distattr-test/data/{name}", storage_options=s3_server), FIELDS))
        assert [(r.id, r.text) for r in got] == [(r["uid"], r["prompt"]) for r in rows], name
    with pytest.raises(DataError, match="^data not found: s3://distattr-test/data/nope.jsonl$"):
        Rows("s3://distattr-test/data/nope.jsonl", storage_options=s3_server)


def test_s3_jsonl_is_streamed_not_downloaded_first(s3_server, monkeypatch):
    import s3fs

    rows = [{"prompt": "the cat " * 200, "uid": f"ex-{i}"} for i in range(3000)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    s3fs.S3FileSystem(**s3_server, skip_instance_cache=True).pipe("distattr-test/big.jsonl", body)
    fetched = []
    real_fetch = s3fs.core.S3File._fetch_range

    def counting_fetch(self, start, end):
        data = real_fetch(self, start, end)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting_fetch)
    source = Rows("s3://distattr-test/big.jsonl", storage_options={**s3_server, "default_block_size": 64 << 10})
    stream = iter(source)
    assert next(stream)["uid"] == "ex-0"
    stream.close()
    assert len(body) > 4_000_000 and 0 < sum(fetched) <= 128 << 10
    fetched.clear()
    assert sum(1 for _ in source) == 3000  # the counter sees a whole read
    assert sum(fetched) == len(body)


# ---------------------------------------------------------------- model identity


def save_gpt2(folder, seed: int | None = None):
    """The tiny GPT-2 and its tokenizer in ``folder``; with ``seed``: the same config, freshly initialised."""
    from tiny import tiny_model

    model, tok = tiny_model("gpt2")
    if seed is not None:
        torch.manual_seed(seed)
        model = type(model)(model.config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp("gpt2"))


def test_identity_is_the_same_for_a_copy_and_differs_for_other_weights(gpt2_folder, tmp_path):
    first = model_identity(str(gpt2_folder))
    assert first["source"] == "folder" and len(first["weights"]) == len(first["tokenizer"]) == 16
    copy = shutil.copytree(gpt2_folder, tmp_path / "elsewhere")
    assert model_identity(str(copy)) == first
    seeds = [model_identity(str(save_gpt2(tmp_path / f"seed{s}", seed=s))) for s in (1, 2)]
    assert len({first["weights"], *(s["weights"] for s in seeds)}) == 3
    assert {s["tokenizer"] for s in seeds} == {first["tokenizer"]}


def test_identity_samples_the_start_of_every_tensor(gpt2_folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from distattr.models import identity

    # samples smaller than the tiny file, so that only the per-tensor samples can see a tensor in the middle
    monkeypatch.setattr(identity, "EDGE_BYTES", 64)
    monkeypatch.setattr(identity, "TENSOR_BYTES", 16)
    name = "transformer.h.1.mlp.c_fc.weight"
    original = model_identity(str(gpt2_folder))["weights"]
    state = load_file(gpt2_folder / "model.safetensors")
    tuned, edited = dict(state), dict(state)
    tuned[name] = state[name] + 0.01  # a fine-tuned tensor: every value changes
    edited[name] = state[name].clone()
    edited[name][-1, -1] += 0.01  # one value past the tensor's sampled start: a sample does not see it
    seen = {}
    for label, weights in (("tuned", tuned), ("edited", edited)):
        copy = shutil.copytree(gpt2_folder, tmp_path / label)
        save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
        seen[label] = model_identity(str(copy))["weights"]
    assert seen["tuned"] != original
    assert seen["edited"] == original


def test_changed_tokenizer_file_changes_only_the_tokenizer_identity(gpt2_folder, tmp_path):
    copy = shutil.copytree(gpt2_folder, tmp_path / "tok")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    before, after = model_identity(str(gpt2_folder)), model_identity(str(copy))
    assert after["tokenizer"] != before["tokenizer"] and after["weights"] == before["weights"]


def test_hub_id_is_resolved_from_the_local_cache_only(gpt2_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(gpt2_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = model_identity(str(gpt2_folder))
    want = {"source": "hub", "repo": "org/tiny", "commit": commit, "weights": folder["weights"],
            "tokenizer": folder["tokenizer"]}
    assert model_identity("org/tiny") == want
    assert model_identity("org/tiny", revision=commit) == want
    assert model_identity("org/tiny", revision="v2")["commit"] is None
    assert model_identity("org/other") == {"source": "hub", "repo": "org/other", "commit": None, "weights": None,
                                           "tokenizer": None}


def test_petals_spec_is_its_local_parts_and_dht_prefix(gpt2_folder):
    spec = f"petals://{gpt2_folder}?initial_peers=/ip4/127.0.0.1/tcp/31337/p2p/QmPeer&dht_prefix=tiny-swarm"
    folder = model_identity(str(gpt2_folder))
    assert model_identity(spec) == {**folder, "source": "petals", "parts": "folder", "dht_prefix": "tiny-swarm"}


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        model_identity(str(tmp_path / "nope" / "model"))


@pytest.mark.slow
def test_embedded_model_identity_is_cheap():
    from distattr.models.loading import resolve_folder

    folder = resolve_folder("smollm2-135m")[0]  # converts the GGUF on first use (about 20 s), as loading does
    started = time.perf_counter()
    identity = model_identity("smollm2-135m")
    elapsed = time.perf_counter() - started
    assert identity == {**model_identity(folder), "source": "embedded"}
    assert identity["weights"] and identity["tokenizer"]
    assert elapsed < 2.0, f"model_identity took {elapsed:.2f} s"
