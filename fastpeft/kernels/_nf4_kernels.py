"""The @triton.jit kernels behind ``fastpeft.kernels.nf4`` and ``fastpeft.kernels.qlora`` (launchers live there).

Each program dequantizes the weight tiles it needs in registers, from the
packed bytes, the fp32 per-block absmax and the 16-entry codebook, and never
writes a dequantized weight to memory. Dequantization is bit-identical to
bitsandbytes: ``fp32(code[nibble] * absmax)``, then a cast to the
activations' dtype before the product.

Layout (``docs/architecture.md``, "NF4"): weight ``[N, K]`` flattened
row-major; element ``2j`` is the high nibble of byte ``j``; ``K % BLOCKSIZE == 0``
so a quantization block never straddles two rows.

- ``_nf4_matmul_kernel``: tiled ``tl.dot`` forward (prefill/training, M > 16).
- ``_nf4_matmul_t_kernel``: ``dX = dy · W`` for the backward pass.
- ``_nf4_dequant_kernel``: the dense weight (what tests compare with bitsandbytes).

The decode GEMV (M <= 16) is ``fastpeft.kernels.nf4_gemv``.

The two GEMMs read the weight through ``_nf4_packed_tile``: a ``[BLOCK_N,
BLOCK_K / 2]`` byte tile, each row's bytes consecutive (128-bit loads that
Triton pipelines as asynchronous copies), nibbles split in registers. They
compute their output tile transposed (``yᵀ = W xᵀ``, ``dxᵀ = Wᵀ dyᵀ``): the
dequantized weight is the dot's left operand, which sm_90's wgmma reads from
registers, so the wgmmas of one k-step stay in flight while the next tile is
dequantized. The codebook lookup is a gather from the 64-byte ``code`` tensor
(an L1-resident load per element).
The optional LoRA term (``HAS_LORA``) enters the fp32 accumulator scaled by
``lora_scale`` (LoRAFusion): ``s · h Bᵀ`` forward, ``s/(1-p) · drop'(dh A)``
backward with the shared dropout mask, so QLoRA and LoRA draw one mask per seed.
The rank is walked in ``BLOCK_R``-wide chunks, so every r runs one compiled
variant with a small register tile.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import SEED_ARGS, TOKEN_ARGS, grouped_tile, keep_mask, mma


@triton.jit
def _nf4_codes(packed_ptr, code_ptr, n, k, K, mask):
    """fp32 codebook values of elements (n, k) (broadcastable int tensors)."""
    element = n.to(tl.int64) * K + k
    byte = tl.load(packed_ptr + (element >> 1), mask=mask, other=0).to(tl.int32)
    # K is even, so an element's parity is k's: even -> high nibble.
    shift = ((k & 1) ^ 1) * 4
    nibble = (byte >> shift) & 0xF
    return tl.load(code_ptr + nibble)


@triton.jit
def _dequant_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, offs_k, k_start, N, K,
                  BLOCKSIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``code * absmax`` for rows ``offs_n`` x columns ``offs_k``, shape ``[BLOCK_N, BLOCK_K]``.

    ``offs_k`` must be ``k_start + arange(BLOCK_K)``. Out-of-range elements are 0 (or -0).
    """
    n = offs_n[:, None]
    k = offs_k[None, :]
    mask = (n < N) & (k < K)
    codes = _nf4_codes(packed_ptr, code_ptr, n, k, K, mask)
    blocks_per_row = K // BLOCKSIZE
    if BLOCK_K <= BLOCKSIZE:
        # k_start is a multiple of BLOCK_K and BLOCK_K divides BLOCKSIZE: one block per row.
        scale = tl.load(absmax_ptr + offs_n.to(tl.int64) * blocks_per_row + k_start // BLOCKSIZE,
                        mask=offs_n < N, other=0.0)
        scale2d = scale[:, None]
    else:
        scale2d = tl.load(absmax_ptr + n.to(tl.int64) * blocks_per_row + k // BLOCKSIZE, mask=mask, other=0.0)
    return codes * scale2d


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, N, K,
                        BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, offs_k, pid_k * BLOCK_K, N, K,
                      BLOCKSIZE, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _nf4_packed_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, n_mask, k_start, stride_pn,
                     BLOCKSIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``code * absmax`` of rows ``offs_n`` x columns ``k_start + arange(BLOCK_K)``: ``[BLOCK_N, BLOCK_K]``.

    The bytes are loaded as a ``[BLOCK_N, BLOCK_K // 2]`` tile, a row's bytes
    consecutive (``stride_pn = K // 2`` bytes per row), so a thread reads
    128-bit vectors; the two nibbles of a byte are split in registers (element
    ``2j`` is the high nibble of byte ``j``). ``k_start`` is a multiple of
    ``BLOCK_K``. Columns past ``K`` and rows past ``N`` come out 0 (or -0).
    """
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    HALF: tl.constexpr = BLOCK_K // 2
    offs_b = k_start // 2 + tl.arange(0, HALF)
    packed = tl.load(packed_ptr + offs_n[:, None].to(tl.int64) * stride_pn + offs_b[None, :],
                     mask=n_mask[:, None] & (offs_b[None, :] < stride_pn), other=0)
    nibbles = tl.reshape(tl.join(packed >> 4, packed & 0xF), (BLOCK_N, BLOCK_K)).to(tl.int32)
    codes = tl.load(code_ptr + nibbles)
    blocks_per_row = stride_pn // (BLOCKSIZE // 2)
    if BLOCK_K <= BLOCKSIZE:
        # BLOCK_K divides BLOCKSIZE: the tile lies in one quantization block per row.
        scale = tl.load(absmax_ptr + offs_n.to(tl.int64) * blocks_per_row + k_start // BLOCKSIZE,
                        mask=n_mask, other=0.0)
        return codes * scale[:, None]
    else:
        BLOCKS: tl.constexpr = BLOCK_K // BLOCKSIZE
        offs_blk = k_start // BLOCKSIZE + tl.arange(0, BLOCKS)
        scale = tl.load(absmax_ptr + offs_n[:, None].to(tl.int64) * blocks_per_row + offs_blk[None, :],
                        mask=n_mask[:, None] & (offs_blk[None, :] < blocks_per_row), other=0.0)
        scaled = tl.reshape(codes, (BLOCK_N, BLOCKS, BLOCKSIZE)) * scale[:, :, None]
        return tl.reshape(scaled, (BLOCK_N, BLOCK_K))


@triton.jit(do_not_specialize=TOKEN_ARGS)
def _nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, h_ptr, lb_ptr, y_ptr,
                       M, N, K, R,
                       stride_xm, stride_xk, stride_pn, stride_ym, stride_yn, stride_bias,
                       stride_hm, stride_hr, stride_lbn, stride_lbr, lora_scale,
                       BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                       BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    # The program computes the tile transposed, yᵀ = W xᵀ: the weight tile, dequantized in registers, is the
    # left operand, which wgmma reads from registers, while xᵀ streams through shared memory by
    # asynchronous copies; so the wgmmas of one step overlap the next step's dequantization.
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    dtype = x_ptr.dtype.element_ty
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            in_r = offs_r < R - r0
            ranks = (r0 + offs_r).to(tl.int64)
            b = tl.load(lb_ptr + offs_n[:, None].to(tl.int64) * stride_lbn + ranks[None, :] * stride_lbr,
                        mask=n_mask[:, None] & in_r[None, :], other=0.0)
            h_t = tl.load(h_ptr + offs_m[None, :].to(tl.int64) * stride_hm + ranks[:, None] * stride_hr,
                          mask=m_mask[None, :] & in_r[:, None], other=0.0)
            acc_t = mma(b.to(dtype), h_t.to(dtype), acc_t, DOT_PRECISION, UPCAST)
        acc_t = acc_t * lora_scale
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _nf4_packed_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, n_mask, k_start, stride_pn,
                             BLOCKSIZE, BLOCK_K)
        acc_t = mma(w.to(dtype), tl.trans(x), acc_t, DOT_PRECISION, UPCAST)
    acc = tl.trans(acc_t)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=SEED_ARGS + TOKEN_ARGS)
def _nf4_matmul_t_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, dh_ptr, la_ptr, dx_ptr,
                         M, N, K, R,
                         stride_dym, stride_dyn, stride_pn, stride_dxm, stride_dxk,
                         stride_hm, stride_hr, stride_lar, stride_lak,
                         lora_scale, p, seed_lo, seed_hi,
                         BLOCKSIZE: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
                         DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    # Transposed like the forward kernel: dxᵀ = Wᵀ dyᵀ, the dequantized weight the register operand.
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    dtype = dy_ptr.dtype.element_ty
    acc_t = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            in_r = offs_r < R - r0
            ranks = (r0 + offs_r).to(tl.int64)
            a_t = tl.load(la_ptr + ranks[None, :] * stride_lar + offs_k[:, None].to(tl.int64) * stride_lak,
                          mask=in_r[None, :] & k_mask[:, None], other=0.0)
            dh_t = tl.load(dh_ptr + offs_m[None, :].to(tl.int64) * stride_hm + ranks[:, None] * stride_hr,
                           mask=m_mask[None, :] & in_r[:, None], other=0.0)
            acc_t = mma(a_t.to(dtype), dh_t.to(dtype), acc_t, DOT_PRECISION, UPCAST)
        if DROPOUT:
            # Same mask as the LoRA kernels drew for x in the forward pass.
            keep = tl.trans(keep_mask(seed_lo, seed_hi, offs_m, offs_k, K, p))
            acc_t = tl.where(keep, acc_t * lora_scale, 0.0)
        else:
            acc_t = acc_t * lora_scale
    for n_start in range(0, N, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = _nf4_packed_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, n_mask, pid_k * BLOCK_K, stride_pn,
                             BLOCKSIZE, BLOCK_K)
        acc_t = mma(tl.trans(w.to(dtype)), tl.trans(dy), acc_t, DOT_PRECISION, UPCAST)
    tl.store(dx_ptr + offs_m[None, :].to(tl.int64) * stride_dxm + offs_k[:, None].to(tl.int64) * stride_dxk,
             acc_t.to(dx_ptr.dtype.element_ty), mask=m_mask[None, :] & k_mask[:, None])
