"""The NF4 decode GEMV (fastpeft.kernels.nf4_gemv) under the Triton interpreter.

``nf4_gemv`` must compute ``nf4_matmul``'s math for 1 <= M <= 16: the weight
is ``fp32(code[nibble] * absmax)`` rounded to x's dtype, multiplied in fp32
(docs/architecture.md, "NF4 and bitsandbytes"). Checked three ways:

- bit for bit: one-hot rows of x pick single weight columns, which must equal
  a test-local unpacking of the documented format (and bitsandbytes'
  ``dequantize_4bit`` for real quantized weights);
- against a float64 reference within a few times torch's own error in the
  same dtype (``tests/numerics.py``), with bias and the LoRA term;
- shapes that are multiples of nothing: odd N, K a multiple of the blocksize
  but not of the kernel's 1024-element step, rows shorter than one 16-byte
  chunk or not a whole number of chunks, blocksizes 8 to 4096, every M
  from 1 to 16, non-contiguous x and out, NaN-poisoned out.
"""
import pytest
import torch

from fastpeft._backend import triton_interpreter_enabled
from fastpeft.kernels import nf4_gemv as G
from lane_device import lane_generator
from nf4_reference import codebook, dense_from_bytes
from numerics import assert_close_to_ref
from optional_deps import bitsandbytes_functional as bnbF, requires_bitsandbytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_weight(n, k, blocksize, gen):
    """Random packed bytes and positive fp32 absmax of an [n, k] NF4 weight (any bytes are a valid weight)."""
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=gen)
    absmax = torch.rand(n * k // blocksize, generator=gen) * 0.5 + 0.01
    return packed, absmax, codebook()


def rounded(w32, dtype):
    """The weight in x's dtype, as nf4_matmul rounds it."""
    return w32.to(dtype)


def bf16_truncated(w32):
    """fp32 -> bf16 by truncation: what the interpreter's cast does (docs/architecture.md, "Numerics")."""
    return (w32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def assert_weight_columns(y, w32, cols, dtype):
    """y[i, :] must be the dequantized weight column cols[i], rounded to dtype, bit for bit."""
    expected = rounded(w32, dtype)[:, cols].T
    if dtype == torch.bfloat16 and triton_interpreter_enabled():
        # the interpreter truncates fp32 -> bf16; each value must be one of the two bf16 neighbours' choices
        truncated = bf16_truncated(w32)[:, cols].T
        ok = (y.view(torch.int16) == expected.view(torch.int16)) | (y.view(torch.int16) == truncated.view(torch.int16))
        assert bool(ok.all()), f"{int((~ok).sum())} weights differ from fp32(code * absmax) rounded to bf16"
        return
    assert torch.equal(y.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expected.view(torch.int16 if dtype != torch.float32 else torch.int32))


def one_hot_rows(m, k, cols, dtype):
    x = torch.zeros(m, k, dtype=dtype)
    x[torch.arange(m), cols] = 1.0
    return x


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,blocksize", [(13, 192, 64), (5, 4096, 4096), (9, 640, 128), (7, 96, 48), (6, 40, 20),
                                           (3, 24, 8)])
def test_dequantized_weight_is_bit_exact(dtype, n, k, blocksize):
    gen = lane_generator(n * k + blocksize)
    packed, absmax, code = random_weight(n, k, blocksize, gen)
    w32 = dense_from_bytes(packed, absmax, n, k, blocksize)
    for m in (1, 2, 3, 16):
        cols = torch.randint(0, k, (m,), generator=gen)
        cols[0] = k - 1  # the last odd column: a low nibble of the last byte of a row
        y = G.nf4_gemv(one_hot_rows(m, k, cols, dtype), packed, absmax, code, n, k, blocksize,
                       out=poisoned((m, n), dtype))
        assert_weight_columns(y, w32, cols, dtype)


@requires_bitsandbytes
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitsandbytes_weight_is_bit_exact(dtype):
    n, k, blocksize = 19, 256, 64
    w = torch.randn(n, k) * 0.05
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    absmax, code = state.absmax.float().contiguous(), state.code.float().contiguous()
    state.dtype = torch.float32
    w32 = bnbF.dequantize_4bit(packed, state)
    cols = torch.tensor([0, 1, 128, 255])
    y = G.nf4_gemv(one_hot_rows(4, k, cols, dtype), packed, absmax, code, n, k, blocksize)
    assert_weight_columns(y, w32, cols, dtype)


def reference(x, w32, dtype, bias=None, h=None, lora_b=None, scale=1.0):
    """(float64 reference, the same math in plain torch in dtype) of nf4_matmul's forward.

    Under the interpreter a bf16 weight is truncated, not rounded (a systematic bias, not noise): the
    reference uses the weight the interpreter's kernel multiplies; the bit tests above check the rounding.
    """
    w = bf16_truncated(w32) if dtype == torch.bfloat16 and triton_interpreter_enabled() else rounded(w32, dtype)
    ref = x.double() @ w.double().T
    out = (x.float() @ w.float().T) if dtype == torch.float32 else (x @ w.T)
    if h is not None:
        hd, bd = h.to(dtype), lora_b.to(dtype)
        ref = ref + scale * (hd.double() @ bd.double().T)
        out = out + (scale * (hd @ bd.T)).to(out.dtype)
    if bias is not None:
        ref = ref + bias.double()
        out = out + bias
    return ref, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 8, 13, 16])
