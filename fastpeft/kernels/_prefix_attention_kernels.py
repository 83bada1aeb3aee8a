"""The @triton.jit kernels behind ``fastpeft.kernels.prefix_attention`` (launchers live there).

Attention of queries ``q [B, Hq, Sq, D]`` over two key/value sources read from
their own buffers, never concatenated: the prefix ``pk, pv [Bp, Hkv, P, D]``
(every key visible to every query) and the sequence ``k, v [B, Hkv, Skv, D]``
(optionally causal, bottom-right aligned, and masked by a key-padding mask).
After Triton's fused-attention tutorial and FlashAttention-2:

- ``_prefix_attention_fwd_kernel``: one program per (query block, batch·head);
  online softmax in base 2 (``log2(e)`` folded into the scale) over the prefix
  blocks (an unmasked stage, bounds only) then the sequence blocks (the
  masked/causal stage); stores the output and one natural-log LSE per row.
- ``_prefix_attention_delta_kernel``: ``Δ = rowsum(O ∘ dO)`` (fp32).
- ``_prefix_attention_dkdv_kernel``: one program per key block and
  batch·KV-head; the first ``num_seq_blocks`` programs of axis 0 own sequence
  key blocks, the rest prefix key blocks. A program accumulates over every
  query of every query head of its KV group (GQA by index mapping, no copies).
  Prefix gradients are written as fp32 per-batch partials; the launcher sums
  them over the batch in a fixed order when one prefix is shared (no atomics).
- ``_prefix_attention_dq_kernel``: one program per query block, the same two
  stages as the forward pass.

Rows with no visible key (possible only without a prefix: every sequence key
padded, or causal rows before the first key) get output 0 and LSE ``-inf``;
the backward kernels read such an LSE as ``+inf`` so those rows have zero
probabilities and contribute no gradient.

Every tensor is addressed through its four strides, so HF's ``[B, S, H, D]``
layouts transposed to ``[B, H, S, D]`` run without copies; a shared prefix
(``Bp == 1``) is read with batch stride 0.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import mma

# Lengths and head counts only bound loops and masks (never the contiguous head-dim axis): specialising
# them (== 1, % 16) buys nothing and made fp32 variants spill, so they are not specialised.
_LENGTHS = ["Hq", "Hkv", "Sq", "Skv", "P", "GROUP", "num_seq_blocks"]

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tile_ptrs(base, rows, cols, stride_row, stride_col):
    return base + rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col


@triton.jit
def _sequence_keys_visible(rows, cols, Sq, Skv, mask_row_ptr, stride_maskn,
                           IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """[len(rows), len(cols)] bool: sequence key ``col`` is visible to query ``row``."""
    visible = (cols[None, :] < Skv) & (rows[:, None] >= 0)
    if IS_CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + (Skv - Sq))
    if HAS_MASK:
        keep = tl.load(mask_row_ptr + cols.to(tl.int64) * stride_maskn, mask=cols < Skv, other=0)
        visible = visible & (keep != 0)[None, :]
    return visible


@triton.jit
def _max_with_nan(a, b):
    """``max`` that returns NaN when either is NaN (``tl.max``/``tl.maximum`` default to maxnum: NaN dropped)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of the online softmax (scores in base-2 units)."""
    s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION, UPCAST)
    s = tl.where(visible, s * qk_scale, float("-inf"))
    # The row maximum is NaN once a score is (torch's softmax of such a row is NaN).
    m_new = _max_with_nan(m_i, tl.reduce(s, 1, _max_with_nan))
    # A row that has seen no visible key yet keeps m = -inf; subtract 0 there instead (no inf - inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=_LENGTHS)
def _prefix_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, o_ptr, lse_ptr,
        Hq, Sq, Skv, P, GROUP, D,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_pkb, stride_pkh, stride_pkn, stride_pkd,
        stride_pvb, stride_pvh, stride_pvn, stride_pvd,
        stride_maskb, stride_maskn,
        stride_ob, stride_oh, stride_om, stride_od,
        qk_scale,
        HAS_PREFIX: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hkv = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    q = tl.load(_tile_ptrs(q_ptr + b * stride_qb + h * stride_qh, rows, offs_d, stride_qm, stride_qd),
                mask=(rows[:, None] < Sq) & in_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_PREFIX:  # stage 1: every prefix key is visible; only the last block's bounds are masked
        pk_base = pk_ptr + b * stride_pkb + hkv * stride_pkh
        pv_base = pv_ptr + b * stride_pvb + hkv * stride_pvh
        for start_n in range(0, P, BLOCK_N):
            cols = start_n + offs_n
            in_p = cols < P
            k = tl.load(_tile_ptrs(pk_base, cols, offs_d, stride_pkn, stride_pkd),
                        mask=in_p[:, None] & in_d[None, :], other=0.0)
            v = tl.load(_tile_ptrs(pv_base, cols, offs_d, stride_pvn, stride_pvd),
                        mask=in_p[:, None] & in_d[None, :], other=0.0)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, in_p[None, :], qk_scale,
                                                 BLOCK_M, BLOCK_N, DOT_PRECISION, UPCAST)

    # stage 2: sequence keys, masked (bounds, causal, padding)
    hi = Skv
    if IS_CAUSAL:  # the block's last row sees keys up to start_m + BLOCK_M - 1 + (Skv - Sq)
        hi = tl.minimum(Skv, start_m + BLOCK_M + (Skv - Sq))
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh
    mask_row = mask_ptr + b * stride_maskb
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        in_s = cols < Skv
        k = tl.load(_tile_ptrs(k_base, cols, offs_d, stride_kn, stride_kd),
                    mask=in_s[:, None] & in_d[None, :], other=0.0)
        v = tl.load(_tile_ptrs(v_base, cols, offs_d, stride_vn, stride_vd),
                    mask=in_s[:, None] & in_d[None, :], other=0.0)
        visible = _sequence_keys_visible(rows, cols, Sq, Skv, mask_row, stride_maskn, IS_CAUSAL, HAS_MASK)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale,
                                             BLOCK_M, BLOCK_N, DOT_PRECISION, UPCAST)

    empty = l_i == 0.0  # no visible key: output 0, LSE -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    # A row whose maximum score is +inf: l_i and the output are NaN (exp(inf - inf)), as in torch's softmax;
    # torch.logsumexp gives +inf.
    lse = tl.where(m_i == float("inf"), m_i, lse)
    in_m = rows < Sq
    tl.store(_tile_ptrs(o_ptr + b * stride_ob + h * stride_oh, rows, offs_d, stride_om, stride_od),
             out.to(o_ptr.dtype.element_ty), mask=in_m[:, None] & in_d[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * Sq + rows, lse, mask=in_m)


@triton.jit(do_not_specialize=_LENGTHS)
def _prefix_attention_delta_kernel(
        o_ptr, do_ptr, delta_ptr, Hq, Sq, D,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_dob, stride_doh, stride_dom, stride_dod,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < Sq) & (offs_d[None, :] < D)
    o = tl.load(_tile_ptrs(o_ptr + b * stride_ob + h * stride_oh, rows, offs_d, stride_om, stride_od),
                mask=mask, other=0.0)
    do = tl.load(_tile_ptrs(do_ptr + b * stride_dob + h * stride_doh, rows, offs_d, stride_dom, stride_dod),
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * Sq + rows, delta, mask=rows < Sq)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, row_base, rows, Sq):
    """LSE in base-2 units (+inf for padding rows and rows without a visible key, NaN for NaN rows) and Δ
    of ``rows``. A row whose LSE is +inf had a +inf score: torch's softmax makes each of its probabilities
    NaN, which an LSE of NaN gives."""
    in_m = rows < Sq
    lse = tl.load(lse_ptr + row_base + rows, mask=in_m, other=float("-inf"))
    lse = tl.where(lse == float("inf"), float("nan"), lse)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(delta_ptr + row_base + rows, mask=in_m, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_block(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, mask_row, b, hkv, start_n,
                Hq, Sq, Skv, GROUP, D,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_dob, stride_doh, stride_dom, stride_dod,
                stride_maskn, qk_scale,
                IS_PREFIX: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dK/dV of one key block accumulated over every query of every head of the KV group, batch ``b``."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    cols = start_n + tl.arange(0, BLOCK_N)
    lo = 0
    if not IS_PREFIX:
        if IS_CAUSAL:  # query i sees key j iff i >= j - (Skv - Sq)
            lo = tl.maximum(0, start_n - (Skv - Sq)) // BLOCK_M * BLOCK_M
    for g in range(0, GROUP):
        h = hkv * GROUP + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        row_base = (b * Hq + h) * Sq
        for start_m in range(lo, Sq, BLOCK_M):
            rows = start_m + offs_m
            tile_mask = (rows[:, None] < Sq) & in_d[None, :]
            q = tl.load(_tile_ptrs(q_base, rows, offs_d, stride_qm, stride_qd), mask=tile_mask, other=0.0)
            do = tl.load(_tile_ptrs(do_base, rows, offs_d, stride_dom, stride_dod), mask=tile_mask, other=0.0)
            lse2, delta = _row_stats(lse_ptr, delta_ptr, row_base, rows, Sq)
            s_t = mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), DOT_PRECISION, UPCAST)
            p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
            if not IS_PREFIX:
                visible = _sequence_keys_visible(rows, cols, Sq, Skv, mask_row, stride_maskn, IS_CAUSAL, HAS_MASK)
                p_t = tl.where(tl.trans(visible), p_t, 0.0)
            p_t = tl.where((lse2 != float("inf"))[None, :], p_t, 0.0)  # padding rows, rows without keys
            dv = mma(p_t.to(do.dtype), do, dv, DOT_PRECISION, UPCAST)
            dp_t = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), DOT_PRECISION, UPCAST)
            # Exact zeros where p is (hidden keys, padding rows), not 0 · inf when v or Δ is not finite, as the
            # masked softmax's gradient gives them; no mask kept live across the dots (register pressure).
            ds_t = tl.where(p_t == 0.0, 0.0, p_t * (dp_t - delta[None, :]))
            dk = mma(ds_t.to(q.dtype), q, dk, DOT_PRECISION, UPCAST)
    return dk, dv


@triton.jit(do_not_specialize=_LENGTHS)
def _prefix_attention_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr,
        dk_ptr, dv_ptr, dpk_ptr, dpv_ptr,
        Hq, Hkv, Sq, Skv, P, GROUP, D, num_seq_blocks,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_pkb, stride_pkh, stride_pkn, stride_pkd,
        stride_pvb, stride_pvh, stride_pvn, stride_pvd,
        stride_maskb, stride_maskn,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        sm_scale, qk_scale,
        IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Axis 0: ``num_seq_blocks`` sequence key blocks, then the prefix key blocks.

    Prefix gradients go to fp32 partials ``dpk, dpv [B, Hkv, P, D]`` (contiguous), one per batch element.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = (pid_bh % Hkv).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    mask_row = mask_ptr + b * stride_maskb
    if pid_n < num_seq_blocks:
        start_n = pid_n * BLOCK_N
        cols = start_n + tl.arange(0, BLOCK_N)
        tile_mask = (cols[:, None] < Skv) & in_d[None, :]
        k = tl.load(_tile_ptrs(k_ptr + b * stride_kb + hkv * stride_kh, cols, offs_d, stride_kn, stride_kd),
                    mask=tile_mask, other=0.0)
        v = tl.load(_tile_ptrs(v_ptr + b * stride_vb + hkv * stride_vh, cols, offs_d, stride_vn, stride_vd),
                    mask=tile_mask, other=0.0)
        dk, dv = _dkdv_block(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, mask_row, b, hkv, start_n,
                             Hq, Sq, Skv, GROUP, D,
                             stride_qb, stride_qh, stride_qm, stride_qd,
                             stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_maskn, qk_scale,
                             False, IS_CAUSAL, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST)
        tl.store(_tile_ptrs(dk_ptr + b * stride_dkb + hkv * stride_dkh, cols, offs_d, stride_dkn, stride_dkd),
                 (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(_tile_ptrs(dv_ptr + b * stride_dvb + hkv * stride_dvh, cols, offs_d, stride_dvn, stride_dvd),
                 dv.to(dv_ptr.dtype.element_ty), mask=tile_mask)
    else:
        start_n = (pid_n - num_seq_blocks) * BLOCK_N
        cols = start_n + tl.arange(0, BLOCK_N)
        tile_mask = (cols[:, None] < P) & in_d[None, :]
        k = tl.load(_tile_ptrs(pk_ptr + b * stride_pkb + hkv * stride_pkh, cols, offs_d, stride_pkn, stride_pkd),
                    mask=tile_mask, other=0.0)
        v = tl.load(_tile_ptrs(pv_ptr + b * stride_pvb + hkv * stride_pvh, cols, offs_d, stride_pvn, stride_pvd),
                    mask=tile_mask, other=0.0)
        dk, dv = _dkdv_block(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, mask_row, b, hkv, start_n,
                             Hq, Sq, Skv, GROUP, D,
                             stride_qb, stride_qh, stride_qm, stride_qd,
                             stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_maskn, qk_scale,
                             True, IS_CAUSAL, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST)
        partial = (b * Hkv + hkv) * P * D
        tl.store(_tile_ptrs(dpk_ptr + partial, cols, offs_d, D, 1), dk * sm_scale, mask=tile_mask)
        tl.store(_tile_ptrs(dpv_ptr + partial, cols, offs_d, D, 1), dv, mask=tile_mask)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k, v, visible, qk_scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION, UPCAST)
    p = tl.where(visible, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
    dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION, UPCAST)
    ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)  # hidden keys: 0, not 0 · inf
    return mma(ds.to(k.dtype), k, dq, DOT_PRECISION, UPCAST)


@triton.jit(do_not_specialize=_LENGTHS)
def _prefix_attention_dq_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
        Hq, Sq, Skv, P, GROUP, D,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_pkb, stride_pkh, stride_pkn, stride_pkd,
        stride_pvb, stride_pvh, stride_pvn, stride_pvd,
        stride_maskb, stride_maskn,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        sm_scale, qk_scale,
        HAS_PREFIX: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hkv = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    row_mask = (rows[:, None] < Sq) & in_d[None, :]
    q = tl.load(_tile_ptrs(q_ptr + b * stride_qb + h * stride_qh, rows, offs_d, stride_qm, stride_qd),
                mask=row_mask, other=0.0)
    do = tl.load(_tile_ptrs(do_ptr + b * stride_dob + h * stride_doh, rows, offs_d, stride_dom, stride_dod),
                 mask=row_mask, other=0.0)
    lse2, delta = _row_stats(lse_ptr, delta_ptr, pid_bh.to(tl.int64) * Sq, rows, Sq)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_PREFIX:
        pk_base = pk_ptr + b * stride_pkb + hkv * stride_pkh
        pv_base = pv_ptr + b * stride_pvb + hkv * stride_pvh
        for start_n in range(0, P, BLOCK_N):
            cols = start_n + offs_n
            in_p = cols < P
            k = tl.load(_tile_ptrs(pk_base, cols, offs_d, stride_pkn, stride_pkd),
                        mask=in_p[:, None] & in_d[None, :], other=0.0)
            v = tl.load(_tile_ptrs(pv_base, cols, offs_d, stride_pvn, stride_pvd),
                        mask=in_p[:, None] & in_d[None, :], other=0.0)
            dq = _dq_step(dq, q, do, lse2, delta, k, v, in_p[None, :], qk_scale,
                          BLOCK_M, BLOCK_N, DOT_PRECISION, UPCAST)

    hi = Skv
    if IS_CAUSAL:
        hi = tl.minimum(Skv, start_m + BLOCK_M + (Skv - Sq))
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh
    mask_row = mask_ptr + b * stride_maskb
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        in_s = cols < Skv
        k = tl.load(_tile_ptrs(k_base, cols, offs_d, stride_kn, stride_kd),
                    mask=in_s[:, None] & in_d[None, :], other=0.0)
        v = tl.load(_tile_ptrs(v_base, cols, offs_d, stride_vn, stride_vd),
                    mask=in_s[:, None] & in_d[None, :], other=0.0)
        visible = _sequence_keys_visible(rows, cols, Sq, Skv, mask_row, stride_maskn, IS_CAUSAL, HAS_MASK)
        dq = _dq_step(dq, q, do, lse2, delta, k, v, visible, qk_scale, BLOCK_M, BLOCK_N, DOT_PRECISION, UPCAST)

    tl.store(_tile_ptrs(dq_ptr + b * stride_dqb + h * stride_dqh, rows, offs_d, stride_dqm, stride_dqd),
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=row_mask)
