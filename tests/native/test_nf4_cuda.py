"""CUDA NF4 kernels of the native extension (dequantize, decode GEMV). Need a GPU: skipped without one.

Without a GPU the CUDA extension is still compiled, linked and imported by
test_native_build.py; the element arithmetic is the shared header's, tested
through the CPU build in test_nf4_codec_header.py.

Weights are quantized and the float64 references computed on the host (named,
so the GPU lane's CUDA default device does not move them); results are compared
on the GPU that computed them.
"""
import pytest
import torch
import torch.nn.functional as F

from fastpeft import _native
from fastpeft.quant.nf4 import NF4Weight
from numerics import assert_close_to_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HOST = torch.device("cpu")  # where the weights are quantized and the references computed


@pytest.fixture(scope="module")
def ops():
    _native.load_cuda()
    return torch.ops.fastpeft_native


@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (129, 257), (256, 4096)])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_bit_exact(ops, shape, blocksize, dtype):
    w = NF4Weight.from_float(torch.randn(shape, device=HOST), blocksize, double_quant=True)
    ref = w.dequantize(dtype)
    g = w.to("cuda")
    out = ops.nf4_dequantize(g.packed, g.absmax_float(), g.numel, blocksize, dtype)
    assert torch.equal(out.reshape(shape), ref.to(out.device))


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n, k, blocksize", [(1, 64, 64), (67, 320, 64), (4096, 4096, 64), (33, 8192, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_against_float64(ops, m, n, k, blocksize, dtype):
    w = NF4Weight.from_float(torch.randn(n, k, device=HOST) * 0.05, blocksize)
    x = torch.randn(m, k, device=HOST).to(dtype)
    bias = torch.randn(n, device=HOST).to(dtype)
    ref = F.linear(x.double(), w.dequantize(torch.float64), bias.double())
    g = w.to("cuda")
    y = ops.nf4_matmul(x.cuda(), g.packed, g.absmax_float(), n, k, blocksize, bias.cuda())
    torch_out = F.linear(x.cuda(), g.dequantize(dtype), bias.cuda())
    assert y.dtype == dtype
    assert_close_to_ref(y, ref.to(y.device), torch_out, what=f"cuda nf4_matmul m={m} {dtype}")
    dy = torch.randn(m, n, device=HOST).to(dtype)
    dx = ops.nf4_matmul_transposed(dy.cuda(), g.packed, g.absmax_float(), n, k, blocksize)
    assert_close_to_ref(dx, (dy.double() @ w.dequantize(torch.float64)).to(dx.device), dy.cuda() @ g.dequantize(dtype),
                        what="cuda nf4_matmul_transposed")


def test_bad_input(ops):
    g = NF4Weight.from_float(torch.randn(16, 128, device=HOST)).to("cuda")
    with pytest.raises(ValueError, match="x"):
        ops.nf4_matmul(torch.randn(1, 128, device=HOST), g.packed, g.absmax_float(), 16, 128, 64, None)  # x on the CPU
    with pytest.raises(ValueError, match="bias is on cpu"):  # the M = 1 GEMV would read it on the GPU
        ops.nf4_matmul(torch.randn(1, 128, device="cuda"), g.packed, g.absmax_float(), 16, 128, 64,
                       torch.randn(16, device=HOST))
    with pytest.raises(ValueError, match="K"):
        ops.nf4_matmul(torch.randn(1, 96, device="cuda"), g.packed[:24], g.absmax_float()[:1], 1, 96, 64, None)
    with pytest.raises(TypeError, match="packed"):
        ops.nf4_dequantize(g.packed.to(torch.int8), g.absmax_float(), g.numel, 64, torch.float32)
