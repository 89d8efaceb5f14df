"""The memory planner (distattr/planner.py): weights against published figures and against bitsandbytes-loaded
models, device maps, batch sizes, passes against the engine's own batches, errors, the CLI, and the activation
model against the measured memory of an attribution batch on the embedded model."""

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from distattr.cli import main
from distattr.configs import SHIPPED_CONFIGS, config_path
from distattr.models.memory import activation_bytes_per_token, default_token_budget
from distattr.planner import GIB, PlanError, parse_devices, parse_size, plan, quantized_linear_bytes, token_budget_for

GB = 10**9
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models and meta models: one thread is faster here


@pytest.fixture(scope="module")
def llama3_nf4():
    return plan("llama-3-70b", "4x80GiB", "nf4", "integrated_gradients", 2048, 256)


# ---------------------------------------------------------------- weights against published figures


def test_llama3_70b_nf4_weights_match_the_known_figures(llama3_nf4):
    """scale.md section 4: linear layers 68.45B params -> 35.3 GB with double quantisation; embeddings + untied
    head 2.10B params in bf16 -> 4.2 GB; 70.6B parameters in all."""
    linear, embeddings = llama3_nf4.weight_groups["linear layers"], llama3_nf4.weight_groups["embeddings + head"]
    assert linear.params == pytest.approx(68.45e9, rel=0.002)
    assert linear.bytes == pytest.approx(35.3 * GB, rel=0.02)
    assert 8 * linear.bytes / linear.params == pytest.approx(4.127, abs=0.002)
    assert embeddings.params == pytest.approx(2.10e9, rel=0.01)
    assert embeddings.bytes == pytest.approx(4.2 * GB, rel=0.01)
    assert llama3_nf4.n_params == pytest.approx(70.55e9, rel=0.002)
    assert llama3_nf4.weight_bytes == pytest.approx(39.5 * GB, rel=0.01)


@pytest.mark.parametrize(("model", "quantization", "expected_gb"), [
    ("llama-3-70b", None, 141.1),   # bf16: 70.55B x 2 bytes
    ("llama-3-70b", "int8", 72.7),  # 68.45 GB of int8 weights + one float32 scale per row + 4.2 GB bf16 embeddings
    ("llama-2-70b", "nf4", 36.4),   # vocabulary 32k: 1.05 GB of embeddings + head
])
def test_other_known_totals(model, quantization, expected_gb):
    p = plan(model, "8x80GiB", quantization, "saliency", 256, 8)
    assert p.weight_bytes == pytest.approx(expected_gb * GB, rel=0.01)


def test_llama3_nf4_without_double_quantisation_is_4_5_bits():
    p = plan("llama-3-70b", "1x80GiB", "nf4", "saliency", 256, 8, double_quant=False)
    linear = p.weight_groups["linear layers"]
    assert 8 * linear.bytes / linear.params == pytest.approx(4.5, abs=0.002)
    assert linear.bytes == pytest.approx(38.5 * GB, rel=0.01)


@pytest.mark.parametrize(("model", "params"), [
    ("mixtral-8x7b", 46.70e9), ("qwen2-72b", 72.71e9), ("llama-2-70b", 68.98e9), ("smollm2-135m", 134.5e6)])
def test_parameter_counts_of_the_shipped_configs(model, params):
    assert plan(model, "8x80GiB", None, "saliency", 64, 8).n_params == pytest.approx(params, rel=0.002)


def test_transformers_5_leaves_fused_mixtral_experts_unquantized():
    """transformers 5 stores Mixtral's experts as 3-D parameters, not nn.Linear: bitsandbytes quantizes only the
    attention projections, so NF4 Mixtral weighs ~91 GB (checked against a real load in the next test)."""
    p = plan("mixtral-8x7b", "4x80GiB", "nf4", "saliency", 256, 8)
    assert p.weight_groups["linear layers"].params == pytest.approx(32 * (2 * 4096 * 4096 + 2 * 4096 * 1024), rel=1e-9)
    assert p.weight_groups["other"].params == pytest.approx(45.10e9, rel=0.002)
    assert "stay in bfloat16" in p.table()


