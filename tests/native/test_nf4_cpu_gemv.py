"""The fp32 NF4 decode GEMV (M <= 8 rows, csrc/cpu/nf4_gemv.cpp) at the edges of its AVX-512 step.

The AVX-512 kernel decodes 128 elements (64 bytes) of a row of W per step, in
spans that share a block scale (two 64-element blocks when blocksize is 64), so
the cases that matter are: K % 128 == 64 (a half group read with a masked load,
whose missing block must not borrow the next row's scale), long blocks
(blocksize 256..4096 over many steps), odd N, M = 1..8 (each M is its own
template; 9+ rows take another kernel), bias, bf16/fp16 activations, strided
x, and non-finite values. References are float64 on the same NF4 codes; the
budget is plain torch's error in the same dtype (tests/numerics.py) plus a floor
of 1e-6 (16 fp32 ulps): with a handful of outputs torch's own error can be a lucky
2e-8, while any wrong code, scale or skipped element costs 1e-3 or more. Outputs
are NaN-poisoned, so an element the kernel skips fails.
"""
import pytest
import torch
import torch.nn.functional as F

from fastpeft.cpu import nf4_native
from fastpeft.quant.nf4 import NF4Weight
from numerics import assert_close_to_ref

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

ERROR_FLOOR = 1e-6


def _weight(n, k, blocksize=64, double_quant=False):
    return NF4Weight.from_float(torch.randn(n, k) * 0.05, blocksize, double_quant=double_quant)


def _reference(x, w, bias=None):
    return F.linear(x.double(), w.dequantize(torch.float64), None if bias is None else bias.double())


def _check(x, w, bias=None):
    y = nf4_native.nf4_matmul(x, w, bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    torch_out = F.linear(x, w.dequantize(x.dtype), bias)
    assert_close_to_ref(y, _reference(x, w, bias), torch_out, tiny=ERROR_FLOOR,
                        what=f"gemv {tuple(x.shape)} W{tuple(w.shape)} {x.dtype}")


@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("n, k, blocksize", [
    (1, 64, 64),      # a single half group
    (3, 192, 64),     # one full group, then a half group
    (67, 320, 64),    # odd N, K % 128 == 64
    (5, 256, 128),
    (9, 1024, 256),   # spans of 2 steps
    (2, 4096, 4096),  # one span of 32 steps
    (7, 2048, 1024),
])
def test_shapes_blocksizes_and_rows(m, n, k, blocksize):
    torch.manual_seed(1000 * m + n)
    w = _weight(n, k, blocksize)
    _check(torch.randn(m, k), w, torch.randn(n))
    _check(torch.randn(m, k), w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_half_precision_activations(dtype, m):
    torch.manual_seed(m)
    w = _weight(33, 448)
    _check(torch.randn(m, 448).to(dtype), w, torch.randn(33).to(dtype))


@pytest.mark.parametrize("m", [1, 2, 5])
def test_double_quantized_scales(m):
    torch.manual_seed(m)
    w = _weight(40, 704, 64, double_quant=True)
    _check(torch.randn(m, 704), w, torch.randn(40))


def test_strided_activations():
    torch.manual_seed(0)
    w = _weight(21, 192)
    _check(torch.randn(384, 4).t()[:, ::2], w)          # (4, 192) with strides (1, 8)
    _check(torch.randn(2, 3, 384)[:, :, 1::2], w)       # step-2 last dim, leading dims
    _check(torch.randn(192, 1).t(), w)


def test_larger_weight_split_over_threads():
    torch.manual_seed(0)
    w = _weight(1000, 1088)   # 1088 = 8.5 groups of 128
    for m in (1, 4):
        _check(torch.randn(m, 1088), w, torch.randn(1000))


def test_half_group_never_reads_the_next_rows_scale():
    """K % 128 == 64: the last step's second block does not exist; row n + 1's NaN scale must not leak into row n."""
    n, k = 4, 192
    values = torch.randn(n, k) * 0.05
    values[1, 0] = float("nan")      # row 1, block 0: absmax NaN (bitsandbytes' bytes for a NaN block)
    w = NF4Weight.from_float(values, 64)
    assert w.absmax[3].isnan() and w.absmax[:3].isfinite().all()
    for m in (1, 2, 4, 8):
        x = torch.randn(m, k)
        y = nf4_native.nf4_matmul(x, w)
        assert y[:, 1].isnan().all()
        keep = [0, 2, 3]
        ref = _reference(x, w)[:, keep]
        assert y[:, keep].isfinite().all()
        assert torch.allclose(y[:, keep].double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [1, 3, 8])
def test_non_finite_activations_follow_the_float64_math(m):
    torch.manual_seed(m)
    w = _weight(9, 320)
    x = torch.randn(m, 320)
    x[0, 5] = float("nan")
    if m > 1:
        x[1, 200] = float("inf")    # inf · code 0.0 (index 7) is NaN, in float64 too
    if m > 2:
        x[2, 319] = -float("inf")   # the last element, inside the trailing half group
    y = nf4_native.nf4_matmul(x, w)
    ref = _reference(x, w)
    assert torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(y.isinf(), ref.isinf())
    assert torch.equal(y[y.isinf()].sign(), ref[ref.isinf()].sign().float())
    finite = ref.isfinite()
    assert torch.allclose(y[finite].double(), ref[finite], rtol=1e-5, atol=1e-6)
    assert y[0].isnan().all()      # a NaN activation poisons its whole output row, and only that row
    if m > 3:
        assert y[3:].isfinite().all()
