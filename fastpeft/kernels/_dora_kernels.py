"""The @triton.jit kernels behind ``fastpeft.kernels.dora`` (launchers live there).

- ``_dora_grad_scale_kernel``: one pass over the output gradient: ``g = c ⊙ dy``
  (the gradient LoRA's backward launches run on) and the magnitude gradient's
  column sums ``Σ_rows(dy ⊙ z)`` in fp32, per column tile and row split;
  the launcher adds the split partials in a fixed order (deterministic, no
  atomics) and divides by the norm. ``WRITE_G`` / ``HAS_Z`` (constexprs)
  drop the half that is not needed.

Rows wrap modulo M for the loads (as the LoRA kernels do); only stores and
the row loop are masked, and wrapped rows add nothing to the sums.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import TOKEN_ARGS


@triton.jit(do_not_specialize=TOKEN_ARGS + ["rows_per_split"])  # one row per split at M = 1: no variant of its own
def _dora_grad_scale_kernel(dy_ptr, z_ptr, scale_ptr, g_ptr, dm_ptr, M, N, rows_per_split,
                            stride_dym, stride_zm,
                            WRITE_G: tl.constexpr, HAS_Z: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    m_start = tl.minimum(pid_s.to(tl.int64) * rows_per_split, M).to(tl.int32)
    m_end = tl.minimum(M, m_start + rows_per_split)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    cols = offs_n % N
    offs_m = tl.arange(0, BLOCK_M)
    if WRITE_G:
        c = tl.load(scale_ptr + cols).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over rows once, after the loop
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + offs_m
        in_m = rows < m_end
        rows64 = (rows % M).to(tl.int64)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :]).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rows64[:, None] * stride_zm + cols[None, :]).to(tl.float32)
            acc += tl.where(in_m[:, None], dy * z, 0.0)
        if WRITE_G:
            g = dy * c[None, :]
            tl.store(g_ptr + rows64[:, None] * N + offs_n[None, :], g.to(g_ptr.dtype.element_ty),
                     mask=in_m[:, None] & in_n[None, :])
    if HAS_Z:
        tl.store(dm_ptr + pid_s.to(tl.int64) * N + offs_n, tl.sum(acc, axis=0), mask=in_n)
