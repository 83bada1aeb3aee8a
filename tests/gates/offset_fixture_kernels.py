"""Small kernels with and without int32 address products: what ``gates.offset_check`` must find.

Not a kernel module of fastpeft: ``tests/gates/test_int64_offsets.py`` checks
it by name (``check_modules(["offset_fixture_kernels"])``). Each kernel that
the check must flag says so in its docstring; ``FLAGGED`` lists the source
lines the check must report and nothing else may be reported.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _row_times_stride_kernel(x_ptr, y_ptr, M, stride_xm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Flagged: ``rows * stride_xm`` in int32 (the NF4 kernels' bug before they were widened)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    keep = (rows[:, None] == 0) | (rows[:, None] == M - 1)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=keep, other=0.0)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * BLOCK_N + cols[None, :], x, mask=rows[:, None] < M)


@triton.jit
def _widened_after_product_kernel(x_ptr, y_ptr, M, stride_xm, BLOCK_M: tl.constexpr):
    """Flagged: the product wraps before ``.to(tl.int64)`` widens it."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    x = tl.load(x_ptr + (rows * stride_xm).to(tl.int64), mask=rows < M, other=0.0)
    tl.store(y_ptr + rows, x, mask=rows < M)


@triton.jit
def _column_times_unit_stride_kernel(x_ptr, y_ptr, K, stride_xk, BLOCK_K: tl.constexpr):
    """Flagged although launched with ``stride_xk == 1``: a column-major input runs the generic variant."""
    cols = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + cols * stride_xk, mask=cols < K, other=0.0)
    tl.store(y_ptr + cols, x, mask=cols < K)


@triton.jit
def _narrow_pointer_step_kernel(x_ptr, y_ptr, K, stride_xk, BLOCK_K: tl.constexpr):
    """Flagged: the loop's pointer step ``BLOCK_K * stride_xk`` in int32 (a constant times a stride)."""
    offs = tl.arange(0, BLOCK_K)
    ptrs = x_ptr + offs.to(tl.int64) * stride_xk
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        acc += tl.load(ptrs, mask=offs < K - k, other=0.0)
        ptrs += BLOCK_K * stride_xk
    tl.store(y_ptr + offs, acc)


@triton.jit
def _product_in_a_branch_kernel(x_ptr, y_ptr, N, stride_xb, BLOCK: tl.constexpr):
    """Flagged: ``pid_b * stride_xb`` in one branch of a runtime ``if``, reaching the address through a loop
    bound (region-scoped SSA names and loop-carried values)."""
    pid_b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    start = 0
    if pid_b > 0:
        start = pid_b * stride_xb
    else:
        start = pid_b + 1
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for base in range(start, start + N, BLOCK):
        acc += tl.load(x_ptr + base + offs, mask=offs < N, other=0.0)
    tl.store(y_ptr + offs, acc)


@triton.jit
def _widened_kernel(x_ptr, y_ptr, M, N, stride_xm, stride_xn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Not flagged: every stride product in int64; ``pid * BLOCK_M`` is bounded by M; the step widened."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :].to(tl.int64) * stride_xn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for n in range(0, N, BLOCK_N):
        acc += tl.load(ptrs, mask=(rows[:, None] < M) & (cols[None, :] < N - n), other=0.0)
        ptrs += BLOCK_N * tl.cast(stride_xn, tl.int64)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * BLOCK_N + cols[None, :], acc, mask=rows[:, None] < M)


# (kernel, a fragment of the one source line the check must report for it)
FLAGGED = {
    ("_row_times_stride_kernel", "x_ptr + rows[:, None] * stride_xm"),
    ("_widened_after_product_kernel", "(rows * stride_xm).to(tl.int64)"),
    ("_column_times_unit_stride_kernel", "cols * stride_xk"),
    ("_narrow_pointer_step_kernel", "ptrs += BLOCK_K * stride_xk"),
    ("_product_in_a_branch_kernel", "start = pid_b * stride_xb"),
}


def aot_launches() -> None:
    """One launch of each kernel (recorded by the check, never run)."""
    x, y = torch.empty(64, 16), torch.empty(64, 16)
    _row_times_stride_kernel[(4,)](x, y, 64, 16, BLOCK_M=16, BLOCK_N=16)
    _widened_after_product_kernel[(4,)](x, y, 64, 16, BLOCK_M=16)
    _column_times_unit_stride_kernel[(1,)](x, y, 16, 1, BLOCK_K=16)
    _narrow_pointer_step_kernel[(1,)](x, y, 64, 16, BLOCK_K=16)
    _product_in_a_branch_kernel[(4,)](x, y, 16, 256, BLOCK=16)
    _widened_kernel[(4,)](x, y, 64, 16, 16, 1, BLOCK_M=16, BLOCK_N=16)
