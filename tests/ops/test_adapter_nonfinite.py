"""NaN and inf in the inputs of the adapter and LoRA ops propagate as torch's own ops propagate them.

The reference is the same math in float64 through torch's ops and autograd
(``adapter_op_math``: ``F.linear``, transformers' activations; LoRA: two
``F.linear``), so e.g. ``relu(NaN)`` is NaN and passes the gradient
(``threshold_backward``). ``relu6``'s gradient at NaN is 0 in torch's
vectorized ``hardtanh_backward`` and 1 in its scalar tail (it depends on the
position): the reference takes ``torch.clamp(t, 0, 6)``, 0 everywhere. Each
backend (the CPU path, the Triton kernels under the interpreter) must give
NaN and inf exactly where the reference has them, in the output and in every
gradient, and the reference's values elsewhere.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from adapter_reference import adapter_op_math
from fastpeft.ops import bottleneck_adapter, lora_linear

M, H, B, N, R = 5, 24, 7, 12, 4

# (tensor, index, value): a NaN or inf in one element of one input
ADAPTER_POISONS = {
    "nan_x": ("x", (1, 3), math.nan),
    "inf_x": ("x", (2, 5), math.inf),
    "neg_inf_x": ("x", (0, 0), -math.inf),
    "nan_down_weight": ("down_weight", (3, 2), math.nan),
    "nan_down_bias": ("down_bias", (4,), math.nan),
    "inf_up_weight": ("up_weight", (6, 1), math.inf),
    "nan_up_bias": ("up_bias", (9,), math.nan),
    "nan_residual": ("residual", (3, 7), math.nan),
}
ADAPTER_NAMES = ("x", "down_weight", "up_weight", "down_bias", "up_bias", "residual")
LORA_POISONS = {
    "nan_x": ("x", (1, 3), math.nan),
    "inf_x": ("x", (2, 5), math.inf),
    "nan_weight": ("weight", (3, 2), math.nan),
    "nan_lora_A": ("lora_A", (1, 6), math.nan),
    "inf_lora_B": ("lora_B", (4, 0), math.inf),
    "nan_bias": ("bias", (5,), math.nan),
}
LORA_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def _poisoned(shapes, poison):
    name, index, value = poison
    inputs = {n: torch.randn(*s, dtype=torch.float64) for n, s in shapes.items()}
    inputs[name][index] = value
    return inputs


def _same_nonfinite(got, want, what):
    got, want = got.detach().double(), want.detach().double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), \
        f"{what}: NaN at {torch.isnan(got).nonzero()[:6].tolist()}, reference at {torch.isnan(want).nonzero()[:6].tolist()}"
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got[torch.isinf(got)],
                                                                            want[torch.isinf(want)]), what
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4, msg=what)


def _check(op, reference_fn, inputs, names):
    """Run ``op`` in fp32 and ``reference_fn`` in fp64 on the same values; compare output and gradients."""
    assert not all(torch.isfinite(inputs[n]).all() for n in names)
    want_leaves = {n: inputs[n].clone().requires_grad_() for n in names}
    want = reference_fn(**want_leaves)
    dy = torch.randn(want.shape, dtype=torch.float64)
    want.backward(dy)
    assert not all(torch.isfinite(t).all() for t in [want] + [want_leaves[n].grad for n in names]), \
        "the poison must reach the reference's output or a gradient"
    leaves = {n: inputs[n].float().requires_grad_() for n in names}
    got = op(**leaves)
    got.backward(dy.float())
    _same_nonfinite(got, want, "out")
    for n in names:
        _same_nonfinite(leaves[n].grad, want_leaves[n].grad, f"d{n}")


PIECEWISE = ("relu", "relu6", "leakyrelu")
# An infinite pre-activation or an infinite gradient into a saturated smooth activation is where torch
# disagrees with itself (F.gelu(inf) is NaN in fp32 and inf in fp64; tanh' is exactly 0 in fp32 where
# fp64 has a tiny value, and 0 · inf differs): those poisons run the piecewise-linear activations.
CASES = [(poison, act) for poison in ADAPTER_POISONS for act in PIECEWISE + ("gelu", "silu", "tanh")
         if act in PIECEWISE or not poison.startswith(("inf", "neg_inf"))]


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
@pytest.mark.parametrize("poison, act", CASES)
def test_adapter_propagates_nonfinite_like_torch(poison, act, backend):
    shapes = dict(x=(M, H), down_weight=(B, H), up_weight=(H, B), down_bias=(B,), up_bias=(H,), residual=(M, H))
    inputs = _poisoned(shapes, ADAPTER_POISONS[poison])
    scaling = 0.7

    def reference(**t):
        if act == "relu6":
            up = F.linear(torch.clamp(F.linear(t["x"], t["down_weight"], t["down_bias"]), 0.0, 6.0),
                          t["up_weight"], t["up_bias"])
            return up * scaling + t["residual"]
        return adapter_op_math(t["x"], t["down_weight"], t["up_weight"], t["down_bias"], t["up_bias"],
                               t["residual"], scaling, act)

    def op(**t):
        return bottleneck_adapter(t["x"], t["down_weight"], t["up_weight"], t["down_bias"], t["up_bias"],
                                  t["residual"], scaling=scaling, activation=act)

    _check(op, reference, inputs, ADAPTER_NAMES)


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
@pytest.mark.parametrize("poison", list(LORA_POISONS))
def test_lora_propagates_nonfinite_like_torch(poison, backend):
    shapes = dict(x=(M, H), weight=(N, H), bias=(N,), lora_A=(R, H), lora_B=(N, R))
    inputs = _poisoned(shapes, LORA_POISONS[poison])
    scaling = 1.5

    def reference(x, weight, bias, lora_A, lora_B):
        return F.linear(x, weight, bias) + scaling * ((x @ lora_A.t()) @ lora_B.t())

    def op(x, weight, bias, lora_A, lora_B):
        return lora_linear(x, weight, lora_A, lora_B, scaling, bias=bias)

    _check(op, reference, inputs, LORA_NAMES)