def test_quantized_bytes_per_weight():
    n = 8192 * 8192
    assert 8 * quantized_linear_bytes(8192, 8192, "nf4", double_quant=True) / n == pytest.approx(4.127, abs=0.001)
    assert 8 * quantized_linear_bytes(8192, 8192, "fp4", double_quant=False) / n == pytest.approx(4.5, abs=0.001)
    assert quantized_linear_bytes(300, 1000, "int8") == 300 * 1000 + 4 * 300
    with pytest.raises(PlanError, match="unknown quantization"):
        quantized_linear_bytes(8, 8, "int4")


# ---------------------------------------------------------------- weights against real bitsandbytes loads


def _loaded_bytes(model) -> int:
    """Bytes of every tensor a loaded (quantized) model holds: parameters, buffers, bitsandbytes quant states
    (absmax, code tables, nested statistics) and int8 row scales, each storage counted once."""
    seen: set[int] = set()

    def size(t) -> int:
        if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in seen:
            return 0
        seen.add(t.untyped_storage().data_ptr())
        return t.untyped_storage().nbytes()

    total = sum(size(t) for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            total += size(state.absmax) + size(state.code) + size(state.offset)
            if state.state2 is not None:
                total += size(state.state2.absmax) + size(state.state2.code)
        total += size(getattr(weight, "SCB", None))  # int8 row scales (before the first forward moves them)
    return total


def _small_configs():
    from transformers import GPT2Config, LlamaConfig, MixtralConfig, Qwen2Config

    return {
        "llama": LlamaConfig(vocab_size=1000, hidden_size=200, intermediate_size=520, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2),  # blocks of 64 do not divide the sizes
        "mixtral": MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4),
        "qwen2": Qwen2Config(vocab_size=500, hidden_size=128, intermediate_size=300, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2),  # q/k/v biases stay in bf16
        "gpt2": GPT2Config(vocab_size=300, n_embd=96, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),  # Conv1D
    }


@pytest.mark.parametrize("kind", ["llama", "mixtral", "qwen2", "gpt2"])
def test_weights_equal_a_real_bitsandbytes_load(kind):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = _small_configs()[kind]
    settings = {
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16),
        "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                                  bnb_4bit_compute_dtype=torch.bfloat16),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
        "none": None,
    }
    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        for quantization, settings_ in settings.items():
            loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=settings_, dtype=torch.bfloat16,
                                                          device_map="cpu")
            planned = plan(config, "cpu=1GiB", quantization, "saliency", 16, 4, double_quant=quantization == "nf4")
            assert planned.weight_bytes == _loaded_bytes(loaded), (kind, quantization)


# ---------------------------------------------------------------- placement and batches


def test_device_map_spreads_over_four_gpus(llama3_nf4):
    from accelerate.utils import check_device_map

    from distattr.planner import build_meta_model

    assert [d.name for d in llama3_nf4.devices] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert all(d.blocks >= 15 for d in llama3_nf4.devices) and sum(d.blocks for d in llama3_nf4.devices) == 80
    assert set(llama3_nf4.device_map.values()) == {0, 1, 2, 3}
    assert all(d.free >= 0 and d.weights > 0 for d in llama3_nf4.devices)
    assert sum(d.weights for d in llama3_nf4.devices) == llama3_nf4.weight_bytes
    assert llama3_nf4.rows_per_batch >= 1 and llama3_nf4.token_budget == llama3_nf4.rows_per_batch * 2048
    # each device holds its blocks' activations for the whole batch
    per_block_row = 2048 * activation_bytes_per_token(_config("llama-3-70b"), torch.bfloat16) // 80
    for d in llama3_nf4.devices:
        assert d.activations >= llama3_nf4.rows_per_batch * d.blocks * per_block_row
    check_device_map(build_meta_model(_config("llama-3-70b"), torch.bfloat16), llama3_nf4.device_map)


@pytest.mark.parametrize(("model", "devices", "quantization"), [
    ("qwen2-72b", "8x80GiB", "int8"),  # accelerate stops reserving room when it places the largest layer itself
    ("mixtral-8x7b", "2x80GiB", "nf4"),
    ("llama-2-70b", "3x48GiB", "nf4"),
])
def test_every_device_keeps_within_its_memory(model, devices, quantization):
    p = plan(model, devices, quantization, "integrated_gradients", 512, 64)
    assert p.rows_per_batch >= 1 and sum(d.blocks for d in p.devices) == _config(model).num_hidden_layers
    for d in p.devices:
        assert d.free >= 0 and d.weights + d.activations + d.reserved + d.free == d.memory


