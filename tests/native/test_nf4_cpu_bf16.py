"""bf16 CPU NF4 path (csrc/cpu/nf4_bf16.cpp): bf16 tile dequantization and the bf16 matmuls built on it.

The tile must be bit-equal to ``NF4Weight.dequantize(torch.bfloat16)`` (fp32
``code · absmax`` rounded to nearest-even, NaN kept, subnormals kept), so the
matmuls are torch's own bf16 GEMM on the exactly dequantized weight: bit-equal
to ``F.linear`` where W fits one tile, and within the float64-referenced
budget (``numerics.assert_close_to_ref``) everywhere. Outputs are NaN-poisoned.
"""
import pytest
import torch
import torch.nn.functional as F

from fastpeft import _native
from fastpeft.cpu import nf4_native
from fastpeft.quant.nf4 import NF4Weight
from numerics import assert_close_to_ref

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def ops():
    _native.load_cpu()
    return torch.ops.fastpeft_native


def _weight(n, k, blocksize=64, double_quant=False, scale=0.05):
    return NF4Weight.from_float(torch.randn(n, k) * scale, blocksize, double_quant=double_quant)


def _bits(t):
    return t.view(torch.int16)


@pytest.mark.parametrize("n, k, blocksize, double_quant", [(1, 64, 64, False), (67, 320, 64, True),
                                                           (5, 4096, 4096, False), (33, 2048, 1024, True),
                                                           (130, 192, 64, False), (3, 512, 256, True)])
def test_tile_is_bit_equal_to_dequantize(n, k, blocksize, double_quant):
    w = _weight(n, k, blocksize, double_quant)
    absmax = w.absmax_float()
    full = w.dequantize(torch.bfloat16)
    tile = ops().nf4_dequantize_bf16_tile(w.packed, absmax, n, k, blocksize, 0, n, 0, k)
    assert torch.equal(_bits(tile), _bits(full))
    # a sub-tile: rows and 64-aligned columns inside, not on block edges for large blocks
    r0, r1 = n // 3, n - n // 4
    c0, c1 = (64, k - 64) if k >= 192 else (0, k)
    sub = ops().nf4_dequantize_bf16_tile(w.packed, absmax, n, k, blocksize, r0, r1, c0, c1)
    assert sub.shape == (r1 - r0, c1 - c0)
    assert torch.equal(_bits(sub), _bits(full[r0:r1, c0:c1]))


def test_tile_rounding_of_special_scales():
    """NaN/inf/zero/subnormal/huge block scales round exactly as torch's fp32 -> bf16 cast; NaN stays NaN."""
    n, k = 8, 128
    w = _weight(n, k)
    specials = torch.tensor([float("nan"), float("inf"), 0.0, 1e-40, 3e-39, 3.0e38, -0.0, 1.7], dtype=torch.float32)
    absmax = specials.repeat_interleave(2)  # two blocks per row
    codes = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                          -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                          0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                          0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
    nibbles = torch.stack([w.packed.view(-1) >> 4, w.packed.view(-1) & 0xF], dim=1).reshape(n, k).long()
    expected = (codes[nibbles] * absmax.repeat_interleave(64).view(n, k)).to(torch.bfloat16)
    tile = ops().nf4_dequantize_bf16_tile(w.packed, absmax, n, k, 64, 0, n, 0, k)
    nan = expected.isnan()
    # a NaN scale, and an inf scale times code 0, give NaN (whose bits torch's vectorised cast may choose)
    assert nan[0].all() and torch.equal(nan[1], nibbles[1] == 7) and not nan[2:].any()
    assert torch.equal(tile.isnan(), nan)
    assert torch.equal(_bits(tile)[~nan], _bits(expected)[~nan])
    assert (tile[3:5].abs() < 1.2e-38).all() and (tile[3:5] != 0).any()  # subnormal products kept, not flushed


@pytest.mark.parametrize("args, match", [((0, 9, 0, 128), "rows"), ((2, 1, 0, 128), "rows"),
                                         ((0, 8, 0, 192), "columns"), ((0, 8, 32, 128), "multiples of 64"),
                                         ((0, 8, 0, 96), "multiples of 64")])
def test_tile_rejects_bad_ranges(args, match):
    w = _weight(8, 128)
    with pytest.raises(ValueError, match=match):
        ops().nf4_dequantize_bf16_tile(w.packed, w.absmax_float(), 8, 128, 64, *args)


