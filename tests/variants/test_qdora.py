"""QDoRA (DoRA on an NF4 base) against fastpeft's dense DoRA on the dequantised weight (itself checked against
PEFT in test_dora_peft_parity.py): outputs and every gradient, merge, and the checkpoint round trip."""
import copy

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.nn.lora import LoRALinear
from fastpeft.nn.qlora import QLoRALinear
from numerics import assert_close_to_ref

pytestmark = pytest.mark.usefixtures("cpu_backend")


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def qdora_and_dense(bias: bool = True):
    torch.manual_seed(0)
    qdora = QLoRALinear.from_linear(nn.Linear(64, 24, bias=bias), r=4, lora_alpha=8, init_lora_weights=False,
                                    variant="dora")
    base = nn.Linear(64, 24, bias=bias)
    with torch.no_grad():
        base.weight.copy_(qdora.base_layer.dequantize(torch.float32))
        if bias:
            base.bias.copy_(qdora.base_layer.bias)
    dense = LoRALinear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False, variant="dora")
    with torch.no_grad():
        for name in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
            dense.get_parameter(name).copy_(qdora.get_parameter(name))
    return qdora, dense


def grads(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return {"y": y.detach(), "x": x.grad,
            **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("bias", [True, False])
def test_qdora_equals_dense_dora_on_the_dequantised_weight(bias):
    qdora, dense = qdora_and_dense(bias)
    assert torch.allclose(qdora.lora_magnitude_vector, dense.lora_magnitude_vector, rtol=1e-6)
    qdora.train()
    dense.train()
    x, dy = torch.randn(3, 5, 64), torch.randn(3, 5, 24)
    got, dense32 = grads(qdora, x, dy), grads(dense, x, dy)
    dense64 = copy.deepcopy(dense).double()
    ref = grads(dense64, x.double(), dy.double())
    for name in ref:
        assert_close_to_ref(got[name], ref[name], dense32[name], what=name)


def test_merge_and_dense_linear_match_the_unmerged_output():
    qdora, _ = qdora_and_dense()
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = qdora(x)
        qdora.merge()
        torch.testing.assert_close(qdora(x), expected, rtol=1e-5, atol=1e-5)
        qdora.unmerge()
        torch.testing.assert_close(qdora(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(qdora.to_dense_linear()(x), expected, rtol=1e-5, atol=1e-5)


def test_apply_qlora_use_dora_saves_and_loads_the_magnitudes(tmp_path):
    def build():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))

    model = fastpeft.apply_qlora(build(), ["0", "2"], r=4, use_dora=True)
    assert all(m.variant.name == "dora" for m in model.modules() if isinstance(m, QLoRALinear))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    fastpeft.save_lora(model, tmp_path)
    other = fastpeft.apply_qlora(build(), ["0", "2"], r=4, use_dora=True)
    fastpeft.load_lora(other, tmp_path)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
