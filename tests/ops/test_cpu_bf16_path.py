"""The bf16 CPU path of the NF4 and QLoRA ops (fastpeft.cpu.nf4_native's bf16 GEMM path), end to end.

bf16 inputs with enough rows run the fused AMX kernel or torch's bf16 GEMM on
the weight dequantized to bf16 (``nf4_native.bf16_forward_kernel``); fewer rows
keep the fused fp32 decode GEMV. Either way the output and every gradient must
be within the numerics policy (error vs float64 at most 4x plain torch bf16's,
``numerics.assert_close_to_ref``), and
the forward of the GEMM path is bit-equal to torch on the dequantized weight
where it runs (the fused AMX kernel's sums run in another order).
"""
import pytest
import torch
import torch.nn.functional as F

from fastpeft.ops.lora import lora_dropout_mask
from fastpeft.ops.nf4 import nf4_linear
from fastpeft.ops.qlora import qlora_linear
from fastpeft.cpu import nf4_native
from fastpeft.quant.nf4 import NF4Weight
from lane_device import lane_device, op_seed_draw
from numerics import assert_close_to_ref

BF16 = torch.bfloat16


def _leaves(*tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def _check(out, leaves, ref_fn, dy):
    """out/leaves from fastpeft; ref_fn(*leaves) builds the same math (float64 reference and torch bf16)."""
    ref_leaves, torch_leaves = _leaves(*leaves, dtype=torch.float64), _leaves(*leaves, dtype=BF16)
    ref, torch_out = ref_fn(*ref_leaves), ref_fn(*torch_leaves)
    ref.backward(dy.double())
    torch_out.backward(dy)
    assert_close_to_ref(out, ref, torch_out, what="y")
    for i, (got, r, t) in enumerate(zip(leaves, ref_leaves, torch_leaves)):
        assert got.grad is not None and got.grad.dtype == BF16, f"grad {i}"
        assert_close_to_ref(got.grad, r.grad, t.grad, what=f"grad of input {i}")


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
@pytest.mark.parametrize("m", [1, 3, 4, 8, 9, 64])
def test_nf4_linear_bf16(backend, m):
    n, k = 96, 320
    w = NF4Weight.from_float(torch.randn(n, k) * 0.05, 64, double_quant=True)
    dense64 = w.dequantize(torch.float64)
    x = torch.randn(2, m, k).to(BF16).requires_grad_()
    bias = torch.randn(n).to(BF16).requires_grad_()
    y = nf4_linear(x, w, bias)
    assert y.dtype == BF16 and y.shape == (2, m, n)
    if nf4_native.bf16_forward_kernel(x.view(-1, k)) == "nf4_matmul_bf16":
        assert torch.equal(y, F.linear(x, w.dequantize(BF16), bias))
    dy = torch.randn_like(y)
    y.backward(dy)
    _check(y, [x, bias], lambda x_, b_: F.linear(x_, dense64.to(x_.dtype), b_), dy)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
@pytest.mark.parametrize("m", [1, 5, 9, 12, 64, 300])
def test_qlora_linear_bf16(backend, m):
    n, k, r, s = 80, 256, 8, 2.0
    w = NF4Weight.from_float(torch.randn(n, k) * 0.05, 64)
    dense64 = w.dequantize(torch.float64)
    a = (torch.randn(r, k) / k**0.5).to(BF16).requires_grad_()
    b = (torch.randn(n, r) * 0.1).to(BF16).requires_grad_()
    bias = torch.randn(n).to(BF16).requires_grad_()
    x = torch.randn(m, k).to(BF16).requires_grad_()
    y = qlora_linear(x, w, a, b, s, bias)
    dy = torch.randn_like(y)
    y.backward(dy)

    def math(x_, a_, b_, bias_):
        return F.linear(x_, dense64.to(x_.dtype), bias_) + s * (x_ @ a_.t()) @ b_.t()

    _check(y, [x, a, b, bias], math, dy)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_qlora_linear_bf16_dropout(backend):
    n, k, r, s, p = 64, 192, 4, 0.5, 0.25
    w = NF4Weight.from_float(torch.randn(n, k) * 0.05, 64)
    dense64 = w.dequantize(torch.float64)
    a = (torch.randn(r, k) / k**0.5).to(BF16).requires_grad_()
    b = (torch.randn(n, r) * 0.1).to(BF16).requires_grad_()
    x = torch.randn(3, 7, k).to(BF16).requires_grad_()
    torch.manual_seed(7)
    seed = op_seed_draw()  # the draw qlora_linear makes
    torch.manual_seed(7)
    y = qlora_linear(x, w, a, b, s, dropout_p=p, training=True)
    keep = lora_dropout_mask((21, k), p, seed, lane_device()).view(3, 7, k)
    assert 0.6 < keep.float().mean() < 0.9
    dy = torch.randn_like(y)
    y.backward(dy)

    def math(x_, a_, b_):
        return F.linear(x_, dense64.to(x_.dtype)) + s * ((x_ * keep / (1 - p)) @ a_.t()) @ b_.t()

    _check(y, [x, a, b], math, dy)