def _config(name):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(config_path(name)))


def test_single_device_batch_is_the_memory_left_over_the_row_size():
    """On one device the batch is exactly what the activation model allows in what the weights leave."""
    p = plan("llama-3-70b", "1x80GiB", "nf4", "saliency", 512, 64, steps_per_row=64)
    per_token = activation_bytes_per_token(_config("llama-3-70b"), torch.bfloat16)
    row = 512 * per_token + 64 * 128256 * (2 + 8)  # blocks + scored logits, bf16 probabilities' float32 + gradient
    left = 80 * GIB - 2 * GIB - p.weight_bytes
    assert p.rows == 1  # saliency: one row per unit, one unit of 64 steps
    assert p.rows_per_batch == min(left // row, p.rows)
    p_ig = plan("llama-3-70b", "1x80GiB", "nf4", "integrated_gradients", 512, 64, steps_per_row=64)
    assert p_ig.rows_per_batch == left // row and p_ig.rows == 50
    assert p_ig.devices[0].activations == p_ig.rows_per_batch * row


def test_forward_only_methods_batch_more_rows():
    ig = plan("llama-3-70b", "1x80GiB", "nf4", "integrated_gradients", 512, 64, n_steps=400)
    occlusion = plan("llama-3-70b", "1x80GiB", "nf4", "occlusion", 512, 64)
    assert occlusion.backward_passes == 0 and occlusion.rows == 512  # the clean row + one per token it can change
    assert occlusion.rows_per_batch > 3 * ig.rows_per_batch
    assert occlusion.forward_passes == math.ceil(512 / occlusion.rows_per_batch)


@pytest.mark.parametrize(("n_steps", "internal_batch_size"), [(6, 4), (3, 1), (5, 7)])
def test_passes_equal_the_engines_batches(n_steps, internal_batch_size, tiny):
    """Run integrated gradients on a tiny model with the planned token budget and count the engine's forwards
    (with gradients) and batched step backwards: the plan predicts both exactly."""
    model = tiny("llama", "integrated_gradients")
    prompts = ["the cat is in the house", "a dog was on the tower", "the city of paris is big"]
    texts = [p + " and the red house is not blue but green ." for p in prompts]
    length = len(model.tokenizer(texts[0])["input_ids"])
    generated = length - len(model.tokenizer(prompts[0])["input_ids"])
    planned = plan(model.model, "cpu=1GiB", None, "integrated_gradients", length, generated, dtype="float32",
                   examples=3, method_args={"n_steps": n_steps, "internal_batch_size": internal_batch_size})
    counts = {"forward": 0, "backward": 0}
    hook = model.model.register_forward_pre_hook(
        lambda module, args: counts.__setitem__("forward", counts["forward"] + torch.is_grad_enabled()))
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        counts["backward"] += bool(kwargs.get("is_grads_batched"))
        return grad(*args, **kwargs)

    torch.autograd.grad = counting_grad
    try:
        model.attribute(prompts, texts, n_steps=n_steps, internal_batch_size=internal_batch_size,
                        token_budget=planned.token_budget, show_progress=False)
    finally:
        torch.autograd.grad = grad
        hook.remove()
    assert planned.rows_per_batch == internal_batch_size
    assert (planned.forward_passes, planned.backward_passes) == (counts["forward"], counts["backward"])
    assert planned.rows == n_steps * math.ceil(generated / planned.steps_per_row)


# ---------------------------------------------------------------- errors


def test_a_budget_too_small_for_one_row_says_by_how_much():
    from distattr.methods.base import Example
    from distattr.methods.rows import choose_width

    with pytest.raises(PlanError, match="not even one row of 2048 tokens fits") as err:
        plan("llama-3-70b", "1x48GiB", "nf4", "integrated_gradients", 2048, 256, recompute="never")
    weights = plan("llama-3-70b", "1x80GiB", "nf4", "saliency", 64, 8).weight_bytes
    ids = torch.zeros(2048, dtype=torch.long)
    width = choose_width([Example(ids, ids, start=2048 - 256, end=2048)])  # generated tokens per row
    row = 2048 * activation_bytes_per_token(_config("llama-3-70b"), torch.bfloat16) + width * 128256 * (2 + 8)
    short = row - (48 * GIB - 2 * GIB - weights)
    assert f"short by {short / GIB:.2f} GiB ({short} bytes)" in str(err.value)


def test_long_rows_are_planned_with_recomputation():
    """Llama-3-70B in NF4 at 8,192 tokens on one 80 GiB device: every block's activations (3.25 GiB per block)
    fit nowhere, so ``auto`` plans the recomputing kernel: a block keeps the hidden state entering it, the device
    the working room of one block, and each backward pass recomputes the blocks."""
    with pytest.raises(PlanError, match="not even one row of 8192 tokens fits"):
        plan("llama-3-70b", "1x80GiB", "nf4", "saliency", 8192, 256, recompute="never")
    p = plan("llama-3-70b", "1x80GiB", "nf4", "saliency", 8192, 256)
    assert p.recompute and p.recompute_passes == p.backward_passes > 0 and p.forward_passes >= 1
    device = p.devices[0]
    assert device.free >= 0 and device.blocks == 80
    boundaries = 80 * 8192 * 8192 * 2  # hidden states entering the 80 blocks, bfloat16
    block = 8192 * activation_bytes_per_token(_config("llama-3-70b"), torch.bfloat16) // 80
    assert boundaries + block < device.activations < boundaries + 16 * block
    assert "block recomputations (one per backward)" in p.table()
    # the engine, given the plan's budget, recomputes and makes the same batches
    from distattr.methods.gradient import kernel_memory
    from distattr.planner import build_meta_model

    meta = build_meta_model(_config("llama-3-70b"), torch.bfloat16)
    memory = kernel_memory(meta, p.token_budget, 8192, "auto")
    assert memory.recompute and memory.batch_tokens >= p.rows_per_batch * 8192
    assert memory.batch_tokens < (p.rows_per_batch + 1) * 8192


def test_an_8b_model_at_32k_tokens_on_one_device():
    p = plan("llama-3.1-8b", "1x80GiB", None, "saliency", 32768, 256)
    assert p.recompute and p.rows_per_batch >= 1 and p.devices[0].free >= 0
    assert p.n_params == 8_030_261_248  # Llama 3.1 8B
    with pytest.raises(PlanError, match="longer than llama-3.1-8b's context of 131072 tokens"):
        plan("llama-3.1-8b", "1x80GiB", None, "saliency", 200_000, 256)
    with pytest.raises(PlanError, match="longer than llama-3-70b's context of 8192 tokens"):
        plan("llama-3-70b", "1x80GiB", "nf4", "saliency", 16384, 256)


def test_recompute_is_planned_only_for_the_gradient_kernel():
    with pytest.raises(PlanError, match="does not run through the recomputing gradient kernel"):
        plan("smollm2-135m", "cpu=8GiB", None, "deeplift", 512, 8, recompute="always")
    with pytest.raises(PlanError, match="recompute must be one of auto, always, never"):
        plan("smollm2-135m", "cpu=8GiB", None, "saliency", 512, 8, recompute="yes")
    short = plan("smollm2-135m", "cpu=8GiB", None, "saliency", 512, 8)
    assert not short.recompute and short.recompute_passes == 0  # it fits: auto keeps every block's activations


def test_weights_that_do_not_fit_are_refused():
    with pytest.raises(PlanError, match=r"the weights \(36.80 GiB\) do not fit"):
        plan("llama-3-70b", "1x24GiB", "nf4", "saliency", 256, 8)
    with pytest.raises(PlanError, match="offload them to cpu"):  # CPU offload under a backward is not planned
        plan("llama-3-70b", "1x80GiB,cpu=200GiB", None, "saliency", 256, 8)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "attention"}, "does not model method 'attention'"),
    ({"method": "nope"}, "does not model method"),
    ({"quantization": "int4"}, "unknown quantization"),
    ({"max_length": 1}, "max_length must be"),
    ({"generated": 64, "max_length": 64}, "generated must be between 1 and max_length - 1"),
    ({"dtype": "int8"}, "floating-point"),
    ({"n_steps": 0}, "n_steps must be a positive integer"),
    ({"examples": 0}, "examples must be"),
    ({"model": "no/such-model-config.json"}, "config file not found"),
    ({"devices": "80"}, "not a memory size"),
])
def test_bad_input(kwargs, message):
    args = {"model": "smollm2-135m", "devices": "cpu=8GiB", "method": "integrated_gradients", "max_length": 64,
            "generated": 8, **kwargs}
    with pytest.raises(PlanError, match=message):
        plan(**args)


