"""The Triton QLoRA launchers (``fastpeft.kernels.qlora``) under the interpreter against float64.

LoRA's orchestration around the NF4 kernels: forward ``x Wᵀ + b + s · h Bᵀ``
and every gradient, with and without dropout, checked against the same math
in float64 on the bitsandbytes-compatible dequantized weight.
"""
import pytest
import torch

from fastpeft.kernels import lora as tl_lora
from fastpeft.kernels import qlora as K
from fastpeft.quant.nf4 import NF4Weight
from lane_device import lane_device
from numerics import assert_close_to_ref

SEED = 2**33 + 7


def math(x, w, bias, a, b, dy, s, keep, p):
    """y and the grads of x, A, B in x's dtype (torch peer) or float64 (reference)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    xr, ar, br = leaves
    dropped = xr if keep is None else xr * keep.to(xr.dtype) / (1 - p)
    y = xr @ w.to(xr.dtype).T + bias.to(xr.dtype) + ((dropped @ ar.T) @ br.T) * s
    y.backward(dy.to(xr.dtype))
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,p", [(3, 0.0), (37, 0.0), (37, 0.25)])
def test_forward_and_grads_match_float64(dtype, m, p):
    n, k, r, s = 40, 128, 5, 1.5
    weight = NF4Weight.from_float(torch.randn(n, k) * 0.05, blocksize=64)
    dense = weight.dequantize(torch.float32)
    state = (weight.packed, weight.absmax_float(), weight.code, n, k, 64)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    a, b = (torch.randn(r, k) * 0.1).to(dtype), (torch.randn(n, r) * 0.1).to(dtype)
    dy = torch.randn(m, n).to(dtype)
    y, h = K.qlora_forward(x, *state, bias, a, b, s, p, SEED)
    dx, dA, dB = K.qlora_backward(dy, x, *state, a, b, h, s, p, SEED, True, True, True)
    keep = tl_lora.dropout_mask((m, k), p, SEED, lane_device()) if p > 0 else None
    y64, ref = math(x.double(), dense.double(), bias.double(), a.double(), b.double(), dy.double(), s, keep, p)
    yt, peer = math(x, dense, bias, a, b, dy, s, keep, p)
    assert_close_to_ref(y, y64, yt, what="y")
    for name, got, r64, rt in zip(("dx", "dA", "dB"), (dx, dA, dB), ref, peer):
        assert got.dtype == dtype
        assert_close_to_ref(got, r64, rt, what=name)


def test_only_requested_gradients():
    n, k, r = 16, 64, 2
    weight = NF4Weight.from_float(torch.randn(n, k), blocksize=64)
    state = (weight.packed, weight.absmax_float(), weight.code, n, k, 64)
    x, dy = torch.randn(4, k), torch.randn(4, n)
    a, b = torch.randn(r, k), torch.randn(n, r)
    _, h = K.qlora_forward(x, *state, None, a, b, 1.0, 0.0, 0)
    dx, dA, dB = K.qlora_backward(dy, x, *state, a, b, h, 1.0, 0.0, 0, False, True, False)
    assert dx is None and dB is None and dA.shape == a.shape
