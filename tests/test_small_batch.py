"""The small-batch linear used while generating: same values as ``F.linear``, scoped, and same tokens."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from distattr.models.small_batch import MAX_ROWS, small_batch_linear, small_batch_linears


@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (3, 1, 24), (2, 3, 24), (MAX_ROWS, 24), (MAX_ROWS + 1, 24),
                                   (4, 7, 24), (0, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_f_linear(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape)
    out = small_batch_linear(layer, x)
    assert out.shape == (*shape[:-1], 40) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


def test_gradients_flow_like_f_linear():
    torch.manual_seed(0)
    layer = nn.Linear(8, 5)
    x = torch.randn(3, 8, requires_grad=True)
    (g_small,) = torch.autograd.grad(small_batch_linear(layer, x).square().sum(), x)
    (g_ref,) = torch.autograd.grad(F.linear(x, layer.weight, layer.bias).square().sum(), x)
    torch.testing.assert_close(g_small, g_ref)


class _Sub(nn.Linear):
    pass


def test_context_switches_only_plain_float32_cpu_linears_and_restores_them():
    hooked = nn.Linear(4, 4)
    hooked.forward = lambda x: x  # as accelerate's offload hooks replace it on the instance
    model = nn.Sequential(nn.Linear(4, 4), _Sub(4, 4), nn.Linear(4, 4).double(), hooked)
    with small_batch_linears(model) as n:
        assert n == 1
        assert "forward" in vars(model[0]) and "forward" not in vars(model[1]) and "forward" not in vars(model[2])
        assert model[3].forward(torch.ones(1, 4)).equal(torch.ones(1, 4))
    assert "forward" not in vars(model[0]) and model[3].forward(torch.ones(1, 4)).equal(torch.ones(1, 4))
    with pytest.raises(RuntimeError), small_batch_linears(model):
        raise RuntimeError("boom")
    assert "forward" not in vars(model[0])


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_generation_gives_the_same_tokens(tiny, kind):
    m = tiny(kind)
    prompts = ["a b c", "d e f g h i"]
    args = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    enc = m.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = m.model.generate(**enc, **args, pad_token_id=m.tokenizer.pad_token_id)
        with small_batch_linears(m.model) as n:
            fast = m.model.generate(**enc, **args, pad_token_id=m.tokenizer.pad_token_id)
    assert n > 0 or kind == "gpt2"  # GPT-2 uses Conv1D, which is left alone
    assert torch.equal(ref, fast)