def test_device_specs():
    assert parse_devices("4x80GiB") == parse_devices("80GiB,80GiB,80GiB,80GiB")
    assert [(d.key, d.memory) for d in parse_devices("4x80GiB")] == [(i, 80 * GIB) for i in range(4)]
    assert [(d.key, d.memory) for d in parse_devices("2x40GB,cpu=64GiB")] == [(0, 40 * GB), (1, 40 * GB),
                                                                             ("cpu", 64 * GIB)]
    assert [(d.key, d.memory) for d in parse_devices({"cuda:1": "24GiB", "cpu": 1000})] == [(1, 24 * GIB),
                                                                                          ("cpu", 1000)]
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("512MB") == 512 * 10**6
    for bad in ("80", "4x", "cpu=", "x80GiB", "80GiB,,cpu=1GiB", "0GiB", "cpu=1GiB,cpu=2GiB", ""):
        with pytest.raises(PlanError):
            parse_devices(bad)


# ---------------------------------------------------------------- token budgets for loaded models, configs, CLI


def test_token_budget_for_a_loaded_model(tiny):
    model = tiny("llama").model
    per_token = activation_bytes_per_token(model.config, torch.float32)
    assert token_budget_for(model) == default_token_budget(model)  # CPU, no memory given: unchanged behaviour
    assert token_budget_for(model, memory_bytes=100 * per_token + 5) == 100
    with pytest.raises(PlanError, match="not even one token"):
        token_budget_for(model, memory_bytes=per_token // 2)


def test_shipped_configs_are_package_data():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "*.json" in pyproject["tool"]["setuptools"]["package-data"]["distattr.configs"]
    for name, (filename, repo) in SHIPPED_CONFIGS.items():
        data = json.loads(config_path(name).read_text())
        assert config_path(name).name == filename and data["architectures"] and "/" in repo
    sources = (config_path("llama-3-70b").parent / "SOURCES.md").read_text()
    assert all(repo in sources for _, repo in SHIPPED_CONFIGS.values())


def test_cli_plan_table_and_json(capsys):
    assert main(["plan", "--model", "llama-3-70b", "--devices", "4x80GiB", "--quantization", "nf4",
                 "--method", "integrated_gradients", "--max-length", "2048", "--generated", "256"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"linear layers\s+68\.45B params\s+35\.31 GB\s+4\.127 bits/param", table)
    assert "cuda:3" in table and "passes" in table
    assert main(["plan", "--model", "qwen2-72b", "--devices", "2x80GiB", "--quantization", "nf4", "--json",
                 "--method", "saliency", "--max-length", "512", "--generated", "32"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_params"] == pytest.approx(72.71e9, rel=0.002) and len(data["devices"]) == 2
    assert main(["plan", "--model", "llama-3-70b", "--devices", "1x48GiB", "--quantization", "nf4",
                 "--max-length", "2048", "--generated", "256", "--recompute", "never"]) == 2
    assert "short by" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3-70b", "--devices", "1x80GiB", "--quantization", "nf4",
                 "--method", "saliency", "--max-length", "8192", "--generated", "256"]) == 0
    assert "block recomputations (one per backward)" in capsys.readouterr().out


# ---------------------------------------------------------------- the embedded model, measured


@pytest.mark.slow
def test_embedded_model_weights_equal_the_plan():
    """The shipped smollm2-135m config is the embedded model's, and the planned bytes equal the loaded model's in
    float32 and in NF4 (bitsandbytes on the CPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from distattr.models.embedded import converted_dir

    folder = converted_dir("smollm2-135m")
    fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    shipped = _config("smollm2-135m")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings"):
        assert getattr(shipped, key) == getattr(fp32.config, key), key
    assert plan("smollm2-135m", "cpu=4GiB", None, "saliency", 64, 8, dtype="float32").weight_bytes == \
        _loaded_bytes(fp32)
    pytest.importorskip("bitsandbytes")
    nf4 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu", quantization_config=
                                               BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                  bnb_4bit_use_double_quant=True,
                                                                  bnb_4bit_compute_dtype=torch.float32))
    assert plan("smollm2-135m", "cpu=4GiB", "nf4", "saliency", 64, 8, dtype="float32").weight_bytes == \
        _loaded_bytes(nf4)


MEASURE = r"""
import json, os, sys
import torch
import distattr

torch.set_num_threads(2)
rows, steps = int(sys.argv[1]), int(sys.argv[2])
model = distattr.load_model("smollm2-135m", "integrated_gradients")
text = ("The Eiffel Tower is located in the city of Paris, which is the capital of France and one of the most "
        "visited cities in the world. ") * 2
ids = model.tokenizer(text)["input_ids"]
prompt = model.tokenizer.decode(ids[:-steps])
params = {p.untyped_storage().data_ptr() for p in model.model.parameters()}
saved = {}


def pack(t):  # every tensor autograd saves for the backward, weights excluded, each storage once
    if t.untyped_storage().data_ptr() not in params:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_since_reset():  # peak RSS since the last write of 5 to clear_refs: a spike while loading does not count
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


args = dict(token_budget=10**6, steps_per_row=steps, show_progress=False)
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    model.attribute(prompt, text, n_steps=1, **args)  # warm-up: the same code path with one row
    saved.clear()
    before = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = model.attribute(prompt, text, n_steps=rows, **args)  # one batch of `rows` rows
peak = peak_since_reset()
print(json.dumps({"length": len(out[0].target_tokens), "growth": peak - before, "saved": sum(saved.values())}))
"""


@pytest.mark.slow
def test_activation_model_against_the_measured_memory_of_a_batch():
    """One integrated-gradients batch of 8 rows on SmolLM2 (float32), run in a fresh process whose allocator returns
    freed blocks (``MALLOC_MMAP_THRESHOLD_``: the resident set follows the live tensors): the tensors autograd
    saves, and the process's peak memory growth over the batch, compared with the planner's activations for
    that batch. The activation model is the measured peak (1.00 for this batch, 1.01 for 32 rows; 0.98 for single
    rows of 512-8,192 tokens, benchmarks/bench_long_context.py): within 15%; the saved tensors alone are 0.9."""
    rows, steps = 8, 4
    done = subprocess.run([sys.executable, "-c", MEASURE, str(rows), str(steps)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    length = measured["length"]
    planned = plan("smollm2-135m", "cpu=16GiB", None, "integrated_gradients", length, steps, dtype="float32",
                   steps_per_row=steps, method_args={"n_steps": rows, "internal_batch_size": rows})
    assert planned.rows_per_batch == rows and planned.forward_passes == 1
    predicted = planned.devices[0].activations
    row_tokens = rows * (length - 1)  # the engine's row holds the tokens before the last step
    saved_model = row_tokens * activation_bytes_per_token(_config("smollm2-135m"), torch.float32)
    assert 0.8 <= measured["saved"] / saved_model <= 1.0, measured
    assert 0.85 <= measured["growth"] / predicted <= 1.15, (measured, predicted)


def test_activation_patching_is_planned_per_layer():
    """A restoration per (layer, position, noise draw): the planner counts every layer's rows, not one layer's."""
    from distattr.methods import get_method
    from distattr.methods.rows import Unit
    from distattr.planner import plan

    p = plan("smollm2-135m", "cpu=8GiB", None, "activation_patching", 64, 1, method_args={"noise_samples": 4})
    cost = get_method("activation_patching").cost
    args = get_method("activation_patching").args(noise_samples=4)
    per_layer = cost.points(args, Unit(0, (63,)))
    assert cost.per_layer and per_layer > 0 and p.rows == per_layer * 30  # SmolLM2-135M has 30 decoder layers