@pytest.mark.parametrize("m", [1, 5, 9, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmuls_bit_equal_to_torch_on_one_tile(m, with_bias):
    n, k = 67, 320
    w = _weight(n, k, double_quant=True)
    dense = w.dequantize(torch.bfloat16)
    x = torch.randn(m, k).bfloat16()
    bias = torch.randn(n).bfloat16() if with_bias else None
    y = ops().nf4_matmul_bf16(x, w.packed, w.absmax_float(), n, k, 64, bias)
    assert y.dtype == torch.bfloat16 and torch.equal(_bits(y), _bits(F.linear(x, dense, bias)))
    dy = torch.randn(m, n).bfloat16()
    dx = ops().nf4_matmul_transposed_bf16(dy, w.packed, w.absmax_float(), n, k, 64)
    assert dx.dtype == torch.bfloat16 and torch.equal(_bits(dx), _bits(dy @ dense))


def test_matmuls_over_several_tiles():
    """W above one 16 MiB bf16 tile: the forward splits N into row tiles, the input gradient K into column tiles."""
    n, k = 4160, 2112  # 8.8 M elements: two tiles either way, the last one partial
    w = nf4_native.quantize(torch.randn(n, k) * 0.05, 64)
    x, dy, bias = torch.randn(11, k).bfloat16(), torch.randn(11, n).bfloat16(), torch.randn(n).bfloat16()
    dense64 = w.dequantize(torch.float64)
    dense = w.dequantize(torch.bfloat16)
    y = ops().nf4_matmul_bf16(x, w.packed, w.absmax_float(), n, k, 64, bias)
    assert_close_to_ref(y, F.linear(x.double(), dense64, bias.double()), F.linear(x, dense, bias), what="y")
    dx = ops().nf4_matmul_transposed_bf16(dy, w.packed, w.absmax_float(), n, k, 64)
    assert_close_to_ref(dx, dy.double() @ dense64, dy @ dense, what="dx")


def test_matmuls_take_views_and_empty_inputs():
    n, k = 40, 256
    w = _weight(n, k)
    dense = w.dequantize(torch.bfloat16)
    x = torch.randn(2 * k, 12).bfloat16().t()[:, ::2]  # non-contiguous [12, k]
    assert not x.is_contiguous()
    y = ops().nf4_matmul_bf16(x, w.packed, w.absmax_float(), n, k, 64, None)
    assert torch.equal(_bits(y), _bits(F.linear(x.contiguous(), dense)))
    assert ops().nf4_matmul_bf16(x[:0], w.packed, w.absmax_float(), n, k, 64, None).shape == (0, n)
    assert ops().nf4_matmul_transposed_bf16(torch.randn(0, n).bfloat16(), w.packed, w.absmax_float(), n, k,
                                            64).shape == (0, k)


@pytest.mark.parametrize("bad", ["x_dtype", "bias_dtype", "bias_shape", "x_cols", "k_blocksize"])
def test_matmul_rejects_bad_input(bad):
    n, k = 16, 128
    w = _weight(n, k)
    x, bias, kk = torch.randn(3, k).bfloat16(), torch.randn(n).bfloat16(), k
    error = TypeError if bad.endswith("dtype") else ValueError
    if bad == "x_dtype":
        x = x.float()
    elif bad == "bias_dtype":
        bias = bias.float()
    elif bad == "bias_shape":
        bias = bias[:-1]
    elif bad == "x_cols":
        x = x[:, :-64]
    else:
        kk = 96  # not a multiple of the blocksize
    with pytest.raises(error):
        ops().nf4_matmul_bf16(x, w.packed, w.absmax_float(), n, kk, 64, bias)
    if bad in ("x_dtype", "x_cols"):
        dy = torch.randn(3, n) if bad == "x_dtype" else torch.randn(3, n - 1).bfloat16()
        with pytest.raises(error):
            ops().nf4_matmul_transposed_bf16(dy, w.packed, w.absmax_float(), n, k, 64)


needs_amx = pytest.mark.skipif(not nf4_native.amx_available(), reason="no AMX-BF16 on this CPU/OS/build")


@needs_amx
@pytest.mark.parametrize("n, k, blocksize, m", [(67, 320, 64, 5), (130, 192, 64, 33), (32, 64, 64, 1),
                                                (17, 4096, 4096, 16), (96, 2048, 1024, 47), (1, 128, 128, 70)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_amx_matmul(n, k, blocksize, m, with_bias):
    """Odd N and M (partial tiles of both), several blocksizes: within budget of torch bf16 on the same weight."""
    w = _weight(n, k, blocksize, double_quant=True)
    x = torch.randn(m, k).bfloat16()
    bias = torch.randn(n).bfloat16() if with_bias else None
    y = ops().nf4_matmul_bf16_amx(x, w.packed, w.absmax_float(), n, k, blocksize, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    ref = F.linear(x.double(), w.dequantize(torch.float64), None if bias is None else bias.double())
    assert_close_to_ref(y, ref, F.linear(x, w.dequantize(torch.bfloat16), bias), what="amx y")


@needs_amx
def test_amx_matmul_views_empty_and_bad_input():
    n, k = 40, 256
    w = _weight(n, k)
    x = torch.randn(2 * k, 12).bfloat16().t()[:, ::2]  # non-contiguous [12, k]
    y = ops().nf4_matmul_bf16_amx(x, w.packed, w.absmax_float(), n, k, 64, None)
    torch.testing.assert_close(y, ops().nf4_matmul_bf16_amx(x.contiguous(), w.packed, w.absmax_float(), n, k, 64,
                                                            None), rtol=0, atol=0)
    assert ops().nf4_matmul_bf16_amx(x[:0], w.packed, w.absmax_float(), n, k, 64, None).shape == (0, n)
    with pytest.raises(TypeError):
        ops().nf4_matmul_bf16_amx(x.float(), w.packed, w.absmax_float(), n, k, 64, None)
    with pytest.raises(ValueError):
        ops().nf4_matmul_bf16_amx(x, w.packed, w.absmax_float(), n, k, 64, torch.randn(n + 1).bfloat16())


@needs_amx
@pytest.mark.parametrize("n, k, blocksize, m", [(67, 320, 64, 5), (130, 192, 64, 33), (31, 64, 64, 1),
                                                (17, 4096, 4096, 16), (96, 2048, 1024, 47), (1, 128, 128, 70)])
def test_amx_input_grad(n, k, blocksize, m):
    """Odd N (an unpaired last row, a partial 32-row chunk) and odd M: within budget of torch bf16."""
    w = _weight(n, k, blocksize, double_quant=True)
    dy = torch.randn(m, n).bfloat16()
    dx = ops().nf4_matmul_transposed_bf16_amx(dy, w.packed, w.absmax_float(), n, k, blocksize)
    assert dx.dtype == torch.bfloat16 and dx.shape == (m, k)
    assert_close_to_ref(dx, dy.double() @ w.dequantize(torch.float64), dy @ w.dequantize(torch.bfloat16), what="dx")


@needs_amx
def test_amx_input_grad_views_empty_and_bad_input():
    n, k = 40, 256
    w = _weight(n, k)
    dy = torch.randn(2 * n, 12).bfloat16().t()[:, ::2]  # non-contiguous [12, n]
    dx = ops().nf4_matmul_transposed_bf16_amx(dy, w.packed, w.absmax_float(), n, k, 64)
    assert torch.equal(dx, ops().nf4_matmul_transposed_bf16_amx(dy.contiguous(), w.packed, w.absmax_float(), n, k, 64))
    assert ops().nf4_matmul_transposed_bf16_amx(dy[:0], w.packed, w.absmax_float(), n, k, 64).shape == (0, k)
    with pytest.raises(TypeError):
        ops().nf4_matmul_transposed_bf16_amx(dy.float(), w.packed, w.absmax_float(), n, k, 64)
    with pytest.raises(ValueError):
        ops().nf4_matmul_transposed_bf16_amx(dy[:, :-1], w.packed, w.absmax_float(), n, k, 64)


def test_kernel_choice_by_rows():
    assert nf4_native.bf16_forward_kernel(torch.zeros(100, 64)) is None  # fp32: the fp32 kernels
    assert nf4_native.bf16_forward_kernel(torch.zeros(1, 64).bfloat16()) is None
    big = nf4_native.bf16_forward_kernel(torch.zeros(nf4_native.BF16_GEMM_MIN_ROWS, 64).bfloat16())
    assert big == ("nf4_matmul_bf16_amx" if nf4_native.amx_available() else "nf4_matmul_bf16")
    assert nf4_native.bf16_input_grad_kernel(torch.zeros(1, 64).bfloat16()) is None
    grad = nf4_native.bf16_input_grad_kernel(torch.zeros(nf4_native.BF16_GEMM_MIN_ROWS_TRANSPOSED, 64).bfloat16())
    assert grad == ("nf4_matmul_transposed_bf16_amx" if nf4_native.amx_available() else "nf4_matmul_transposed_bf16")
    above = torch.zeros(nf4_native.BF16_AMX_MAX_ROWS + 1, 64).bfloat16()
    assert nf4_native.bf16_forward_kernel(above) == "nf4_matmul_bf16"
    assert nf4_native.bf16_input_grad_kernel(above) == "nf4_matmul_transposed_bf16"


@pytest.mark.parametrize("m", [1, 4, 6, 8, 9, 12, 40])
def test_python_entry_points_route_bf16(m, monkeypatch):
    """nf4_native.nf4_matmul / nf4_matmul_transposed in bf16 (leading dims) run the chosen op, within budget."""
    n, k = 72, 384
    w = _weight(n, k, double_quant=True)
    dense, dense64 = w.dequantize(torch.bfloat16), w.dequantize(torch.float64)
    called = []
    real_op = _native.op
    monkeypatch.setattr(nf4_native._native, "op", lambda name, *a: called.append(name) or real_op(name, *a))
    x = torch.randn(1, m, k).bfloat16()
    y = nf4_native.nf4_matmul(x, w)
    assert called == [nf4_native.forward_kernel(x.view(m, k))]
    assert y.shape == (1, m, n) and y.dtype == torch.bfloat16
    assert_close_to_ref(y, F.linear(x.double(), dense64), F.linear(x, dense), what="y")
    called.clear()
    dy = torch.randn(1, m, n).bfloat16()
    dx = nf4_native.nf4_matmul_transposed(dy, w)
    assert called == [nf4_native.bf16_input_grad_kernel(dy.view(m, n)) or "nf4_matmul_transposed"]
    assert dx.shape == (1, m, k) and dx.dtype == torch.bfloat16
    assert_close_to_ref(dx, dy.double() @ dense64, dy @ dense, what="dx")
    if called == ["nf4_matmul_transposed_bf16"]:
        assert torch.equal(_bits(dx), _bits(dy @ dense))


def test_kernel_choice_without_amx(monkeypatch):
    monkeypatch.setattr(nf4_native, "amx_available", lambda: False)
    rows = nf4_native.BF16_GEMM_MIN_ROWS
    assert nf4_native.bf16_forward_kernel(torch.zeros(rows - 1, 64).bfloat16()) is None
    assert nf4_native.bf16_forward_kernel(torch.zeros(rows, 64).bfloat16()) == "nf4_matmul_bf16"
    rows = nf4_native.BF16_GEMM_MIN_ROWS_TRANSPOSED
    assert nf4_native.bf16_input_grad_kernel(torch.zeros(rows, 64).bfloat16()) == "nf4_matmul_transposed_bf16"


@pytest.mark.parametrize("m", [16, 40])
def test_f32_dequantized_matmuls(m):
    """The fp32 forward from F32_DEQUANT_MIN_ROWS rows: bit-equal to torch on NF4Weight.dequantize(float32)."""
    n, k = 72, 384
    w = _weight(n, k, double_quant=True)
    dense = w.dequantize(torch.float32)
    x, dy, bias = torch.randn(m, k), torch.randn(m, n), torch.randn(n)
    y = ops().nf4_matmul_f32_dequantized(x, w.packed, w.absmax_float(), n, k, 64, bias)
    assert torch.equal(y, F.linear(x, dense, bias))
    dx = ops().nf4_matmul_transposed_f32_dequantized(dy, w.packed, w.absmax_float(), n, k, 64)
    assert torch.equal(dx, dy @ dense)
    assert nf4_native.forward_kernel(x) == ("nf4_matmul_f32_dequantized" if m >= nf4_native.F32_DEQUANT_MIN_ROWS
                                         else "nf4_matmul")
    assert torch.equal(nf4_native.nf4_matmul(x, w, bias), y)
    with pytest.raises(TypeError):
        ops().nf4_matmul_f32_dequantized(x.bfloat16(), w.packed, w.absmax_float(), n, k, 64, None)
    with pytest.raises(TypeError):
        ops().nf4_matmul_f32_dequantized(x, w.packed, w.absmax_float(), n, k, 64, bias.bfloat16())


def test_f32_dequantized_over_several_tiles():
    n, k = 2100, 2048  # above 16 MiB of fp32: two row tiles / two column tiles, the last partial
    w = nf4_native.quantize(torch.randn(n, k) * 0.05, 64)
    dense = w.dequantize(torch.float32)
    x, dy = torch.randn(17, k), torch.randn(17, n)
    y = ops().nf4_matmul_f32_dequantized(x, w.packed, w.absmax_float(), n, k, 64, None)
    assert_close_to_ref(y, F.linear(x.double(), dense.double()), F.linear(x, dense), what="y")
    dx = ops().nf4_matmul_transposed_f32_dequantized(dy, w.packed, w.absmax_float(), n, k, 64)
    assert_close_to_ref(dx, dy.double() @ dense.double(), dy @ dense, what="dx")
