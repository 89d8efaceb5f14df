"""Safe defaults (issue 13): one-shot data refused, load arguments made JSON or refused, Inseq's aggregator names,
infinities in result files, atomic saves that do not overwrite by default, model objects given back as they were,
and concurrent conversions of the embedded model's weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import distattr
import distattr.jobs
import distattr.jobs.runner
from distattr.aggregate import InseqPair, Slice, Spans, Words, named_aggregation
from distattr.jobs import DataError
from distattr.models import embedded
from distattr.models.loading import portable_load_args, quantization_from_json
from distattr.results import AttributionOutput, SequenceAttribution

ROWS = [{"prompt": "a b"}, {"prompt": "c d"}]


@pytest.fixture
def no_job(monkeypatch):
    """Fail the test if attribute_dataset gets as far as the job (Ray, the store)."""

    def fail(*args, **kwargs):
        raise AssertionError("the job started: the check must come first")

    monkeypatch.setattr(distattr.jobs, "run_job", fail)
    monkeypatch.setattr(distattr.jobs.runner, "connect", fail)


# --------------------------------------------------------------------------------------------- one-shot data


def test_generator_data_is_refused_before_the_job(no_job, tmp_path):
    with pytest.raises(DataError, match=r"data is a generator, which can be read only once; the job reads the data "
                                        r"twice \(a survey, then the dispatch\): pass a list"):
        distattr.attribute_dataset("smollm2-135m", (r for r in ROWS), str(tmp_path / "s.zarr"), max_new_tokens=2)


def test_one_shot_iterator_data_is_refused_before_the_job(no_job, tmp_path):
    with pytest.raises(DataError, match=r"data is a one-shot iterator \(list_iterator\), which can be read only once"):
        distattr.attribute_dataset("smollm2-135m", iter(ROWS), str(tmp_path / "s.zarr"), max_new_tokens=2)


# --------------------------------------------------------------------------------------------- load arguments


def test_load_args_with_a_json_form_are_converted():
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                llm_int8_skip_modules=["lm_head"])
    args = portable_load_args({"dtype": torch.bfloat16, "quantization": config, "device": torch.device("cpu"),
                               "model_kwargs": {"dtype": torch.float16, "layers": (1, 2)}, "revision": "main"})
    assert args == {"dtype": "bfloat16", "quantization": {"bitsandbytes": config.to_dict()}, "device": "cpu",
                    "model_kwargs": {"dtype": "float16", "layers": [1, 2]}, "revision": "main"}
    assert json.loads(json.dumps(args, allow_nan=False)) == args
    back = quantization_from_json(json.loads(json.dumps(args["quantization"])))  # what load() does with it
    assert isinstance(back, BitsAndBytesConfig) and back.to_dict() == config.to_dict()
    assert back.bnb_4bit_compute_dtype == torch.bfloat16
    assert getattr(torch, args["dtype"]) is torch.bfloat16  # load() reads dtype names this way


@pytest.mark.parametrize(("load_args", "message"), [
    ({"dtype": object()}, r"load_args\['dtype'\] is a builtins.object, which the store's job identity \(JSON\) "
                          r"cannot hold; pass a dtype name such as \"bfloat16\" instead"),
    ({"model_kwargs": {"hook": print}}, r"load_args\['model_kwargs'\]\['hook'\] is a builtins.builtin_function"),
    ({"model_kwargs": {"quantization_config": None, "x": math.inf}}, r"load_args\['model_kwargs'\]\['x'\] is inf"),
])
def test_load_args_without_a_json_form_are_refused_in_one_line(load_args, message):
    with pytest.raises(ValueError, match=message) as err:
        portable_load_args(load_args)
    assert "\n" not in str(err.value)


def test_a_bitsandbytes_config_outside_quantization_is_refused():
    from transformers import BitsAndBytesConfig

    with pytest.raises(ValueError, match=r"load_args\['model_kwargs'\]\['quantization_config'\] is a "
                                         r"BitsAndBytesConfig; pass it as load_args\['quantization'\] instead"):
        portable_load_args({"model_kwargs": {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}})


def test_attribute_dataset_refuses_bad_load_args_before_the_job(no_job, tmp_path):
    with pytest.raises(ValueError, match=r"load_args\['quantization'\] is a builtins.object"):
        distattr.attribute_dataset("smollm2-135m", ROWS, str(tmp_path / "s.zarr"), max_new_tokens=2,
                                   load_args={"quantization": object()})
    assert not (tmp_path / "s.zarr").exists()


def test_attribute_dataset_passes_the_json_form_to_the_job(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(distattr.jobs, "run_job", lambda job, *a, **k: seen.setdefault("job", job))
    distattr.attribute_dataset("smollm2-135m", ROWS, str(tmp_path / "s.zarr"), max_new_tokens=2,
                               load_args={"dtype": torch.bfloat16})
    assert seen["job"].load_args == {"dtype": "bfloat16"}


# --------------------------------------------------------------------------------------------- aggregator names


def _decoder_only(values: np.ndarray | None = None, probs=(0.5, 0.25, 0.5)) -> SequenceAttribution:
    """A decoder-only result: prompt "ĠThe Ġbig Ġc at" (4 tokens), generation "Ġsat Ġdo wn" (3 tokens)."""
    tokens = ("ĠThe", "Ġbig", "Ġc", "at", "Ġsat", "Ġdo", "wn")
    rng = np.random.default_rng(0)
    matrix = rng.random((7, 3)).astype(np.float32) if values is None else values
    for col in range(3):
        matrix[4 + col:, col] = np.nan  # the explained token and later ones
    return SequenceAttribution(
        source_tokens=tokens[:4], target_tokens=tokens, source_ids=tuple(range(4)), target_ids=tuple(range(7)),
        source_attributions=None, target_attributions=matrix,
        step_scores={"probability": np.array(probs, dtype=np.float32)}, attr_pos_start=4, attr_pos_end=7)


def _equal(a: SequenceAttribution, b: SequenceAttribution) -> bool:
    same = (a.source_tokens, a.target_tokens, a.target_ids, a.attr_pos_start, a.attr_pos_end) == \
        (b.source_tokens, b.target_tokens, b.target_ids, b.attr_pos_start, b.attr_pos_end)
    return same and np.array_equal(a.target_attributions, b.target_attributions, equal_nan=True) and \
        a.step_scores.keys() == b.step_scores.keys() and \
        all(np.array_equal(a.step_scores[k], b.step_scores[k], equal_nan=True) for k in a.step_scores)


@pytest.mark.parametrize("name", ["subwords", "SubwordAggregator"])
def test_inseq_subwords_name_runs_words(name):
    seq = _decoder_only()
    merged = seq.aggregate(name)
    assert _equal(merged, Words()(seq))
    assert merged.target_tokens == ("ĠThe", "Ġbig", "Ġcat", "Ġsat", "Ġdown")  # not the display aggregation
    assert _equal(seq.aggregate(name, aggregate_fn="sum", special_chars=("Ġ", "Ċ")), Words(fn="sum")(seq))


@pytest.mark.parametrize("name", ["spans", "ContiguousSpanAggregator"])
def test_inseq_spans_name_runs_spans(name):
    seq = _decoder_only()
    assert _equal(seq.aggregate(name, target_spans=[(0, 2)], aggregate_fn="mean"),
                  Spans(target=[(0, 2)], fn="mean")(seq))


@pytest.mark.parametrize("name", ["slices", "SliceAggregator"])
def test_inseq_slices_name_runs_slice(name):
    seq = _decoder_only()
    sliced = seq.aggregate(name, target_spans=(1, 3))
    assert _equal(sliced, Slice(target=(1, 3))(seq))
    assert sliced.target_tokens == ("Ġbig", "Ġc", "Ġsat", "Ġdo", "wn")


@pytest.mark.parametrize("name", ["pair", "PairAggregator"])
def test_inseq_pair_name_is_paired_minus_attr_as_in_inseq(name):
    a, b = _decoder_only(), _decoder_only(np.full((7, 3), 2.0, dtype=np.float32), probs=(0.1, 0.2, 0.3))
    diff = a.aggregate(name, paired_attr=b)
    np.testing.assert_array_equal(diff.target_attributions, b.target_attributions - a.target_attributions)
    np.testing.assert_array_equal(diff.step_scores["probability"],
                                  b.step_scores["probability"] - a.step_scores["probability"])
    out = AttributionOutput((a, a))
    both = out.aggregate(name, paired_attr=AttributionOutput((b, b)))
    assert all(_equal(x, InseqPair(b)(a)) for x in both)


def test_inseq_pair_labels_differing_tokens_attr_then_paired():
    a = _decoder_only()
    b = SequenceAttribution(**{**a.__dict__, "target_tokens": (*a.target_tokens[:6], "Ġhome")})
    assert a.aggregate("pair", paired_attr=b).target_tokens[-1] == "wn → Ġhome"


@pytest.mark.parametrize("name", [None, "scores", "SequenceAttributionAggregator"])
def test_inseq_scores_name_is_the_display_aggregation(name):
    seq = _decoder_only()
    assert _equal(seq.aggregate(name), seq.display())
    assert _equal(seq.aggregate(name, normalize=False), seq.display(normalize=False))
    assert _equal(seq.aggregate(False), seq.display(normalize=False))  # the older positional form


def test_function_name_is_scores_with_that_function_as_in_inseq():
    seq = SequenceAttribution(**{**_decoder_only().__dict__, "target_attributions": np.ones((7, 3, 2), np.float32),
                                 "dims": ("head",)})
    summed = seq.aggregate("sum", normalize=False)
    np.testing.assert_array_equal(summed.target_attributions, np.full((7, 3), 2.0, np.float32))
    assert _equal(summed, seq.aggregate("scores", aggregate_fn="sum", normalize=False))
    np.testing.assert_array_equal(seq.aggregate(normalize=False).target_attributions, np.ones((7, 3), np.float32))


def test_unknown_aggregator_lists_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown aggregator 'split'. Valid: 'scores' "
                                         r"\(SequenceAttributionAggregator\), 'subwords' \(SubwordAggregator\), "
                                         r"'spans' \(ContiguousSpanAggregator\), "
                                         r"'slices' \(SliceAggregator\), 'pair' \(PairAggregator\)"):
        _decoder_only().aggregate("split")
    with pytest.raises(ValueError, match="Unknown aggregator 'subword'"):
        AttributionOutput((_decoder_only(),)).aggregate("subword")


def test_unknown_or_unsupported_aggregator_arguments_are_refused():
    seq = _decoder_only()
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['select_idx'\] for aggregator 'scores'"):
        seq.aggregate("scores", select_idx=0)
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['source_span'\] for aggregator 'spans'; valid: "
                                         r"source_spans, target_spans, aggregate_fn"):
        seq.aggregate("spans", source_span=(0, 2))
    with pytest.raises(ValueError, match="aggregator 'subwords' does not normalise: drop normalize"):
        seq.aggregate("subwords", normalize=True)
    with pytest.raises(ValueError, match="special_chars=.*other markers are not supported"):
        seq.aggregate("subwords", special_chars="#")
    with pytest.raises(ValueError, match="distattr's Slice keeps one contiguous"):
        seq.aggregate("slices", target_spans=[(0, 1), (2, 3)])
    with pytest.raises(TypeError, match="aggregator must be a name"):
        named_aggregation(seq, ["subwords", "scores"])


def test_named_aggregation_of_an_output_is_recorded():
    out = AttributionOutput((_decoder_only(),), info={"x": 1})
    assert out.aggregate("subwords").info["aggregation"] == [repr(Words())]


# --------------------------------------------------------------------------------------------- infinities in files


def _with_infinities() -> AttributionOutput:
    seq = _decoder_only()
    matrix = seq.target_attributions.copy()
    matrix[0, 0], matrix[1, 0], matrix[2, 1] = np.inf, -np.inf, np.nan
    scores = {"probability": np.array([0.0, np.inf, np.nan], np.float32),
              "pcxmi": np.array([-np.inf, 1.5, np.inf], np.float32)}
    return AttributionOutput((SequenceAttribution(**{**seq.__dict__, "target_attributions": matrix,
                                                     "step_scores": scores}),),
                             info={"timing": {"x": float("inf")}, "n": np.float32(np.inf)})


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_infinities_and_nan_round_trip_exactly_through_strict_json(tmp_path):
    out = _with_infinities()
    path = out.save(tmp_path / "inf.json")
    doc = _strict(path.read_text())
    data = doc["sequences"][0]["target_attributions"]["data"]
    assert data[0] == "Infinity" and data[3] == "-Infinity" and data[7] is None
    assert doc["sequences"][0]["step_scores"]["pcxmi"]["data"] == ["-Infinity", 1.5, "Infinity"]
    assert doc["info"] == {"timing": {"x": None}, "n": None}
    back = distattr.load(path)
    a, b = out[0], back[0]
    assert np.array_equal(a.target_attributions, b.target_attributions, equal_nan=True)
    assert b.target_attributions.dtype == np.float32
    for name in a.step_scores:
        assert np.array_equal(a.step_scores[name], b.step_scores[name], equal_nan=True), name


def test_load_reads_nan_as_a_string_and_refuses_other_strings(tmp_path):
    path = _with_infinities().save(tmp_path / "a.json")
    doc = json.loads(path.read_text())
    doc["sequences"][0]["step_scores"]["pcxmi"]["data"][1] = "NaN"
    path.write_text(json.dumps(doc))
    assert np.isnan(distattr.load(path)[0].step_scores["pcxmi"][1])
    doc["sequences"][0]["step_scores"]["pcxmi"]["data"][1] = "inf"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="is a damaged distattr result: .*'inf' is not a number"):
        distattr.load(path)


# --------------------------------------------------------------------------------------------- saving


def test_save_refuses_an_existing_file_by_default(tmp_path):
    out = AttributionOutput((_decoder_only(),))
    path = tmp_path / "r.json"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match=r"r.json exists; pass overwrite=True to replace it"):
        out.save(path)
    assert path.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_save_overwrites_when_asked(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    AttributionOutput((_decoder_only(),)).save(path, overwrite=True)
    assert _equal(distattr.load(path)[0], _decoder_only())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_failing_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch, overwrite):
    path = tmp_path / "r.json"
    if overwrite:
        path.write_text("old")
    real_dump = json.dump

    def dump_half(obj, fp, **kwargs):
        fp.write(json.dumps(obj, **kwargs)[:50])
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", dump_half)
    with pytest.raises(OSError, match="disk full"):
        AttributionOutput((_decoder_only(),)).save(path, overwrite=overwrite)
    monkeypatch.setattr(json, "dump", real_dump)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["r.json"] if overwrite else [])
    if overwrite:
        assert path.read_text() == "old"


def test_saved_file_gets_the_usual_permissions(tmp_path):
    path = AttributionOutput((_decoder_only(),)).save(tmp_path / "r.json")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------------------------------------- model objects


def _user_model():
    from tiny import tiny_model

    model, tok = tiny_model("gpt2")
    model.train()
    model.transformer.h[0].eval()  # a mixed state, as a user may leave it
    model.lm_head.requires_grad_(False) if hasattr(model, "lm_head") else None
    tok.pad_token = None
    model.config.pad_token_id = None
    return model, tok


def _state(model, tok):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()], tok.pad_token,
            model.config.pad_token_id)


def test_load_model_freezes_a_model_object_and_release_gives_it_back():
    model, tok = _user_model()
    before = _state(model, tok)
    assert any(before[0]) and not all(before[0]) and before[2] is None
    m = distattr.load_model(model, tokenizer=tok)
    assert not any(mod.training for mod in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token == tok.eos_token and model.config.pad_token_id == tok.eos_token_id
    m.attribute("a b", generation_args={"max_new_tokens": 2}, show_progress=False)
    assert not any(mod.training for mod in model.modules())  # still frozen after a call
    m.release()
    assert _state(model, tok) == before
    with pytest.raises(RuntimeError, match="This AttributionModel was released"):
        m.attribute("a b", generation_args={"max_new_tokens": 2}, show_progress=False)
    m.release()  # a second release changes nothing
    assert _state(model, tok) == before


def test_with_block_releases_the_model_object():
    model, tok = _user_model()
    before = _state(model, tok)
    with distattr.load_model(model, tokenizer=tok) as m:
        assert not any(p.requires_grad for p in m.model.parameters())
    assert _state(model, tok) == before


# --------------------------------------------------------------------------------------------- embedded cache

_CONVERTER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from distattr.models import embedded

    start_at, cache = float(sys.argv[1]), Path(os.environ["DISTATTR_CACHE"])

    def slow_fake(source, folder):  # writes the files of a conversion in pieces, slowly
        while time.time() < start_at:
            time.sleep(0.01)
        with open(folder / "model.safetensors", "w") as f:
            for _ in range(20):
                f.write(str(os.getpid()) * 1000)
                f.flush()
                time.sleep(0.02)
        (folder / "config.json").write_text(str(os.getpid()))

    embedded.write_converted = slow_fake
    embedded.convert_gguf(Path(sys.argv[2]), cache / "model-v1")
    print((cache / "model-v1" / "config.json").read_text())
""")


