"""The @triton.jit kernels behind ``fastpeft.kernels.adapter`` (launchers live there).

- ``_adapter_down_kernel`` (few rows only): fp32 partials of ``x W_dᵀ`` over
  ``K`` ranges, so a short input still spreads the down-projection over many
  programs; the forward kernel then sums them (``FROM_PARTS``) instead of
  reading x.
- ``_adapter_forward_kernel``: program ``(i, j)`` owns row block ``i``. It
  computes ``pre = x W_dᵀ + b_d`` for all ``b`` bottleneck columns at once
  (``BLOCK_B`` = b padded to a power of two, at most 256, kept in registers),
  ``z = act(pre)``, then for the output tiles ``j, j + n_step, ...`` the
  product ``z W_uᵀ`` with bias, scale, dropout and residual in the epilogue:
  x is read once, y written once, z never leaves the chip. Column groups
  (``j > 0``) only exist when there are too few row blocks to fill the GPU;
  each recomputes ``pre`` for its rows.
- ``_adapter_backward_rows_kernel``: one program per row block. Loads the
  saved ``pre``, walks the output tiles once reading ``dy``:
  ``g = keep ∘ dy / (1-p)``, ``ds = s ∘ g``, ``dz += ds W_u``; per-row-block
  fp32 partial sums of ``ds`` (for ``db_u``) and of ``g ∘ u`` with
  ``u = z W_uᵀ + b_u`` recomputed (for ``dscale``); then
  ``da = dz ∘ act'(pre)`` (stored fp32 for ``dW_d``/``db_d``) and a second
  walk writes ``dx = da W_d``.
- ``_adapter_reduce_kernel``: ``out[s, P, R] = Σ_{m in split s} f(src)[m, P] h'[m, R]``
  with ``f`` the dropout mask and ``h' = act(h)`` when asked; the launcher
  applies the scalar factors and sums the split partials in a fixed order.
  ``dW_u = (s∘g)ᵀ act(pre)`` and ``dW_d = daᵀ x``.

The activation is the constexpr ``ACT`` (ids of ``fastpeft.activations``),
computed in fp32 by ``activate`` / ``activate_grad``. Every dot goes through
``_common.mma``; the dropout mask of element ``(m, n)`` of the ``[M, H]``
output is ``_common.keep_mask_per_element`` with row length ``H``, in every kernel (``keep_mask``'s
cheaper four-outputs form spilled registers here on sm_80).
Padded bottleneck columns (``b <= c < BLOCK_B``) load zero weights, so they
add nothing whatever ``act(0)`` is.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import activations
from ._common import SEED_ARGS, TOKEN_ARGS, keep_mask_per_element, mma

# --- activations (ids: fastpeft.activations) -----------------------------------------------------------
# The table's ids as constexprs (a @triton.jit function reads a global only when it is a tl.constexpr).
ACT_RELU = tl.constexpr(activations.RELU)
ACT_GELU = tl.constexpr(activations.GELU)
ACT_GELU_TANH = tl.constexpr(activations.GELU_TANH)
ACT_QUICK_GELU = tl.constexpr(activations.QUICK_GELU)
ACT_SILU = tl.constexpr(activations.SILU)
ACT_TANH = tl.constexpr(activations.TANH)
ACT_SIGMOID = tl.constexpr(activations.SIGMOID)
ACT_LEAKY_RELU = tl.constexpr(activations.LEAKY_RELU)
ACT_IDENTITY = tl.constexpr(activations.IDENTITY)
ACT_MISH = tl.constexpr(activations.MISH)
ACT_RELU6 = tl.constexpr(activations.RELU6)
ACT_LEAKY_SLOPE = tl.constexpr(activations.LEAKY_SLOPE)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _gelu_tanh_inner(x):
    return _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))


@triton.jit
def activate(x, ACT: tl.constexpr):
    """``act(x)`` for fp32 ``x``."""
    if ACT == ACT_RELU:
        y = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.relu
    elif ACT == ACT_GELU:  # gelu (erf)
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == ACT_GELU_TANH:  # gelu, tanh form
        y = 0.5 * x * (1.0 + _gelu_tanh_inner(x))
    elif ACT == ACT_QUICK_GELU:
        y = x * tl.sigmoid(1.702 * x)
    elif ACT == ACT_SILU:  # silu / swish
        y = x * tl.sigmoid(x)
    elif ACT == ACT_TANH:
        y = _tanh(x)
    elif ACT == ACT_SIGMOID:
        y = tl.sigmoid(x)
    elif ACT == ACT_LEAKY_RELU:
        y = tl.where(x > 0.0, x, ACT_LEAKY_SLOPE * x)
    elif ACT == ACT_IDENTITY:
        y = x
    elif ACT == ACT_MISH:
        y = x * _tanh(_softplus(x))
    else:  # relu6
        y = tl.minimum(tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0,
                       propagate_nan=tl.PropagateNan.ALL)
    return y


@triton.jit
def activate_grad(x, ACT: tl.constexpr):
    """``act'(x)`` for fp32 ``x``."""
    if ACT == ACT_RELU:
        d = tl.where(x <= 0.0, 0.0, 1.0)  # 1 at NaN, as torch's threshold_backward
    elif ACT == ACT_GELU:
        d = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == ACT_GELU_TANH:
        t = _gelu_tanh_inner(x)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == ACT_QUICK_GELU:
        s = tl.sigmoid(1.702 * x)
        d = s + 1.702 * x * s * (1.0 - s)
    elif ACT == ACT_SILU:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == ACT_TANH:
        t = _tanh(x)
        d = 1.0 - t * t
    elif ACT == ACT_SIGMOID:
        s = tl.sigmoid(x)
        d = s * (1.0 - s)
    elif ACT == ACT_LEAKY_RELU:
        d = tl.where(x > 0.0, 1.0, ACT_LEAKY_SLOPE)
    elif ACT == ACT_IDENTITY:
        d = tl.full(x.shape, 1.0, tl.float32)
    elif ACT == ACT_MISH:
        t = _tanh(_softplus(x))
        d = t + x * (1.0 - t * t) * tl.sigmoid(x)
    else:
        d = tl.where((x > 0.0) & (x < 6.0), 1.0, 0.0)
    return d


