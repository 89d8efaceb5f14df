"""Device maps (accelerate big-model placement) on a CPU machine: explicit CPU maps, disk offload and max_memory
give the same attributions as the plain model; inputs go where the input embedding computes; bad maps fail
before loading with the devices available."""

import json

import numpy as np
import pytest
import torch

import distattr
from distattr import cli
from distattr.cli import common as cli_common
from distattr.models.adapters import input_device
from distattr.models.loading import available_devices, check_device_map, check_max_memory

PROMPT = "the cat is located in the city of"
GEN = PROMPT + " paris , france"
LAYERS = ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny Llama (untied embeddings, 2 layers) saved as a model folder."""
    from tiny import tiny_model

    model, tok = tiny_model("llama")
    path = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _same(a, b, **kwargs):
    for x, y in zip(a.sequences, b.sequences, strict=True):
        assert x.target_tokens == y.target_tokens
        np.testing.assert_allclose(x.target_attributions, y.target_attributions, equal_nan=True, **kwargs)


@pytest.mark.parametrize("method, args", [("saliency", {}), ("integrated_gradients", {"n_steps": 4}),
                                          ("attention", {}), ("occlusion", {})])
def test_disk_offload_gives_the_plain_models_attributions(folder, tmp_path, method, args):
    plain = distattr.load_model(folder, method, **args)
    placement = dict.fromkeys(LAYERS, "cpu") | {"model.embed_tokens": "disk", "model.layers.1": "disk"}
    mapped = distattr.load_model(folder, method, device_map=placement, model_kwargs={"offload_folder": str(tmp_path)},
                                 **args)
    embedding = mapped.model.get_input_embeddings()
    assert embedding.weight.device.type == "meta" and input_device(mapped.model) == torch.device("cpu")
    want = plain.attribute(PROMPT, generation_args={"max_new_tokens": 3}, show_progress=False)
    got = mapped.attribute(PROMPT, generation_args={"max_new_tokens": 3}, show_progress=False)
    _same(want, got, rtol=1e-5, atol=1e-7)
    assert got.info["device_map"]["model.embed_tokens"] == "disk" and "device_map" not in want.info


def test_explicit_cpu_map_and_max_memory(folder, tmp_path):
    plain = distattr.load_model(folder, "input_x_gradient").attribute(PROMPT, GEN, show_progress=False)
    cpu = distattr.load_model(folder, "input_x_gradient", device_map=dict.fromkeys(LAYERS, "cpu"))
    _same(plain, cpu.attribute(PROMPT, GEN, show_progress=False), rtol=1e-6)
    # ~60 kB of CPU memory: accelerate sends the rest of the tiny model to disk
    small = distattr.load_model(folder, "input_x_gradient", max_memory={"cpu": 60_000},
                                model_kwargs={"offload_folder": str(tmp_path)})
    assert "disk" in small.model.hf_device_map.values()
    _same(plain, small.attribute(PROMPT, GEN, show_progress=False), rtol=1e-6)


def test_missing_devices_are_named_with_the_available_ones(folder):
    assert available_devices()[0] == "cpu" and available_devices()[-1] == "disk"
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    with pytest.raises(ValueError, match=f"'{missing}', which does not exist on this machine; available: cpu"):
        distattr.load_model(folder, device_map=dict.fromkeys(LAYERS, "cpu") | {"lm_head": missing})
    with pytest.raises(ValueError, match="does not exist on this machine"):
        distattr.load_model(folder, device_map=torch.cuda.device_count() + 3)
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        distattr.load_model(folder, device_map={"": "gpu"})
    with pytest.raises(ValueError, match="max_memory names device"):
        distattr.load_model(folder, max_memory={torch.cuda.device_count() + 3: "1GiB", "cpu": "1GiB"})
    with pytest.raises(ValueError, match="is not a size"):
        check_max_memory({"cpu": "a lot"})
    assert check_max_memory({"cpu": "1GiB", "disk": 10}) == {"cpu": "1GiB", "disk": 10}


def test_bad_module_names_and_split_tied_embeddings(folder, tmp_path):
    with pytest.raises(ValueError, match=r"module\(s\) 'model.layerz' that LlamaForCausalLM does not have; module "
                                         r"names look like .*model.embed_tokens"):
        distattr.load_model(folder, device_map={"model.embed_tokens": "cpu", "model.layerz": "cpu", "lm_head": "cpu"})
    from tiny import tiny_model

    model, tok = tiny_model("gpt2")  # ties lm_head to transformer.wte
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="lm_head shares its weight with transformer.wte"):
        distattr.load_model(str(tmp_path / "gpt2"), device_map={"transformer": "cpu", "lm_head": "disk"},
                            model_kwargs={"offload_folder": str(tmp_path / "off")})
    check_device_map("auto")  # strategies and existing devices pass
    check_device_map("cpu")


def test_placement_options_refused_for_model_objects(tiny):
    from tiny import tiny_model

    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="device_map, max_memory apply when distattr loads the model"):
        distattr.load_model(model, tokenizer=tok, device_map="auto", max_memory={"cpu": "1GiB"})


def test_cli_model_options_and_run(folder, tmp_path, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["attribute", "x", "--device-map", '{"model.embed_tokens": "disk", "lm_head": 0}',
                              "--max-memory", "0=20GiB,cpu=60GiB", "--offload-folder", "off"])
    assert cli_common.parse_device_map(args.device_map) == {"model.embed_tokens": "disk", "lm_head": 0}
    assert cli_common.parse_max_memory(args.max_memory) == {0: "20GiB", "cpu": "60GiB"}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:0', which does not exist"):
            cli_common.model_options(args)
    ok = parser.parse_args(["attribute", "x", "--device-map", "auto", "--max-memory", "cpu=1GiB", "--dtype",
                            "float32", "--offload-folder", "off"])
    assert cli_common.model_options(ok) == {"dtype": "float32", "device": None, "device_map": "auto",
                                     "max_memory": {"cpu": "1GiB"}, "model_kwargs": {"offload_folder": "off"}}
    for bad in (["--device-map", "{oops"], ["--max-memory", "cpu"], ["--offload-folder", "off"]):
        assert cli.main(["attribute", "x", "--no-show", *bad]) == cli_common.USAGE_ERROR
    out = tmp_path / "o.json"
    placement = json.dumps(dict.fromkeys(LAYERS, "cpu") | {"model.layers.0": "disk"})
    assert cli.main(["attribute", PROMPT, "--model", folder, "--generated-texts", GEN, "--device-map", placement,
                     "--offload-folder", str(tmp_path / "off"), "--output", str(out), "--no-show", "--quiet"]) == 0
    saved = distattr.load(out)
    assert saved.info["device_map"]["model.layers.0"] == "disk"
    plain = distattr.load_model(folder, "saliency").attribute(PROMPT, GEN, show_progress=False)
    _same(plain, saved, rtol=1e-6)


@pytest.mark.slow
def test_embedded_model_with_embeddings_and_layers_on_disk(tmp_path):
    prompt = "The Eiffel Tower is located in the city of"
    plain = distattr.load_model("smollm2-135m", "saliency")
    want = plain.attribute(prompt, generation_args={"max_new_tokens": 3}, show_progress=False)
    layers = {f"model.layers.{i}": "disk" if i in (1, 2, 29) else "cpu" for i in range(30)}
    placement = {"model.embed_tokens": "disk", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu",
                 "lm_head": "disk"}  # tied to the embeddings: both on disk
    mapped = distattr.load_model("smollm2-135m", "saliency", device_map=placement,
                                 model_kwargs={"offload_folder": str(tmp_path)})
    got = mapped.attribute(prompt, generation_args={"max_new_tokens": 3}, show_progress=False)
    _same(want, got, rtol=1e-5, atol=1e-8)