def test_matches_float64_reference_with_bias_and_lora(dtype, m):
    n, k, blocksize, r = 29, 1152, 64, 5
    gen = lane_generator(100 + m)
    packed, absmax, code = random_weight(n, k, blocksize, gen)
    w32 = dense_from_bytes(packed, absmax, n, k, blocksize)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    h = torch.randn(m, r, generator=gen).to(dtype)
    lora_b = torch.randn(n, r, generator=gen).to(dtype)
    y = G.nf4_gemv(x, packed, absmax, code, n, k, blocksize, bias=bias, lora_h=h, lora_B=lora_b, lora_scale=0.75,
                   out=poisoned((m, n), dtype))
    ref, torch_out = reference(x, w32, dtype, bias, h, lora_b, 0.75)
    assert y.dtype == dtype
    assert_close_to_ref(y, ref, torch_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,m", [(384, 4), (1024, 3), (2048, 16)])  # k = 1024, 2048: whole 512-byte steps only
def test_plain_product_and_lora_over_several_rank_chunks(dtype, k, m):
    n, blocksize, r = 11, 128, 20  # r = 20: two 16-wide rank chunks
    gen = lane_generator(7)
    packed, absmax, code = random_weight(n, k, blocksize, gen)
    w32 = dense_from_bytes(packed, absmax, n, k, blocksize)
    x = torch.randn(m, k, generator=gen).to(dtype)
    ref, torch_out = reference(x, w32, dtype)
    assert_close_to_ref(G.nf4_gemv(x, packed, absmax, code, n, k, blocksize), ref, torch_out)
    h = torch.randn(m, r, generator=gen).to(dtype)
    lora_b = torch.randn(n, r, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    ref, torch_out = reference(x, w32, dtype, bias, h, lora_b, 2.0)
    y = G.nf4_gemv(x, packed, absmax, code, n, k, blocksize, bias=bias, lora_h=h, lora_B=lora_b, lora_scale=2.0,
                   out=poisoned((m, n), dtype))
    assert_close_to_ref(y, ref, torch_out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_x_and_out(dtype):
    n, k, blocksize, m = 13, 256, 64, 3
    gen = lane_generator(11)
    packed, absmax, code = random_weight(n, k, blocksize, gen)
    w32 = dense_from_bytes(packed, absmax, n, k, blocksize)
    wide = torch.randn(m, 2 * k + 6, generator=gen).to(dtype)
    out_t = poisoned((n, m), dtype)
    for x in (wide[:, ::2][:, :k], wide[:, 2:k + 2], wide[:, 1:k + 1]):  # column stride 2; odd/even offsets
        ref, torch_out = reference(x, w32, dtype)
        out = out_t.T  # [m, n] with strides (1, m)
        out.fill_(float("nan"))
        y = G.nf4_gemv(x, packed, absmax, code, n, k, blocksize, out=out)
        assert y.data_ptr() == out_t.data_ptr()
        assert_close_to_ref(y, ref, torch_out)


def test_bad_arguments_raise_before_launching():
    n, k, blocksize = 8, 128, 64
    packed, absmax, code = random_weight(n, k, blocksize, lane_generator(0))
    x = torch.randn(1, k)
    with pytest.raises(ValueError, match="token rows"):
        G.nf4_gemv(torch.randn(17, k), packed, absmax, code, n, k, blocksize)
    with pytest.raises(ValueError, match="token rows"):
        G.nf4_gemv(torch.randn(0, k), packed, absmax, code, n, k, blocksize)
    with pytest.raises(TypeError, match="x2d"):
        G.nf4_gemv(x.double(), packed, absmax, code, n, k, blocksize)
    with pytest.raises(ValueError, match="blocksize"):
        G.nf4_gemv(x, packed, absmax, code, n, k, 48)
    with pytest.raises(ValueError, match="out"):
        G.nf4_gemv(x, packed, absmax, code, n, k, blocksize, out=torch.empty(1, n, dtype=torch.float16))
    with pytest.raises(ValueError, match="lora_h"):
        G.nf4_gemv(x, packed, absmax, code, n, k, blocksize, lora_h=torch.randn(1, 4), lora_B=torch.randn(n, 5))
    with pytest.raises(ValueError, match="bias"):
        G.nf4_gemv(x, packed, absmax, code, n, k, blocksize, bias=torch.randn(n + 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_token_count_has_a_config_and_enough_programs(dtype):
    for m in range(1, G.GEMV_MAX_M + 1):
        for k in (4096, 4160):  # whole 512-byte steps; a ragged last step
            cfg = G.gemv_config(m, dtype, k)
            one_row = dtype != torch.float16 and k == 4160  # two rows spill at a ragged K
            assert cfg.block_m == (1 if one_row else min(m, 2))
            # N = 4096: at least 4 programs per SM on 132 SMs
            assert (4096 // cfg.block_n) * -(-m // cfg.block_m) >= 4 * 132
