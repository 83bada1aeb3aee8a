"""Triton NF4 kernels (fastpeft.kernels.nf4) under the interpreter.

Weights are quantized by bitsandbytes (the oracle; docs/architecture.md, "NF4 and bitsandbytes"); where it
is not installed (the GPU lane) they are random bytes read through the documented format (nf4_reference.py).
Dequantization must be bit-identical to bitsandbytes and to a test-local
unpacking written from the documented codebook; matmuls are measured against
``x.double() @ W.double().T`` and must stay within a few times torch's error
in the same dtype. Outputs are NaN-poisoned so unwritten elements fail.
"""
import pytest
import torch

from fastpeft._backend import triton_interpreter_enabled
from fastpeft.kernels import nf4 as K
from lane_device import lane_device
from nf4_reference import codebook, dense_from_bytes
from numerics import assert_close_to_ref
from optional_deps import bitsandbytes_functional as bnbF, requires_bitsandbytes

# bf16 runs under the interpreter too: the shared ``mma`` multiplies bf16 operands in fp32 there (its
# bf16 tl.dot is wrong), which is what the GPU's bf16 MMA computes with fp32 accumulation.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def quantize(n, k, blocksize=64, double_quant=False):
    """(packed, fp32 absmax, code, bnb quant_state) of a fresh random [n, k] weight.

    Without bitsandbytes: random bytes and absmax (any bytes are a valid weight), no quant_state.
    """
    if not bnbF:
        packed = torch.randint(0, 256, (n * k // 2, 1), dtype=torch.uint8)
        return packed, torch.rand(n * k // blocksize) * 0.05 + 1e-3, codebook(), None
    w = torch.randn(n, k) * 0.05
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                       compress_statistics=double_quant)
    if double_quant:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        absmax = state.absmax
    return packed, absmax.float().contiguous(), state.code.float().contiguous(), state


def bnb_dequant(packed, state, dtype):
    state.dtype = dtype
    return bnbF.dequantize_4bit(packed, state)


def dense_fp32(packed, absmax, state, n, k, blocksize):
    """The fp32 weight: bitsandbytes' dequantization of its own bytes, else the documented format."""
    return bnb_dequant(packed, state, torch.float32) if state is not None else dense_from_bytes(
        packed, absmax, n, k, blocksize)


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@requires_bitsandbytes
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize,double_quant", [(64, False), (64, True), (128, False), (256, True)])
def test_dequantize_bit_identical_to_bitsandbytes(dtype, blocksize, double_quant):
    n, k = 37, 2 * blocksize + (256 if blocksize < 256 else 0)
    packed, absmax, code, state = quantize(n, k, blocksize, double_quant)
    out = K.nf4_dequantize(packed, absmax, code, n, k, blocksize, dtype, out=poisoned((n, k), dtype))
    if dtype == torch.bfloat16 and triton_interpreter_enabled():
        # The interpreter casts fp32 -> bf16 by truncation (round-to-nearest is ignored), so here the
        # kernel's fp32 values must be bitsandbytes' bit for bit and the cast the interpreter's.
        expected = truncate_to_bf16(bnb_dequant(packed, state, torch.float32))
    else:
        expected = bnb_dequant(packed, state, dtype)
        assert torch.equal(out, dense_from_bytes(packed, absmax, n, k, blocksize).to(dtype))
    assert torch.equal(out, expected)


def truncate_to_bf16(x32: torch.Tensor) -> torch.Tensor:
    return (x32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _reference(x, w32, bias=None, h=None, lora_B=None):
    ref = x.double() @ w32.double().T
    if bias is not None:
        ref = ref + bias.double()
    if h is not None:
        ref = ref + h.to(x.dtype).double() @ lora_B.double().T
    return ref


def _torch_same_dtype(x, w32, bias=None, h=None, lora_B=None):
    out = x @ w32.to(x.dtype).T
    if bias is not None:
        out = out + bias
    if h is not None:
        out = out + h.to(x.dtype) @ lora_B.T
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 37])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_default_configs(dtype, m, with_bias):
    n, k, bs = 50, 192, 64
    packed, absmax, code, state = quantize(n, k, bs)
    w32 = dense_fp32(packed, absmax, state, n, k, bs)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    y = K.nf4_matmul(x, packed, absmax, code, n, k, bs, bias=bias, out=poisoned((m, n), dtype))
    assert_close_to_ref(y, _reference(x, w32, bias), _torch_same_dtype(x, w32, bias))


CONFIGS = {
    "dot_small": K.LaunchConfig("test", 32, 16, 32, group_m=2),
    "dot_bk128": K.LaunchConfig("test", 16, 32, 128, group_m=3),  # K=192: ragged K/BK
    "dot_bm64": K.LaunchConfig("test", 64, 64, 64),
    "dot_bk256": K.LaunchConfig("test", 32, 16, 256, group_m=1),  # two absmax blocks per row, K/BK = 0.75
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_matmul_every_config(name, dtype, double_quant):
    cfg = CONFIGS[name]
    m = 37
    n, k, bs = 45, 192, 64
    packed, absmax, code, state = quantize(n, k, bs, double_quant)
    w32 = dense_fp32(packed, absmax, state, n, k, bs)
    x = torch.randn(m, k).to(dtype)
    y = K.nf4_matmul(x, packed, absmax, code, n, k, bs, config=cfg, out=poisoned((m, n), dtype))
    assert_close_to_ref(y, _reference(x, w32), _torch_same_dtype(x, w32))


@pytest.mark.parametrize("m", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matmul_non_contiguous_x_and_lora_epilogue(m, dtype):
    n, k, bs, r = 33, 256, 128, 5
    packed, absmax, code, state = quantize(n, k, bs)
    w32 = dense_fp32(packed, absmax, state, n, k, bs)
    x = torch.randn(m, 2 * k).to(dtype)[:, ::2]  # stride (2k, 2)
    assert not x.is_contiguous()
    h = torch.randn(m, r)                       # fp32, as the op passes it
    lora_B = torch.randn(n, r + 3).to(dtype)[:, :r]  # non-contiguous rows
    bias = torch.randn(n).to(dtype)
    y = K.nf4_matmul(x, packed, absmax, code, n, k, bs, bias=bias, lora_h=h, lora_B=lora_B,
                     out=poisoned((m, n), dtype))
    assert_close_to_ref(y, _reference(x, w32, bias, h, lora_B), _torch_same_dtype(x, w32, bias, h, lora_B))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 37])
@pytest.mark.parametrize("with_lora", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_matmul_transposed(dtype, m, with_lora, double_quant):
    n, k, bs, r = 70, 192, 64, 3                 # N ragged against BN=64
    packed, absmax, code, state = quantize(n, k, bs, double_quant)
    w32 = dense_fp32(packed, absmax, state, n, k, bs)
    dy = torch.randn(m, 2 * n).to(dtype)[:, ::2]  # non-contiguous
    assert not dy.is_contiguous()
    dh = torch.randn(m, r) if with_lora else None
    lora_A = torch.randn(r, k).to(dtype) if with_lora else None
    dx = K.nf4_matmul_transposed(dy, packed, absmax, code, n, k, bs, lora_dh=dh, lora_A=lora_A,
                                 out=poisoned((m, k), dtype))
    ref = dy.double() @ w32.double()
    torch_out = dy @ w32.to(dtype)
    if with_lora:
        ref = ref + dh.to(dtype).double() @ lora_A.double()
        torch_out = torch_out + dh.to(dtype) @ lora_A
    assert_close_to_ref(dx, ref, torch_out)


def test_matmul_transposed_ragged_k_tiles():
    n, k, bs = 20, 192, 64
    packed, absmax, code, state = quantize(n, k, bs)
    w32 = dense_fp32(packed, absmax, state, n, k, bs)
    dy = torch.randn(17, n)
    cfg = K.LaunchConfig("test", 16, 16, 128)  # K/BK = 1.5, BK > blocksize
    dx = K.nf4_matmul_transposed(dy, packed, absmax, code, n, k, bs, config=cfg, out=poisoned((17, k), dy.dtype))
    assert_close_to_ref(dx, dy.double() @ w32.double(), dy @ w32, tiny=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_lora", [False, True])
def test_large_default_configs(dtype, with_lora):
    """The M >= 1024 tiles (grouped order over several row tiles; without LoRA the dX tile is 128 columns wide,
    two quantization blocks), every size ragged against them; with LoRA both terms and the dX dropout mask."""
    from fastpeft.kernels.lora import dropout_mask

    m, n, k, bs, r, p, seed = 1030, 130, 192, 64, 5, 0.2, 77
    fwd_cfg, bwd_cfg = K.forward_config(m, bs, dtype, with_lora), K.backward_config(m, bs, dtype, with_lora)
    assert fwd_cfg.name == ("large_lora" if with_lora else "large") and fwd_cfg.block_m == 128
    assert bwd_cfg.name == ("bwd_large_lora" if with_lora else "bwd_large") and bwd_cfg.block_m == 128
    assert with_lora or bwd_cfg.block_k > bs
    packed, absmax, code, state = quantize(n, k, bs, double_quant=True)
    w32 = dense_fp32(packed, absmax, state, n, k, bs)
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    bias = torch.randn(n).to(dtype)
    ref, peer = _reference(x, w32, bias), _torch_same_dtype(x, w32, bias)
    dx_ref, dx_peer = dy.double() @ w32.double(), dy @ w32.to(dtype)
    lora = {}
    if with_lora:
        h, dh = torch.randn(m, r), torch.randn(m, r)
        lora_A, lora_B = torch.randn(r, k).to(dtype), torch.randn(n, r).to(dtype)
        lora = dict(lora_h=h, lora_B=lora_B, lora_scale=0.5)
        ref = ref + 0.5 * (h.to(dtype).double() @ lora_B.double().T)
        peer = peer + 0.5 * (h.to(dtype) @ lora_B.T)
        keep = dropout_mask((m, k), p, seed, lane_device())
        dx_lora = dict(lora_dh=dh, lora_A=lora_A, lora_scale=2.0 / (1 - p), dropout_p=p, seed=seed)
        dx_ref = dx_ref + (dh.to(dtype).double() @ lora_A.double()) * keep * (2.0 / (1 - p))
        dx_peer = dx_peer + (dh.to(dtype) @ lora_A) * keep * (2.0 / (1 - p))
    y = K.nf4_matmul(x, packed, absmax, code, n, k, bs, bias=bias, out=poisoned((m, n), dtype), **lora)
    assert_close_to_ref(y, ref, peer)
    dx = K.nf4_matmul_transposed(dy, packed, absmax, code, n, k, bs, out=poisoned((m, k), dtype),
                                 **(dx_lora if with_lora else {}))
    assert_close_to_ref(dx, dx_ref, dx_peer)


def test_empty_batch():
    packed, absmax, code, _ = quantize(8, 64)
    y = K.nf4_matmul(torch.randn(0, 64), packed, absmax, code, 8, 64, 64)
    assert y.shape == (0, 8)


def test_launcher_guards():
    packed, absmax, code, _ = quantize(8, 128)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        K.nf4_matmul(x, packed, absmax, code, 8, 128, 96)
    with pytest.raises(ValueError, match="power of two"):
        K.nf4_matmul(torch.randn(2, 96), packed[:384], absmax[:16], code, 8, 96, 48)
    with pytest.raises(TypeError, match="packed"):  # a wrong dtype is a TypeError (NF4Weight.check_packed_layout)
        K.nf4_matmul(x, packed.to(torch.int16), absmax, code, 8, 128, 64)
    with pytest.raises(TypeError, match="absmax"):
        K.nf4_matmul(x, packed, absmax.half(), code, 8, 128, 64)
    with pytest.raises(ValueError, match="code"):
        K.nf4_matmul(x, packed, absmax, code[:8].contiguous(), 8, 128, 64)
    with pytest.raises(ValueError, match="out"):
        K.nf4_matmul(x, packed, absmax, code, 8, 128, 64, out=torch.empty(2, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matmul_transposed_lora_dropout_uses_lora_kernel_mask(dtype):
    from fastpeft.kernels.lora import dropout_mask

    m, n, k, bs, r, p, seed = 19, 40, 128, 64, 4, 0.3, 2**40 + 12345
    packed, absmax, code, state = quantize(n, k, bs)
    w32 = dense_fp32(packed, absmax, state, n, k, bs)
    dy = torch.randn(m, n).to(dtype)
    dh = torch.randn(m, r)
    lora_A = torch.randn(r, k).to(dtype)
    dx = K.nf4_matmul_transposed(dy, packed, absmax, code, n, k, bs, lora_dh=dh, lora_A=lora_A,
                                 lora_scale=1 / (1 - p), dropout_p=p, seed=seed, out=poisoned((m, k), dtype))
    keep = dropout_mask((m, k), p, seed, lane_device())
    assert 0.5 < keep.float().mean() < 0.9
    lora64 = (dh.to(dtype).double() @ lora_A.double()) * keep / (1 - p)
    lora_t = (dh.to(dtype) @ lora_A) * keep / (1 - p)
    ref = dy.double() @ w32.double() + lora64
    assert_close_to_ref(dx, ref, dy @ w32.to(dtype) + lora_t)
    # A different seed gives a different mask, so the result must move.
    dx2 = K.nf4_matmul_transposed(dy, packed, absmax, code, n, k, bs, lora_dh=dh, lora_A=lora_A,
                                  lora_scale=1 / (1 - p), dropout_p=p, seed=seed + 1)
    assert not torch.allclose(dx, dx2)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 70), blocks=st.integers(1, 4), blocksize=st.sampled_from([64, 128]),
       double_quant=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_random_shapes(m, n, blocks, blocksize, double_quant, seed):
    torch.manual_seed(seed)
    k = blocks * blocksize
    packed, absmax, code, state = quantize(n, k, blocksize, double_quant)
    w32 = dense_fp32(packed, absmax, state, n, k, blocksize)
    x = torch.randn(m, k)
    y = K.nf4_matmul(x, packed, absmax, code, n, k, blocksize, out=poisoned((m, n), torch.float32))
    # tiny = one fp32 rounding: with few outputs torch can be exact by luck.
    assert_close_to_ref(y, x.double() @ w32.double().T, x @ w32.T, tiny=1e-7)
    dy = torch.randn(m, n)
    dx = K.nf4_matmul_transposed(dy, packed, absmax, code, n, k, blocksize, out=poisoned((m, k), torch.float32))
    assert_close_to_ref(dx, dy.double() @ w32.double(), dy @ w32, tiny=1e-7)
