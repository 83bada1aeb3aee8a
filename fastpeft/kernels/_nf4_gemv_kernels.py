"""``_nf4_decode_gemv_kernel``: the @triton.jit decode GEMV behind ``fastpeft.kernels.nf4_gemv`` (its launcher).

``y[m, n] = sum_k x[m, k] * w[n, k]`` for ``M <= 16`` token rows, reading the
packed NF4 weight once, at HBM speed. ``w[n, k]`` is bitsandbytes'
dequantization, bit for bit: ``fp32(code[nibble] * absmax)`` rounded to x's
dtype before the product (the scale is applied per element: factoring it out
of the sum would change fp32 rounding).

Layout (``docs/architecture.md``, "NF4"): row ``n`` of the weight is
``K / 2`` bytes at ``n * K / 2``; byte ``j`` holds element ``2j`` in its high
nibble and ``2j + 1`` in its low nibble, so a byte tile pairs with the even
and the odd columns of x, and nothing is ever interleaved.

How the work is laid out (SASS facts and counts: ``fastpeft.kernels.nf4_gemv``):

- a program owns ``BLOCK_N`` weight rows and ``BLOCK_M`` (1 or 2) token rows
  and walks the whole rows, ``BLOCK_KB`` bytes per row per trip; a thread
  owns a 16-byte chunk of a row (one 128-bit load; neighbouring threads read
  neighbouring chunks) and, per token, the 16 x words (x[2j], x[2j + 1])
  that meet it, read as one int32 (fp16/bf16) or int64 (fp32) each;
- the absmax is read once per chunk when a chunk lies in one quantization
  block (``BLOCKSIZE % 32 == 0``), per byte otherwise;
- a whole byte is decoded at once: a 256-entry table of int64 words holds
  both code values of each byte value (``_nf4_byte_table``, built per trip
  from the 16 codes: two L1-resident loads per thread), looked up with one
  ``tl.gather`` (Triton stages the 2 KB table in shared memory: one 64-bit
  LDS per byte, two barriers per trip) - no nibble arithmetic, no global
  gather per element. A 16-entry fp32 table (conflict-free, but one LDS and
  ~3 integer instructions per weight more) cost 30-50 % more instructions;
- products accumulate per element in registers shaped like the byte tile and
  are summed over K once, after the loop (no shuffles inside it).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import TOKEN_ARGS


@triton.jit
def _nf4_byte_table(code_ptr):
    """The 256 int64 words ``bits(code[b >> 4]) | bits(code[b & 15]) << 32``: both code values of byte ``b``.

    Read from the 16 codes (64 bytes, L1-resident) where it is used: a table kept in registers across the
    loop made ptxas spill.
    """
    byte = tl.arange(0, 256)
    high = tl.load(code_ptr + (byte >> 4)).to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    low = tl.load(code_ptr + (byte & 0xF)).to(tl.int32, bitcast=True).to(tl.int64)
    return high | (low << 32)


@triton.jit
def _nf4_pair_lookup(table, packed):
    """(code[high nibble], code[low nibble]) of an int32 byte tile: one ``tl.gather`` of ``_nf4_byte_table``.

    Triton stages the gathered table in shared memory once per call: one 64-bit LDS per byte.
    """
    flat = tl.reshape(packed, (packed.numel,))
    words = tl.reshape(tl.gather(table, flat, 0), packed.shape)
    high = (words & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    low = (words >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return high, low


@triton.jit
def _x_pair(x_pairs, dtype: tl.constexpr):
    """fp32 (x[2j], x[2j + 1]) from the int32 (fp16/bf16) or int64 (fp32) word holding both (little endian)."""
    if dtype == tl.float32:
        even = (x_pairs & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        odd = (x_pairs >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    elif dtype == tl.bfloat16:
        even = (x_pairs << 16).to(tl.float32, bitcast=True)
        odd = (x_pairs & -65536).to(tl.float32, bitcast=True)
    else:
        even = (x_pairs & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = (x_pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return even, odd


@triton.jit
def _token_fma(acc, xp_ptr, row, stride_xpm, byte, mask, w_even, w_odd, dtype: tl.constexpr):
    """``acc + x[row, 2v] w_even + x[row, 2v + 1] w_odd`` over a tile of bytes ``v`` (two FFMAs per byte)."""
    x_words = tl.load(xp_ptr + row.to(tl.int64) * stride_xpm + byte, mask=mask, other=0)
    x_even, x_odd = _x_pair(x_words, dtype)
    acc += x_even * w_even
    acc += x_odd * w_odd
    return acc


@triton.jit
def _token_row(acc, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """``[1, BLOCK_N * CHUNKS, VEC]`` partial sums -> ``[BLOCK_N]`` row sums (after the loop, once)."""
    return tl.sum(tl.reshape(tl.sum(acc, axis=2), (BLOCK_N, CHUNKS)), axis=1)


@triton.jit
def _store_token(y_ptr, row, M, stride_ym, rows, stride_yn, n_mask, out, extra, slot, BLOCK_M: tl.constexpr):
    """Stores token ``row`` (``out`` plus its row ``slot`` of the ``[BLOCK_M, BLOCK_N]`` ``extra``)."""
    pick = tl.arange(0, BLOCK_M)[:, None] == slot
    out += tl.sum(tl.where(pick, extra, 0.0), axis=0)
    tl.store(y_ptr + row.to(tl.int64) * stride_ym + rows * stride_yn, out.to(y_ptr.dtype.element_ty),
             mask=n_mask & (row < M))


@triton.jit(do_not_specialize=TOKEN_ARGS)
def _nf4_decode_gemv_kernel(xp_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, h_ptr, lb_ptr, y_ptr,
                            M, N, K, R, row_bytes,
                            stride_xpm, stride_ym, stride_yn, stride_bias,
                            stride_hm, stride_hr, stride_lbn, stride_lbr, lora_scale,
                            BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_KB: tl.constexpr, VEC: tl.constexpr, EVEN_K: tl.constexpr):
    tl.static_assert(BLOCK_M == 1 or BLOCK_M == 2)
    # Program ids: the token groups of one row tile are neighbours, so they share its bytes in L2.
    pid = tl.program_id(0)
    m_groups = tl.cdiv(M, BLOCK_M)
    pid_n = pid // m_groups
    pid_m = pid % m_groups
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    dtype = y_ptr.dtype.element_ty
    # Index space [1, chunk row r = (weight row, 16-byte chunk), byte v]: a thread owns one chunk of a row.
    CHUNKS: tl.constexpr = BLOCK_KB // VEC
    offs_r = tl.arange(0, BLOCK_N * CHUNKS)
    r_row = pid_n * BLOCK_N + offs_r // CHUNKS
    c3 = (offs_r % CHUNKS)[None, :, None] * VEC
    v3 = tl.arange(0, VEC)[None, None, :]
    # Rows past N and tokens past M read row N - 1 / token M - 1 (real memory) and are never stored, so
    # only a ragged last K step (EVEN_K False) needs masked loads.
    n3 = tl.minimum(r_row, N - 1).to(tl.int64)[None, :, None]
    blocks_per_row = K // BLOCKSIZE
    # One accumulator per token row (BLOCK_M <= 2), shaped like the byte tile: the x words of a token are
    # loaded in the layout of the weight bytes, so no tile changes layout inside the loop.
    acc0 = tl.zeros((1, BLOCK_N * CHUNKS, VEC), dtype=tl.float32)
    acc1 = tl.zeros((1, BLOCK_N * CHUNKS, VEC), dtype=tl.float32)
    for b0 in range(0, row_bytes, BLOCK_KB):
        chunk = b0 + c3
        byte = chunk + v3
        # EVEN_K: an always-true mask, which Triton folds away; otherwise per byte (any K / 2, even < 16)
        w_mask = (byte < row_bytes) | EVEN_K
        packed = tl.load(packed_ptr + n3 * row_bytes + byte, mask=w_mask, other=0).to(tl.int32)
        if BLOCKSIZE % (2 * VEC) == 0:
            # a chunk lies in one quantization block: one scale per thread and trip
            in_k = (chunk < row_bytes) | EVEN_K
            scale = tl.load(absmax_ptr + n3 * blocks_per_row + chunk // (BLOCKSIZE // 2), mask=in_k, other=0.0)
        else:
            scale = tl.load(absmax_ptr + n3 * blocks_per_row + byte // (BLOCKSIZE // 2), mask=w_mask, other=0.0)
        code_even, code_odd = _nf4_pair_lookup(_nf4_byte_table(code_ptr), packed)
        # bitsandbytes' dequantization: fp32(code * absmax), rounded to x's dtype before the product
        w_even = (code_even * scale).to(dtype).to(tl.float32)
        w_odd = (code_odd * scale).to(dtype).to(tl.float32)
        acc0 = _token_fma(acc0, xp_ptr, tl.minimum(m0, M - 1), stride_xpm, byte, w_mask, w_even, w_odd, dtype)
        if BLOCK_M > 1:
            acc1 = _token_fma(acc1, xp_ptr, tl.minimum(m0 + 1, M - 1), stride_xpm, byte, w_mask, w_even, w_odd,
                              dtype)
    # LoRA and bias as one [BLOCK_M, BLOCK_N] term, added to each token row when it is stored.
    extra = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        offs_k = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            in_r = offs_k < R - r0
            ranks = (r0 + offs_k).to(tl.int64)
            h = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + ranks[None, :] * stride_hr,
                        mask=m_mask[:, None] & in_r[None, :], other=0.0).to(dtype).to(tl.float32)
            b = tl.load(lb_ptr + rows[:, None] * stride_lbn + ranks[None, :] * stride_lbr,
                        mask=n_mask[:, None] & in_r[None, :], other=0.0).to(dtype).to(tl.float32)
            extra += tl.sum(h[:, None, :] * b[None, :, :], axis=2)
        extra = extra * lora_scale
    if HAS_BIAS:
        extra += tl.load(bias_ptr + rows * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    _store_token(y_ptr, m0, M, stride_ym, rows, stride_yn, n_mask, _token_row(acc0, BLOCK_N, CHUNKS), extra, 0,
                 BLOCK_M)
    if BLOCK_M > 1:
        _store_token(y_ptr, m0 + 1, M, stride_ym, rows, stride_yn, n_mask, _token_row(acc1, BLOCK_N, CHUNKS),
                     extra, 1, BLOCK_M)
