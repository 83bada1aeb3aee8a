"""The @triton.jit kernels behind ``fastpeft.kernels.lora`` (launchers live there).

Three kernel shapes cover the LoRA forward and backward, each used twice with
permuted strides:

- ``_lora_shrink_kernel``: ``out[M, R] = scale · drop(src)[M, L] @ mat[L, R]``
  (fp32 accumulate, out in its own dtype), one program per output tile and
  L-split: with several splits each writes its fp32 partial and
  ``_lora_split_sum_kernel`` adds them in a fixed order (deterministic, no
  atomics). Forward ``h = drop(x) Aᵀ / (1-p)``; backward ``dh = dy B``.
- ``_lora_fused_gemm_kernel``: ``out[M, N] = lora_scale · drop'(lhs @ lmat) + src @ mat + bias``
  where the accumulator starts as the LoRA term ``lhs[M, R] @ lmat[R, N]``,
  scaled in fp32 (and masked by dropout when asked). The rank is padded with
  zeros to whole 16-wide chunks (masked loads); up to ``UNROLLED_RANK_STEPS``
  chunks are unrolled and the rest loop, so every r keeps the main loop's
  registers and occupancy. Forward
  ``y = s · h Bᵀ + x Wᵀ + b``; backward ``dx = s/(1-p) · drop'(dh A) + dy W``.
  The LoRA scaling is applied to the fp32 accumulator, never to an fp16/bf16
  operand, so ``s · (x Aᵀ)`` cannot overflow before ``Bᵀ`` brings it down.
- ``_lora_reduce_kernel``: ``out[P, R] = scale · drop(src)[M, P]ᵀ @ hmat[M, R]``,
  one program per output tile and M-split, looping over its rows; the
  launcher sums the per-split fp32 partials in a fixed order (deterministic,
  no atomics). Backward ``dA = s/(1-p) · dhᵀ drop(x)`` and ``dB = s · dyᵀ h``.

Dropout mask, tile order and dot precision come from the shared layer
(``_common``): ``keep_mask`` over x's ``[M, K]`` index space, so forward,
backward and ``dropout_mask`` agree bit for bit; with ``DROPOUT=False`` (a
constexpr) the mask code is not compiled at all.

Loads wrap row/column indices modulo the extent (``% M``) instead of masking
them: the loads stay in bounds, the extra rows/columns are never stored, and
the tiles keep fewer live mask registers. Only the loop dimension and the
stores are masked.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import SEED_ARGS, TOKEN_ARGS, grouped_tile, keep_mask, mma

@triton.jit(do_not_specialize=SEED_ARGS + TOKEN_ARGS)
def _lora_shrink_kernel(src_ptr, mat_ptr, out_ptr, M, L, R, l_per_split,
                        stride_sm, stride_sl, stride_ml, stride_mr,
                        scale, p, seed_lo, seed_hi,
                        BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                        DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Program (m, r, s) sums columns [s*l_per_split, (s+1)*l_per_split) of src into out[s] ([M, R] contiguous).
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    l_start = tl.minimum(pid_s.to(tl.int64) * l_per_split, L).to(tl.int32)  # < 2**31: i32 from here on
    l_end = min(L, l_start + l_per_split)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_l = tl.arange(0, BLOCK_L)
    rows = offs_m % M
    ranks = offs_r % R
    cols = l_start + offs_l
    s_ptrs = src_ptr + rows[:, None].to(tl.int64) * stride_sm + cols[None, :].to(tl.int64) * stride_sl
    m_ptrs = mat_ptr + cols[:, None].to(tl.int64) * stride_ml + ranks[None, :].to(tl.int64) * stride_mr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for l0 in range(l_start, l_end, BLOCK_L):
        in_l = offs_l < l_end - l0
        a = tl.load(s_ptrs, mask=in_l[None, :], other=0.0)
        if DROPOUT:
            keep = keep_mask(seed_lo, seed_hi, offs_m, l0 + offs_l, L, p)
            a = tl.where(keep, a, tl.zeros_like(a))
        b = tl.load(m_ptrs, mask=in_l[:, None], other=0.0)
        acc = mma(a, b, acc, DOT_PRECISION, UPCAST)
        s_ptrs += BLOCK_L * tl.cast(stride_sl, tl.int64)
        m_ptrs += BLOCK_L * tl.cast(stride_ml, tl.int64)
    out_ptrs = out_ptr + pid_s.to(tl.int64) * M * R + offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
    tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def _split_sum_block(part_ptr, out_ptr, splits, rows, cols, stride_or, stride_oc, block, BLOCK: tl.constexpr):
    """Block ``block`` of out[i, j] = sum over s = 0, 1, ... of part[s, i, j] (fp32 ``[splits, rows, cols]``)."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    count = rows.to(tl.int64) * cols
    in_range = offs < count
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    part_ptrs = part_ptr + offs
    for _ in range(splits):
        acc += tl.load(part_ptrs, mask=in_range, other=0.0)
        part_ptrs += count
    out_ptrs = out_ptr + (offs // cols) * stride_or + (offs % cols) * stride_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_range)


# No integer is specialised (one variant per output dtype): the sizes and strides vary with every shape.
@triton.jit(do_not_specialize=["splits", "rows", "cols", "stride_or", "stride_oc", "blocks", "splits2", "rows2",
                               "cols2", "stride2_or", "stride2_oc"])
def _lora_split_sum_kernel(part_ptr, out_ptr, splits, rows, cols, stride_or, stride_oc, blocks,
                           part2_ptr, out2_ptr, splits2, rows2, cols2, stride2_or, stride2_oc,
                           HAS_SECOND: tl.constexpr, BLOCK: tl.constexpr):
    """Sums the fp32 partials ``[splits, rows, cols]`` (contiguous) of a split reduction into out (any strides)
    in the fixed order s = 0, 1, ...: deterministic, no atomics. Programs from ``blocks`` on do the same for a
    second reduction (``HAS_SECOND``), so the backward's dA and dB partials take one launch."""
    pid = tl.program_id(0)
    if HAS_SECOND:
        if pid < blocks:
            _split_sum_block(part_ptr, out_ptr, splits, rows, cols, stride_or, stride_oc, pid, BLOCK)
        else:
            _split_sum_block(part2_ptr, out2_ptr, splits2, rows2, cols2, stride2_or, stride2_oc, pid - blocks, BLOCK)
    else:
        _split_sum_block(part_ptr, out_ptr, splits, rows, cols, stride_or, stride_oc, pid, BLOCK)


@triton.jit
def _lora_rank_chunk(lhs_ptr, lmat_ptr, rows, cols, ranks, R, stride_lr, stride_ln, acc, DOT_PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr):
    """``acc + lhs[rows, ranks] @ lmat[ranks, cols]``, ranks past R read as zeros."""
    in_r = ranks < R
    lm = tl.load(lmat_ptr + ranks[:, None].to(tl.int64) * stride_lr + cols[None, :].to(tl.int64) * stride_ln,
                 mask=in_r[:, None], other=0.0)
    h = tl.load(lhs_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :], mask=in_r[None, :], other=0.0)
    return mma(h.to(lm.dtype), lm, acc, DOT_PRECISION, UPCAST)


