"""DoRA against HF PEFT's DoRA layer (the oracle), fp32 on both backends (Triton under the interpreter):
outputs and every gradient.

The reference is PEFT's own layer run in float64; fastpeft's fp32 error must
stay within 4x PEFT's fp32 error (``tests/numerics.py``). Linear and GPT-2
Conv1D (``fan_in_fan_out``), with and without bias, eval and training with
dropout (PEFT then recomputes the base part on the dropped x; both sides get
the same mask).
"""
import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastpeft.nn.lora import LoRALinear
from numerics import assert_close_to_ref
from variants.peft_dora import FixedMaskDropout, our_parameters, pair, peft_parameters, seeded_mask

IN, OUT = 24, 20


def make_base(kind: str, bias: bool) -> nn.Module:
    torch.manual_seed(1)
    if kind == "linear":
        return nn.Linear(IN, OUT, bias=bias)
    conv = Conv1D(OUT, IN)
    if not bias:
        conv.bias = None
    return conv


def run(layer, params: dict, x: torch.Tensor, dy: torch.Tensor) -> dict:
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return {"y": y.detach(), "x": x.grad, **{k: p.grad for k, p in params.items()}}


# transformers' Conv1D always has a bias.
@pytest.mark.parametrize("kind, bias", [("linear", True), ("linear", False), ("conv1d", True)])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
def test_outputs_and_gradients_match_peft_dora(kind, bias, training, backend):
    p = 0.3 if training else 0.0
    ours, theirs = pair(make_base(kind, bias), dropout=p)
    ours.train(training)
    theirs.train(training)
    x, dy = torch.randn(3, 5, IN), torch.randn(3, 5, OUT)
    if training:
        mask = seeded_mask((15, IN), p, 7)
        theirs.lora_dropout["default"] = FixedMaskDropout(mask, p)
        torch.manual_seed(7)
    got = run(ours, our_parameters(ours), x, dy)
    theirs64 = copy.deepcopy(theirs).double()
    ref = run(theirs64, peft_parameters(theirs64), x.double(), dy.double())
    peft32 = run(theirs, peft_parameters(theirs), x, dy)
    for name in ref:
        assert_close_to_ref(got[name], ref[name], peft32[name], what=name)


def test_magnitude_is_initialised_to_peft_row_norms():
    base = make_base("linear", True)
    ours, theirs = pair(base)
    fresh = LoRALinear.from_linear(copy.deepcopy(base), r=4, variant="dora")  # PEFT init: B = 0, m = ‖W‖
    expected = torch.linalg.vector_norm(base.weight.double(), dim=1)
    assert_close_to_ref(fresh.lora_magnitude_vector, expected, base.weight.norm(dim=1), what="m at init")
    a, b = ours.lora_A.weight, ours.lora_B.weight
    weight = base.weight.double() + ours.scaling * b.double() @ a.double()
    ours.reset_lora_parameters(False)  # re-initialises m from the (unchanged, random) pair
    peft_norm = theirs.lora_magnitude_vector["default"].get_weight_norm(base.weight, (b @ a).detach(), ours.scaling)
    assert_close_to_ref(ours.lora_magnitude_vector, weight.norm(dim=1), peft_norm, what="m from W + s·BA")
