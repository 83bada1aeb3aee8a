"""Fused CPU NF4 matmuls (C++) against float64 references, within the error budget of docs/architecture.md.

ref = the same math in float64 (x and the exactly dequantized weight in float64);
the budget is c x the error of plain torch in the same dtype (x @ dequant(W)ᵀ).
Outputs of the extension are NaN-poisoned, so an element a kernel skips fails.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpeft.cpu import nf4_native
from fastpeft.quant.nf4 import NF4Weight
from numerics import assert_close_to_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Floor of the error budget (16 fp32 ulps): over a handful of outputs torch's own fp32 error is sometimes a lucky
# 2e-8, and c x that failed about 1 random small shape in 100 (before and after the AVX-512 GEMV alike); a wrong
# code, scale or element costs 1e-3 or more.
ERROR_FLOOR = 1e-6


pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _weight(n, k, blocksize=64, double_quant=False):
    return NF4Weight.from_float(torch.randn(n, k) * 0.05, blocksize, double_quant=double_quant)


def _check_forward(x, w, bias=None):
    y = nf4_native.nf4_matmul(x, w, bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    ref = F.linear(x.double(), w.dequantize(torch.float64), None if bias is None else bias.double())
    torch_out = F.linear(x, w.dequantize(x.dtype), bias)
    assert_close_to_ref(y, ref, torch_out, tiny=ERROR_FLOOR, what=f"nf4_matmul M={x.shape[:-1]} {x.dtype}")


def _check_transposed(dy, w):
    dx = nf4_native.nf4_matmul_transposed(dy, w)
    assert dx.dtype == dy.dtype and dx.shape == (*dy.shape[:-1], w.shape[1])
    ref = dy.double() @ w.dequantize(torch.float64)
    torch_out = dy @ w.dequantize(dy.dtype)
    assert_close_to_ref(dx, ref, torch_out, tiny=ERROR_FLOOR, what=f"nf4_matmul_transposed M={dy.shape[:-1]} {dy.dtype}")


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_transposed_over_m(m, dtype):
    torch.manual_seed(m)
    w = _weight(67, 320)
    _check_forward(torch.randn(m, 320).to(dtype), w, torch.randn(67).to(dtype))
    _check_forward(torch.randn(m, 320).to(dtype), w)
    _check_transposed(torch.randn(m, 67).to(dtype), w)


@pytest.mark.parametrize("n, k, blocksize", [(1, 64, 64), (5, 128, 128), (130, 192, 64), (17, 4096, 4096),
                                             (33, 2048, 1024), (3, 512, 256)])
@pytest.mark.parametrize("m", [1, 6, 20])
def test_shapes_and_blocksizes(n, k, blocksize, m):
    torch.manual_seed(n * k + m)
    w = _weight(n, k, blocksize)
    _check_forward(torch.randn(m, k), w, torch.randn(n))
    _check_transposed(torch.randn(m, n), w)


@pytest.mark.parametrize("m", [1, 12])
def test_double_quantized_weight(m):
    w = _weight(96, 512, 64, double_quant=True)
    _check_forward(torch.randn(m, 512), w, torch.randn(96))
    _check_transposed(torch.randn(m, 96), w)


def test_leading_batch_dims_and_non_contiguous_inputs():
    w = _weight(40, 256)
    _check_forward(torch.randn(2, 3, 256), w, torch.randn(40))
    _check_forward(torch.randn(512, 5)[:256].t(), w)          # (5, 256) with strides (1, 5)
    _check_forward(torch.randn(3, 2, 512)[:, :, ::2], w)      # step-2 last dim
    _check_transposed(torch.randn(4, 1, 40), w)
    _check_transposed(torch.randn(80, 9)[::2].t(), w)         # (9, 40) non-contiguous
    big = torch.randn(11, 512)[:, ::2]
    _check_forward(big, w)


def test_empty_rows():
    w = _weight(8, 64)
    assert nf4_native.nf4_matmul(torch.randn(0, 64), w).shape == (0, 8)
    assert nf4_native.nf4_matmul_transposed(torch.randn(0, 8), w).shape == (0, 64)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 70), k_blocks=st.integers(1, 6),
       blocksize=st.sampled_from([64, 128]), dtype=st.sampled_from(DTYPES), with_bias=st.booleans())
def test_property_random_shapes(m, n, k_blocks, blocksize, dtype, with_bias):
    k = k_blocks * blocksize
    w = _weight(n, k, blocksize)
    bias = torch.randn(n).to(dtype) if with_bias else None
    _check_forward(torch.randn(m, k).to(dtype), w, bias)
    _check_transposed(torch.randn(m, n).to(dtype), w)


def _w():
    return _weight(16, 128)


@pytest.mark.parametrize("call, exc, name", [
    (lambda: nf4_native.nf4_matmul(torch.randn(2, 128), torch.randn(16, 128)), TypeError, "w"),
    (lambda: nf4_native.nf4_matmul(torch.randn(2, 128).double(), _w()), TypeError, "x"),
    (lambda: nf4_native.nf4_matmul(torch.randn(2, 127), _w()), ValueError, "x"),
    (lambda: nf4_native.nf4_matmul(torch.randn(2, 128, device="meta"), _w()), ValueError, "x"),
    (lambda: nf4_native.nf4_matmul([1.0], _w()), TypeError, "x"),
    (lambda: nf4_native.nf4_matmul(torch.randn(2, 128), _w(), torch.randn(15)), ValueError, "bias"),
    (lambda: nf4_native.nf4_matmul(torch.randn(2, 128), _w(), torch.randn(16).half()), TypeError, "bias"),
    (lambda: nf4_native.nf4_matmul(torch.randn(2, 128), _w(), [0.0] * 16), TypeError, "bias"),
    (lambda: nf4_native.nf4_matmul(torch.randn(2, 96), _weight(4, 96)), ValueError, "blocksize"),
    (lambda: nf4_native.nf4_matmul(torch.randn(2, 64), NF4Weight.from_float(torch.randn(64))), ValueError, "w"),
    (lambda: nf4_native.nf4_matmul(torch.randn(2, 128), _w().to("meta")), ValueError, "w"),
    (lambda: nf4_native.nf4_matmul_transposed(torch.randn(2, 15), _w()), ValueError, "dy"),
    (lambda: nf4_native.nf4_matmul_transposed(torch.randn(2, 16).to(torch.int32), _w()), TypeError, "dy"),
    (lambda: nf4_native.nf4_matmul_transposed(torch.randn(2, 16), None), TypeError, "w"),
])
def test_bad_input(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_native_op_rejects_bad_shapes():
    """The C++ checks stand even when the Python wrapper is bypassed."""
    w = _w()
    op = torch.ops.fastpeft_native.nf4_matmul
    with pytest.raises(ValueError, match="K"):
        op(torch.randn(2, 96), w.packed[:48], w.absmax[:2], 1, 96, 64, None)
    with pytest.raises(ValueError, match="x"):
        op(torch.randn(2, 1, 128), w.packed, w.absmax, 16, 128, 64, None)
    with pytest.raises(ValueError, match="x"):
        op(torch.randn(2, 64), w.packed, w.absmax, 16, 128, 64, None)
    with pytest.raises(ValueError, match="absmax"):
        op(torch.randn(2, 128), w.packed, w.absmax[:5], 16, 128, 64, None)
    with pytest.raises(ValueError, match="bias"):
        op(torch.randn(2, 128), w.packed, w.absmax, 16, 128, 64, torch.randn(3))
    with pytest.raises(ValueError, match="dy"):
        torch.ops.fastpeft_native.nf4_matmul_transposed(torch.randn(2, 3), w.packed, w.absmax, 16, 128, 64)