@triton.jit(do_not_specialize=SEED_ARGS + TOKEN_ARGS)
def _lora_fused_gemm_kernel(src_ptr, mat_ptr, lhs_ptr, lmat_ptr, bias_ptr, out_ptr, M, N, L, R,
                            stride_sm, stride_sl, stride_ml, stride_mn, stride_lr, stride_ln, stride_bias,
                            lora_scale, p, seed_lo, seed_hi,
                            HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                            BLOCK_R: tl.constexpr, RANK_STEPS: tl.constexpr, UNROLLED_RANK_STEPS: tl.constexpr,
                            GROUP_M: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N

    # The LoRA term initialises the accumulator (lhs is [M, R], contiguous). The rank is padded with zeros
    # (masked loads) to RANK_STEPS chunks of BLOCK_R. Up to UNROLLED_RANK_STEPS chunks are unrolled (a runtime
    # loop before the main loop cost r = 8 a third more registers); the rest, if any, run in a loop (unrolling
    # all eight chunks of r = 128 took fp32 "ieee" to 255 registers; see _lora_configs).
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in tl.static_range(min(RANK_STEPS, UNROLLED_RANK_STEPS)):
        acc = _lora_rank_chunk(lhs_ptr, lmat_ptr, rows, cols, step * BLOCK_R + offs_r, R, stride_lr, stride_ln, acc,
                               DOT_PRECISION, UPCAST)
    if RANK_STEPS > UNROLLED_RANK_STEPS:
        for r0 in range(UNROLLED_RANK_STEPS * BLOCK_R, R, BLOCK_R):
            acc = _lora_rank_chunk(lhs_ptr, lmat_ptr, rows, cols, r0 + offs_r, R, stride_lr, stride_ln, acc,
                                   DOT_PRECISION, UPCAST)
    if DROPOUT:
        keep = keep_mask(seed_lo, seed_hi, offs_m, offs_n, N, p)
        acc = tl.where(keep, acc * lora_scale, 0.0)
    else:
        acc = acc * lora_scale

    offs_l = tl.arange(0, BLOCK_L)
    s_ptrs = src_ptr + rows[:, None].to(tl.int64) * stride_sm + offs_l[None, :].to(tl.int64) * stride_sl
    m_ptrs = mat_ptr + offs_l[:, None].to(tl.int64) * stride_ml + cols[None, :].to(tl.int64) * stride_mn
    for l0 in range(0, L, BLOCK_L):
        in_l = offs_l < L - l0
        a = tl.load(s_ptrs, mask=in_l[None, :], other=0.0)
        b = tl.load(m_ptrs, mask=in_l[:, None], other=0.0)
        acc = mma(a, b, acc, DOT_PRECISION, UPCAST)
        s_ptrs += BLOCK_L * tl.cast(stride_sl, tl.int64)
        m_ptrs += BLOCK_L * tl.cast(stride_ml, tl.int64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols.to(tl.int64) * stride_bias).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=SEED_ARGS + TOKEN_ARGS)
