"""The @triton.jit kernels behind ``fastpeft.kernels.lora`` (launchers live there).

Three kernel shapes cover the LoRA forward and backward, each used twice with
permuted strides:

- ``_lora_shrink_kernel``: ``out[M, R] = scale · drop(src)[M, L] @ mat[L, R]``
  (fp32 out). Forward ``h = s·drop(x) Aᵀ``; backward ``dh = s · dy B``.
- ``_lora_fused_gemm_kernel``: ``out[M, N] = lora + src[M, L] @ mat[L, N] + bias``
  where the accumulator starts as ``lora = lhs[M, R] @ lmat[R, N]`` (masked by
  dropout when asked). Forward ``y = h Bᵀ + x Wᵀ + b``; backward
  ``dx = drop'(dh A) + dy W``.
- ``_lora_reduce_kernel``: ``out[P, R] = scale · drop(src)[M, P]ᵀ @ hmat[M, R]``,
  one program per output tile and M-split, looping over its rows; the
  launcher sums the per-split fp32 partials in a fixed order (deterministic,
  no atomics). Backward ``dA = dhᵀ drop(x)`` and ``dB = dyᵀ h``.

Dropout mask: never stored. Element (row, col) of x is kept iff
``tl.rand(key, row * K + col) >= p`` (Philox, int64 offsets), where the 62-bit
key is passed as two non-specialised 31-bit halves. Every kernel and
``_dropout_keep_kernel`` call the same ``keep_mask``, so forward, backward and
``dropout_mask`` agree bit for bit. With ``DROPOUT=False`` (a constexpr) the
mask code is not compiled at all.

Loads wrap row/column indices modulo the extent (``% M``) instead of masking
them: the loads stay in bounds, the extra rows/columns are never stored, and
the tiles keep fewer live mask registers. Only the loop dimension and the
stores are masked.
"""
from __future__ import annotations

import triton
import triton.language as tl

_SEEDS = ["seed_lo", "seed_hi"]


