"""Regression tests for bugs users reported against the LoRA/NF4/QLoRA ops (both backends).

- a strided or expanded bias was read as if contiguous by the Triton NF4/QLoRA kernels;
- fp16 LoRA rounded ``s · (x Aᵀ)`` to fp16 before ``Bᵀ`` and overflowed where PEFT's
  ``((x Aᵀ) Bᵀ) · s`` does not;
- a double backward silently returned wrong values instead of raising;
- bf16 NF4/QLoRA under the Triton interpreter returned garbage.
"""
import pytest
import torch

from fastpeft.ops import lora_linear, nf4_linear, qlora_linear
from fastpeft.quant.nf4 import NF4Weight
from numerics import assert_close_to_ref

BACKENDS = ["cpu", "triton"]


def nf4_weight(n, k, dtype=torch.float32):
    return NF4Weight.from_float((torch.randn(n, k) * 0.05).to(dtype), blocksize=64)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
@pytest.mark.parametrize("m", [3, 37])  # the GEMV and the tl.dot kernel
def test_nf4_and_qlora_honour_the_bias_strides(backend, layout, m):
    n, k, r = 40, 128, 4
    w = nf4_weight(n, k)
    dense = w.dequantize(torch.float32)
    bias = torch.randn(2 * n)[::2] if layout == "strided" else torch.randn(1).expand(n)
    assert not bias.is_contiguous()
    x = torch.randn(m, k)
    ref = x.double() @ dense.double().T + bias.double()
    assert_close_to_ref(nf4_linear(x, w, bias), ref, x @ dense.T + bias)
    a, b = torch.randn(r, k) * 0.1, torch.randn(n, r) * 0.1
    lora = (x.double() @ a.double().T) @ b.double().T * 2.0
    assert_close_to_ref(qlora_linear(x, w, a, b, 2.0, bias=bias), ref + lora,
                        x @ dense.T + bias + (x @ a.T) @ b.T * 2.0)


def _overflowing_lora(dtype):
    """x Aᵀ = 2000 and s = 64: s · (x Aᵀ) = 128000 overflows fp16; ((x Aᵀ) Bᵀ) · s = 128 does not."""
    k, n = 16, 24
    x = torch.full((2, k), 125.0, dtype=dtype, requires_grad=True)
    lora_A = torch.ones(1, k, dtype=dtype, requires_grad=True)
    lora_B = torch.full((n, 1), 1e-3, dtype=dtype, requires_grad=True)
    return x, lora_A, lora_B, 64.0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fp16_lora_scaling_cannot_overflow(backend):
    x, lora_A, lora_B, s = _overflowing_lora(torch.float16)
    weight = torch.zeros(lora_B.shape[0], x.shape[1], dtype=torch.float16)
    y = lora_linear(x, weight, lora_A, lora_B, s)
    peft_order = ((x.double() @ lora_A.double().T) @ lora_B.double().T) * s
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), peft_order, rtol=2e-3, atol=0)
    # Every true gradient fits fp16 for dy = 0.1 (dB = s · dyᵀ (x Aᵀ) = 25600): none may overflow either.
    y.backward(torch.full_like(y, 0.1))
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B)]
    (((leaves[0] @ leaves[1].T) @ leaves[2].T) * s).backward(torch.full(y.shape, 0.1, dtype=torch.float64))
    for got, ref in zip((x.grad, lora_A.grad, lora_B.grad), leaves):
        torch.testing.assert_close(got.double(), ref.grad, rtol=5e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fp16_qlora_scaling_cannot_overflow(backend):
    x, lora_A, lora_B, s = _overflowing_lora(torch.float16)
    n, k = lora_B.shape[0], 64
    x = torch.full((2, k), 125.0 / 4, dtype=torch.float16, requires_grad=True)  # x Aᵀ = 2000 again
    lora_A = torch.ones(1, k, dtype=torch.float16, requires_grad=True)
    w = NF4Weight.from_float(torch.zeros(n, k, dtype=torch.float16), blocksize=64)
    y = qlora_linear(x, w, lora_A, lora_B, s)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), torch.full((2, n), 128.0, dtype=torch.float64), rtol=2e-3, atol=0)


def _double_backward(y, x):
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_double_backward_raises_instead_of_returning_wrong_values(backend):
    """NF4 has no second derivatives and raises; LoRA and QLoRA have them (values checked against PEFT in
    tests/ops/test_lora_higher_order.py)."""
    n, k, r = 8, 64, 2
    x = torch.randn(3, k, requires_grad=True)
    a, b = torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    w = nf4_weight(n, k)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        _double_backward(nf4_linear(x, w), x)
    for y in (lora_linear(x, torch.randn(n, k), a, b, 2.0), qlora_linear(x, w, a, b, 2.0)):
        x.grad = None
        _double_backward(y, x)
        assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_bf16_qlora_on_triton_matches_float64(backend):
    """Under the interpreter the shared ``mma`` multiplies bf16 in fp32 (its bf16 tl.dot is wrong)."""
    n, k, r, s = 40, 128, 5, 1.5
    w = nf4_weight(n, k, torch.bfloat16)
    dense = w.dequantize(torch.float32)
    x = torch.randn(9, k, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(r, k) * 0.1).bfloat16().requires_grad_()
    b = (torch.randn(n, r) * 0.1).bfloat16().requires_grad_()
    y = qlora_linear(x, w, a, b, s)
    dy = torch.randn_like(y)
    y.backward(dy)

    def math(x, a, b, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, a, b)]
        out = leaves[0] @ dense.to(dtype).T + ((leaves[0] @ leaves[1].T) @ leaves[2].T) * s
        out.backward(dy.to(dtype))
        return out, leaves

    y64, ref = math(x, a, b, torch.float64)
    yt, peer = math(x, a, b, torch.bfloat16)
    assert_close_to_ref(y, y64, yt, what="y")
    for name, got, r64, rt in zip(("dx", "dA", "dB"), (x.grad, a.grad, b.grad), ref, peer):
        assert torch.isfinite(got).all(), name
        assert_close_to_ref(got, r64.grad, rt.grad, what=name)