def _convert_in_processes(cache: Path, n: int = 2) -> list[subprocess.CompletedProcess]:
    source = cache.parent / "fake.gguf"
    source.write_text("gguf")
    env = {**os.environ, "DISTATTR_CACHE": str(cache)}
    start_at = str(time.time() + 3)  # both begin writing at once, after their imports
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERTER, start_at, str(source)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    return [subprocess.CompletedProcess(p.args, p.wait(120), *p.communicate()) for p in procs]


def _check_one_complete_cache(cache: Path, results: list[subprocess.CompletedProcess]) -> None:
    assert [r.returncode for r in results] == [0] * len(results), [r.stderr[-2000:] for r in results]
    assert sorted(p.name for p in cache.iterdir()) == ["model-v1"]  # no temporary folder left
    folder = cache / "model-v1"
    assert embedded.is_complete(folder)
    writer = (folder / "config.json").read_text()
    assert (folder / "model.safetensors").read_text() == writer * 1000 * 20  # all from one writer, whole
    assert {r.stdout.strip() for r in results} == {writer}


def test_two_processes_converting_at_once_leave_one_complete_cache(tmp_path):
    cache = tmp_path / "cache"
    _check_one_complete_cache(cache, _convert_in_processes(cache))


def test_an_incomplete_cache_folder_is_replaced(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "model-v1").mkdir(parents=True)
    (cache / "model-v1" / "model.safetensors").write_text("half")  # an older distattr crashed here

    def fake(source, folder):
        (folder / "model.safetensors").write_text("whole")

    monkeypatch.setattr(embedded, "write_converted", fake)
    embedded.convert_gguf(tmp_path / "x.gguf", cache / "model-v1")
    assert (cache / "model-v1" / "model.safetensors").read_text() == "whole"
    assert embedded.is_complete(cache / "model-v1")
    assert sorted(p.name for p in cache.iterdir()) == ["model-v1"]