@triton.jit
def keep_mask(seed_lo, seed_hi, rows, cols, row_len, p):
    key = (seed_hi.to(tl.int64) << 31) | seed_lo.to(tl.int64)
    offsets = rows[:, None].to(tl.int64) * row_len + cols[None, :]
    return tl.rand(key, offsets) >= p


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the interpreter's bf16 dot is wrong, so it multiplies in fp32 there.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit(do_not_specialize=_SEEDS)
def _lora_shrink_kernel(src, mat, out, M, L, R,
                        stride_sm, stride_sl, stride_ml, stride_mr,
                        scale, p, seed_lo, seed_hi,
                        BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                        DROPOUT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_l = tl.arange(0, BLOCK_L)
    rows = offs_m % M
    ranks = offs_r % R
    s_ptrs = src + rows[:, None].to(tl.int64) * stride_sm + offs_l[None, :] * stride_sl
    m_ptrs = mat + offs_l[:, None] * stride_ml + ranks[None, :] * stride_mr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        in_l = offs_l < L - l0
        a = tl.load(s_ptrs, mask=in_l[None, :], other=0.0)
        if DROPOUT:
            keep = keep_mask(seed_lo, seed_hi, offs_m, l0 + offs_l, L, p)
            a = tl.where(keep, a, tl.zeros_like(a))
        b = tl.load(m_ptrs, mask=in_l[:, None], other=0.0)
        acc = _mma(a, b, acc, PREC, UPCAST)
        s_ptrs += BLOCK_L * stride_sl
        m_ptrs += BLOCK_L * stride_ml
    out_ptrs = out + offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
    tl.store(out_ptrs, acc * scale, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit(do_not_specialize=_SEEDS)
def _lora_fused_gemm_kernel(src, mat, lhs, lmat, bias, out, M, N, L, R,
                            stride_sm, stride_sl, stride_ml, stride_mn, stride_lr, stride_ln,
                            drop_scale, p, seed_lo, seed_hi,
                            HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                            BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                            PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Grouped tile order: GROUP_M row tiles share the column tiles of mat in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N

    # The LoRA term initialises the accumulator (lhs is fp32 [M, R], contiguous).
    offs_r = tl.arange(0, BLOCK_R)
    l_ptrs = lhs + rows[:, None].to(tl.int64) * R + offs_r[None, :]
    lm_ptrs = lmat + offs_r[:, None] * stride_lr + cols[None, :] * stride_ln
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        in_r = offs_r < R - r0
        lm = tl.load(lm_ptrs, mask=in_r[:, None], other=0.0)
        h = tl.load(l_ptrs, mask=in_r[None, :], other=0.0).to(lm.dtype)
        acc = _mma(h, lm, acc, PREC, UPCAST)
        l_ptrs += BLOCK_R
        lm_ptrs += BLOCK_R * stride_lr
    if DROPOUT:
        keep = keep_mask(seed_lo, seed_hi, offs_m, offs_n, N, p)
        acc = tl.where(keep, acc * drop_scale, 0.0)

    offs_l = tl.arange(0, BLOCK_L)
    s_ptrs = src + rows[:, None].to(tl.int64) * stride_sm + offs_l[None, :] * stride_sl
    m_ptrs = mat + offs_l[:, None].to(tl.int64) * stride_ml + cols[None, :].to(tl.int64) * stride_mn
    for l0 in range(0, L, BLOCK_L):
        in_l = offs_l < L - l0
        a = tl.load(s_ptrs, mask=in_l[None, :], other=0.0)
        b = tl.load(m_ptrs, mask=in_l[:, None], other=0.0)
        acc = _mma(a, b, acc, PREC, UPCAST)
        s_ptrs += BLOCK_L * stride_sl
        m_ptrs += BLOCK_L * stride_ml
    if HAS_BIAS:
        acc += tl.load(bias + cols).to(tl.float32)[None, :]
    out_ptrs = out + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=_SEEDS)
def _lora_reduce_kernel(src, hmat, out, M, P, R, rows_per_split,
                        stride_sm, stride_sp, stride_os, stride_op, stride_or,
                        scale, p, seed_lo, seed_hi,
                        BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        DROPOUT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Program (p, r, s) sums rows [s*rows_per_split, (s+1)*rows_per_split) into out[s].
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    m_start = pid_s * rows_per_split
    m_end = min(M, m_start + rows_per_split)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    cols = offs_p % P
    ranks = offs_r % R
    rows = m_start + offs_m
    s_ptrs = src + rows[:, None].to(tl.int64) * stride_sm + cols[None, :] * stride_sp
    h_ptrs = hmat + rows[:, None].to(tl.int64) * R + ranks[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        in_m = offs_m < m_end - m0
        a = tl.load(s_ptrs, mask=in_m[:, None], other=0.0)
        if DROPOUT:
            keep = keep_mask(seed_lo, seed_hi, m0 + offs_m, offs_p, P, p)
            a = tl.where(keep, a, tl.zeros_like(a))
        h = tl.load(h_ptrs, mask=in_m[:, None], other=0.0).to(a.dtype)
        acc = _mma(tl.trans(a), h, acc, PREC, UPCAST)
        s_ptrs += BLOCK_M * stride_sm
        h_ptrs += BLOCK_M * R
    out_ptrs = out + pid_s.to(tl.int64) * stride_os + offs_p[:, None] * stride_op + offs_r[None, :] * stride_or
    tl.store(out_ptrs, (acc * scale).to(out.dtype.element_ty),
             mask=(offs_p[:, None] < P) & (offs_r[None, :] < R))


@triton.jit(do_not_specialize=_SEEDS)
def _dropout_keep_kernel(out, M, K, p, seed_lo, seed_hi, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed_lo, seed_hi, offs_m, offs_k, K, p)
    out_ptrs = out + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(out_ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))
