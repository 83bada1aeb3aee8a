"""The @triton.jit kernels behind ``fastpeft.kernels.nf4`` and ``fastpeft.kernels.qlora`` (launchers live there).

Each program dequantizes the ``[BLOCK_N, BLOCK_K]`` weight tiles it needs in
registers, from the packed bytes, the fp32 per-block absmax and the 16-entry
codebook, and never writes a dequantized weight to memory. Dequantization is
bit-identical to bitsandbytes: ``fp32(code[nibble] * absmax)``, then a cast to
the activations' dtype before the product (``_dequant_tile``).

Layout (``docs/architecture.md``, "NF4"): weight ``[N, K]`` flattened
row-major; element ``2j`` is the high nibble of byte ``j``; ``K % BLOCKSIZE == 0``
so a quantization block never straddles two rows.

- ``_nf4_matmul_kernel``: tiled ``tl.dot`` forward (prefill/training, M > 16).
- ``_nf4_gemv_kernel``: decode forward for M <= 16, products summed with
  ``tl.sum`` (no tensor cores; the weight is read exactly once).
- ``_nf4_matmul_t_kernel``: ``dX = dy · W`` for the backward pass.
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
                  BLOCKSIZE: tl.constexpr, BLOCK_K: tl.constexpr, K_MAJOR: tl.constexpr):
    """fp32 ``code * absmax`` for rows ``offs_n`` x columns ``offs_k``.

    Shape ``[BLOCK_N, BLOCK_K]``, or ``[BLOCK_K, BLOCK_N]`` when ``K_MAJOR``.
    ``offs_k`` must be ``k_start + arange(BLOCK_K)``. Out-of-range elements are 0 (or -0).
    """
    if K_MAJOR:
        n = offs_n[None, :]
        k = offs_k[:, None]
    else:
        n = offs_n[:, None]
        k = offs_k[None, :]
    mask = (n < N) & (k < K)
    codes = _nf4_codes(packed_ptr, code_ptr, n, k, K, mask)
    blocks_per_row = K // BLOCKSIZE
    if BLOCK_K <= BLOCKSIZE:
        # k_start is a multiple of BLOCK_K and BLOCK_K divides BLOCKSIZE: one block per row.
        scale = tl.load(absmax_ptr + offs_n.to(tl.int64) * blocks_per_row + k_start // BLOCKSIZE,
                        mask=offs_n < N, other=0.0)
        if K_MAJOR:
            scale2d = scale[None, :]
        else:
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
                      BLOCKSIZE, BLOCK_K, False)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit(do_not_specialize=TOKEN_ARGS)
def _nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, h_ptr, lb_ptr, y_ptr,
                       M, N, K, R,
                       stride_xm, stride_xk, stride_ym, stride_yn, stride_bias,
                       stride_hm, stride_hr, stride_lbn, stride_lbr, lora_scale,
                       BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                       BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            in_r = offs_r < R - r0
            ranks = (r0 + offs_r).to(tl.int64)
            h = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + ranks[None, :] * stride_hr,
                        mask=m_mask[:, None] & in_r[None, :], other=0.0)
            b_t = tl.load(lb_ptr + offs_n[None, :].to(tl.int64) * stride_lbn + ranks[:, None] * stride_lbr,
                          mask=n_mask[None, :] & in_r[:, None], other=0.0)
            acc = mma(h.to(dtype), b_t.to(dtype), acc, DOT_PRECISION, UPCAST)
        acc = acc * lora_scale
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        w_t = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, offs_k, k_start, N, K,
                            BLOCKSIZE, BLOCK_K, True)
        acc = mma(x, w_t.to(dtype), acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=TOKEN_ARGS)
def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, h_ptr, lb_ptr, y_ptr,
                     M, N, K, R,
                     stride_xm, stride_xk, stride_ym, stride_yn, stride_bias,
                     stride_hm, stride_hr, stride_lbn, stride_lbr, lora_scale,
                     BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        # Round the weight to x's dtype first, as the tl.dot kernel and torch do.
        w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, offs_k, k_start, N, K,
                          BLOCKSIZE, BLOCK_K, False).to(dtype).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            in_r = offs_r < R - r0
            ranks = (r0 + offs_r).to(tl.int64)
            h = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + ranks[None, :] * stride_hr,
                        mask=m_mask[:, None] & in_r[None, :], other=0.0).to(dtype).to(tl.float32)
            b = tl.load(lb_ptr + offs_n[:, None].to(tl.int64) * stride_lbn + ranks[None, :] * stride_lbr,
                        mask=n_mask[:, None] & in_r[None, :], other=0.0).to(tl.float32)
            lora += tl.sum(h[:, None, :] * b[None, :, :], axis=2)
        acc += lora * lora_scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=SEED_ARGS + TOKEN_ARGS)
def _nf4_matmul_t_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, dh_ptr, la_ptr, dx_ptr,
                         M, N, K, R,
                         stride_dym, stride_dyn, stride_dxm, stride_dxk,
                         stride_hm, stride_hr, stride_lar, stride_lak,
                         lora_scale, p, seed_lo, seed_hi,
                         BLOCKSIZE: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
                         DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    dtype = dy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            in_r = offs_r < R - r0
            ranks = (r0 + offs_r).to(tl.int64)
            dh = tl.load(dh_ptr + offs_m[:, None].to(tl.int64) * stride_hm + ranks[None, :] * stride_hr,
                         mask=m_mask[:, None] & in_r[None, :], other=0.0)
            a = tl.load(la_ptr + ranks[:, None] * stride_lar + offs_k[None, :].to(tl.int64) * stride_lak,
                        mask=in_r[:, None] & k_mask[None, :], other=0.0)
            acc = mma(dh.to(dtype), a.to(dtype), acc, DOT_PRECISION, UPCAST)
        if DROPOUT:
            # Same mask as the LoRA kernels drew for x in the forward pass.
            keep = keep_mask(seed_lo, seed_hi, offs_m, offs_k, K, p)
            acc = tl.where(keep, acc * lora_scale, 0.0)
        else:
            acc = acc * lora_scale
    for n_start in range(0, N, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn,
                     mask=m_mask[:, None] & (offs_n[None, :] < N), other=0.0)
        w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, offs_k, pid_k * BLOCK_K, N, K,
                          BLOCKSIZE, BLOCK_K, False)
        acc = mma(dy, w.to(dtype), acc, DOT_PRECISION, UPCAST)
    tl.store(dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :].to(tl.int64) * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])