# --- shared pieces ----------------------------------------------------------------------------------------


@triton.jit
def _output_scale(scale, scale_ptr, cols, in_cols, SCALE: tl.constexpr):
    """The scale of output columns ``cols``: the float ``scale`` (0), a 0-dim tensor (1), per channel (2)."""
    if SCALE == 0:
        s = scale
    elif SCALE == 1:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = tl.load(scale_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
    return s


@triton.jit
def _down_projection(x_ptr, down_w_ptr, rows, in_rows, offs_b, in_b, k_start, k_end, stride_xm, stride_xh,
                     stride_dwb, stride_dwh, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``x[rows, k_start:k_end] W_d[:, k_start:k_end]ᵀ`` as a ``[BLOCK_M, BLOCK_B]`` tile."""
    offs_k = tl.arange(0, BLOCK_K)
    cols = (k_start + offs_k).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xh
    w_ptrs = down_w_ptr + offs_b[None, :].to(tl.int64) * stride_dwb + cols[:, None] * stride_dwh
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        in_k = offs_k < k_end - k0
        a = tl.load(x_ptrs, mask=in_rows[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=in_k[:, None] & in_b[None, :], other=0.0)
        acc = mma(a, w, acc, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * tl.cast(stride_xh, tl.int64)
        w_ptrs += BLOCK_K * tl.cast(stride_dwh, tl.int64)
    return acc


# --- kernels ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=TOKEN_ARGS)
def _adapter_down_kernel(x_ptr, down_w_ptr, part_ptr, M, H, B, k_per_split,
                         stride_xm, stride_xh, stride_dwb, stride_dwh,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Program (i, s): part[s, row block i] = x[:, K range s] W_d[:, K range s]ᵀ (fp32).
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < M
    offs_b = tl.arange(0, BLOCK_B)
    in_b = offs_b < B
    k_start = tl.minimum(pid_s.to(tl.int64) * k_per_split, H).to(tl.int32)  # < 2**31: i32 from here on
    part = _down_projection(x_ptr, down_w_ptr, rows, in_rows, offs_b, in_b, k_start,
                            tl.minimum(H, k_start + k_per_split), stride_xm, stride_xh, stride_dwb, stride_dwh,
                            BLOCK_M, BLOCK_K, BLOCK_B, DOT_PRECISION, UPCAST)
    part_ptrs = part_ptr + (pid_s.to(tl.int64) * M + rows[:, None]) * B + offs_b[None, :]
    tl.store(part_ptrs, part, mask=in_rows[:, None] & in_b[None, :])


@triton.jit(do_not_specialize=SEED_ARGS + TOKEN_ARGS)
def _adapter_forward_kernel(
        x_ptr, down_w_ptr, down_b_ptr, up_w_ptr, up_b_ptr, residual_ptr, scale_ptr, y_ptr, pre_ptr, part_ptr,
        M, H, B, n_step, n_parts,
        stride_xm, stride_xh, stride_dwb, stride_dwh, stride_uwh, stride_uwb, stride_rm, stride_rh,
        scale, p, seed_lo, seed_hi,
        ACT: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        SCALE: tl.constexpr, DROPOUT: tl.constexpr, STORE_PRE: tl.constexpr, FROM_PARTS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < M
    offs_b = tl.arange(0, BLOCK_B)
    in_b = offs_b < B
    if FROM_PARTS:  # split-K down-projection: sum the partials of _adapter_down_kernel in a fixed order
        pre = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
        part_ptrs = part_ptr + rows[:, None].to(tl.int64) * B + offs_b[None, :]
        for _ in range(0, n_parts):
            pre += tl.load(part_ptrs, mask=in_rows[:, None] & in_b[None, :], other=0.0)
            part_ptrs += M * B  # int32 (accepted by the offset test): few rows only, M * B < 2**20
    else:
        pre = _down_projection(x_ptr, down_w_ptr, rows, in_rows, offs_b, in_b, 0, H, stride_xm, stride_xh,
                               stride_dwb, stride_dwh, BLOCK_M, BLOCK_K, BLOCK_B, DOT_PRECISION, UPCAST)
    if HAS_DOWN_BIAS:
        pre += tl.load(down_b_ptr + offs_b, mask=in_b, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        pre_ptrs = pre_ptr + rows[:, None].to(tl.int64) * B + offs_b[None, :]
        tl.store(pre_ptrs, pre, mask=in_rows[:, None] & in_b[None, :] & (pid_n == 0))
    # Padding lanes exact 0: an infinite x makes them 0 · inf = NaN, which the up-projection would spread.
    z = tl.where(in_b[None, :], activate(pre, ACT), 0.0).to(y_ptr.dtype.element_ty)

    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(pid_n * BLOCK_N, H, n_step):
        cols = n0 + offs_n
        in_cols = cols < H
        up_w = tl.load(up_w_ptr + offs_b[:, None].to(tl.int64) * stride_uwb + cols[None, :].to(tl.int64) * stride_uwh,
                       mask=in_b[:, None] & in_cols[None, :], other=0.0)
        acc = mma(z, up_w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION, UPCAST)
        if HAS_UP_BIAS:
            acc += tl.load(up_b_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        acc = acc * _output_scale(scale, scale_ptr, cols, in_cols, SCALE)
        if DROPOUT:
            keep = keep_mask_per_element(seed_lo, seed_hi, rows, cols, H, p)
            acc = tl.where(keep, acc * (1.0 / (1.0 - p)), 0.0)
        in_tile = in_rows[:, None] & in_cols[None, :]
        if HAS_RESIDUAL:
            res_ptrs = residual_ptr + rows[:, None].to(tl.int64) * stride_rm + cols[None, :].to(tl.int64) * stride_rh
            acc += tl.load(res_ptrs, mask=in_tile, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=in_tile)


@triton.jit(do_not_specialize=SEED_ARGS + TOKEN_ARGS)
def _adapter_backward_rows_kernel(
        dy_ptr, pre_ptr, up_w_ptr, up_b_ptr, down_w_ptr, scale_ptr, da_ptr, dx_ptr, dscale_part_ptr, dbu_part_ptr,
        M, H, B,
        stride_dym, stride_dyh, stride_uwh, stride_uwb, stride_dwb, stride_dwh,
        scale, p, seed_lo, seed_hi,
        ACT: tl.constexpr, HAS_UP_BIAS: tl.constexpr, SCALE: tl.constexpr, DROPOUT: tl.constexpr,
        NEED_DA: tl.constexpr, NEED_DX: tl.constexpr, NEED_DSCALE: tl.constexpr, NEED_DBU: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < M
    offs_b = tl.arange(0, BLOCK_B)
    in_b = offs_b < B
    dtype = dy_ptr.dtype.element_ty
    pre_ptrs = pre_ptr + rows[:, None].to(tl.int64) * B + offs_b[None, :]
    pre = tl.load(pre_ptrs, mask=in_rows[:, None] & in_b[None, :], other=0.0)
    if NEED_DSCALE:
        z = activate(pre, ACT).to(dtype)
    dz = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)

    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, H, BLOCK_N):
        cols = n0 + offs_n
        in_cols = cols < H
        in_tile = in_rows[:, None] & in_cols[None, :]
        g = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_dym + cols[None, :].to(tl.int64) * stride_dyh,
                    mask=in_tile, other=0.0).to(tl.float32)
        if DROPOUT:
            keep = keep_mask_per_element(seed_lo, seed_hi, rows, cols, H, p)
            g = tl.where(keep, g * (1.0 / (1.0 - p)), 0.0)
        ds = g * _output_scale(scale, scale_ptr, cols, in_cols, SCALE)
        # up_w[n, c] as an [BLOCK_N, BLOCK_B] tile
        # offs_b * stride in int32 (accepted by the offset test): offs_b < 256; int64 cost 13 registers on sm_90
        up_w = tl.load(up_w_ptr + cols[:, None].to(tl.int64) * stride_uwh + offs_b[None, :] * stride_uwb,
                       mask=in_cols[:, None] & in_b[None, :], other=0.0)
        if NEED_DBU:
            tl.store(dbu_part_ptr + pid_m.to(tl.int64) * H + cols, tl.sum(ds, axis=0), mask=in_cols)
        if NEED_DSCALE:
            u = mma(z, tl.trans(up_w), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION, UPCAST)
            if HAS_UP_BIAS:
                u += tl.load(up_b_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
            tl.store(dscale_part_ptr + pid_m.to(tl.int64) * H + cols, tl.sum(g * u, axis=0), mask=in_cols)
        if NEED_DA:
            dz = mma(ds.to(dtype), up_w, dz, DOT_PRECISION, UPCAST)

    if NEED_DA:
        act_grad = activate_grad(pre, ACT)
        if ACT == ACT_RELU or ACT == ACT_RELU6:
            # Exact 0 where act' is 0 (torch's relu/hardtanh backward selects: no 0 · inf) and in the padding lanes.
            da = tl.where(in_b[None, :] & (act_grad != 0.0), dz * act_grad, 0.0)
        else:  # a smooth act' multiplies, as torch's backward does
            da = dz * act_grad
        tl.store(da_ptr + rows[:, None].to(tl.int64) * B + offs_b[None, :], da,
                 mask=in_rows[:, None] & in_b[None, :])
        if NEED_DX:
            da_in = da.to(dtype)
            for n0 in range(0, H, BLOCK_N):
                cols = n0 + offs_n
                in_cols = cols < H
                down_w = tl.load(down_w_ptr + offs_b[:, None] * stride_dwb + cols[None, :].to(tl.int64) * stride_dwh,
                                 mask=in_b[:, None] & in_cols[None, :], other=0.0)
                dx = mma(da_in, down_w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION, UPCAST)
                tl.store(dx_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], dx.to(dtype),
                         mask=in_rows[:, None] & in_cols[None, :])


@triton.jit(do_not_specialize=SEED_ARGS + TOKEN_ARGS)
def _adapter_reduce_kernel(
        src_ptr, h_ptr, out_ptr, M, P, R, rows_per_split,
        stride_sm, stride_sp, stride_os, stride_op, stride_or,
        p, seed_lo, seed_hi,
        ACT: tl.constexpr, ACTIVATE_H: tl.constexpr, DROPOUT: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Program (i, j, s): out[s, P tile i, R tile j] over rows [s * rows_per_split, (s + 1) * rows_per_split).
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    m_start = tl.minimum(pid_s.to(tl.int64) * rows_per_split, M).to(tl.int32)  # < 2**31: i32 from here on
    m_end = tl.minimum(M, m_start + rows_per_split)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    in_p = offs_p < P
    in_r = offs_r < R
    offs_m = tl.arange(0, BLOCK_M)
    dtype = src_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + offs_m
        in_m = rows < m_end
        a = tl.load(src_ptr + rows[:, None].to(tl.int64) * stride_sm + offs_p[None, :].to(tl.int64) * stride_sp,
                    mask=in_m[:, None] & in_p[None, :], other=0.0)
        if DROPOUT:
            keep = keep_mask_per_element(seed_lo, seed_hi, rows, offs_p, P, p)
            a = tl.where(keep, a, tl.zeros_like(a))
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * R + offs_r[None, :], mask=in_m[:, None] & in_r[None, :],
                    other=0.0)
        if ACTIVATE_H:
            h = tl.where(in_m[:, None], activate(h, ACT), 0.0)
        acc = mma(tl.trans(a), h.to(dtype), acc, DOT_PRECISION, UPCAST)
    out_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os + offs_p[:, None].to(tl.int64) * stride_op
                + offs_r[None, :].to(tl.int64) * stride_or)
    tl.store(out_ptrs, acc, mask=in_p[:, None] & in_r[None, :])


@triton.jit(do_not_specialize=SEED_ARGS + TOKEN_ARGS)
def _adapter_keep_kernel(out_ptr, M, H, p, seed_lo, seed_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = keep_mask_per_element(seed_lo, seed_hi, rows, cols, H, p)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (cols[None, :] < H))