def test_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(source, folder):
        (folder / "model.safetensors").write_text("part")
        raise RuntimeError("corrupt GGUF")

    monkeypatch.setattr(embedded, "write_converted", broken)
    with pytest.raises(RuntimeError, match="corrupt GGUF"):
        embedded.convert_gguf(tmp_path / "x.gguf", tmp_path / "cache" / "model-v1")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.slow
def test_two_processes_converting_the_real_embedded_model_at_once(tmp_path):
    script = ("from distattr.models import embedded; d = embedded.converted_dir('smollm2-135m'); "
              "from transformers import AutoConfig; AutoConfig.from_pretrained(d); print(d)")
    env = {**os.environ, "DISTATTR_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(600), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    folders = [p for p in tmp_path.iterdir()]
    assert len(folders) == 1 and embedded.is_complete(folders[0]), folders
    assert {out.strip() for _, out, _ in results} == {str(folders[0])}
    assert (folders[0] / "model.safetensors").stat().st_size > 100_000_000


def test_a_cache_completed_by_another_process_meanwhile_is_used_and_ours_deleted(tmp_path, monkeypatch):
    final = tmp_path / "cache" / "model-v1"

    def fake_with_a_faster_rival(source, folder):
        (folder / "model.safetensors").write_text("ours")
        final.mkdir()  # the other process renames its finished folder into place while we write
        (final / "model.safetensors").write_text("theirs")
        (final / "complete").write_text("x")

    monkeypatch.setattr(embedded, "write_converted", fake_with_a_faster_rival)
    embedded.convert_gguf(tmp_path / "x.gguf", final)
    assert (final / "model.safetensors").read_text() == "theirs"
    assert sorted(p.name for p in final.parent.iterdir()) == ["model-v1"]


@pytest.mark.parametrize("kwargs, message", [
    ({"generation_args": {"num_beams": 0}}, "num_beams must be an integer at least 1, not 0"),
    ({"step_scores": ["probability"], "step_scores_args": {"probability": {"logprob": "no"}}},
     "probability argument logprob must be true or false, not 'no'"),
    ({"attributed_fn": "probability", "attributed_fn_args": {"logprob": "no"}}, "logprob must be true or false"),
])
def test_attribute_dataset_checks_generation_and_step_arguments_before_the_job(no_job, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        distattr.attribute_dataset("unused", [{"prompt": "a"}], str(tmp_path / "s.zarr"), max_new_tokens=3, **kwargs)
    assert not (tmp_path / "s.zarr").exists()