def _lora_reduce_kernel(src_ptr, hmat_ptr, out_ptr, M, P, R, rows_per_split,
                        stride_sm, stride_sp, stride_os, stride_op, stride_or,
                        scale, p, seed_lo, seed_hi,
                        BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Program (p, r, s) sums rows [s*rows_per_split, (s+1)*rows_per_split) into out[s].
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    m_start = tl.minimum(pid_s.to(tl.int64) * rows_per_split, M).to(tl.int32)  # < 2**31: i32 from here on
    m_end = min(M, m_start + rows_per_split)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    cols = offs_p % P
    ranks = offs_r % R
    rows = m_start + offs_m
    s_ptrs = src_ptr + rows[:, None].to(tl.int64) * stride_sm + cols[None, :].to(tl.int64) * stride_sp
    h_ptrs = hmat_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        in_m = offs_m < m_end - m0
        a = tl.load(s_ptrs, mask=in_m[:, None], other=0.0)
        if DROPOUT:
            keep = keep_mask(seed_lo, seed_hi, m0 + offs_m, offs_p, P, p)
            a = tl.where(keep, a, tl.zeros_like(a))
        h = tl.load(h_ptrs, mask=in_m[:, None], other=0.0).to(a.dtype)
        acc = mma(tl.trans(a), h, acc, DOT_PRECISION, UPCAST)
        # int32 step (offset_check accepts it, tests/gates/test_int64_offsets.py): an int64 step costs 32 registers
        # on sm_80 here, and BLOCK_M * stride_sm only wraps for a row stride >= 2**31 / BLOCK_M elements.
        s_ptrs += BLOCK_M * stride_sm
        h_ptrs += BLOCK_M * R
    out_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os + offs_p[:, None].to(tl.int64) * stride_op
                + offs_r[None, :].to(tl.int64) * stride_or)
    tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty),
             mask=(offs_p[:, None] < P) & (offs_r[None, :] < R))


@triton.jit(do_not_specialize=SEED_ARGS + TOKEN_ARGS)
def _dropout_keep_kernel(out_ptr, M, K, p, seed_lo, seed_hi, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed_lo, seed_hi, offs_m, offs_k, K, p)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(out_ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))
