"""The shared Triton layer: what every fastpeft kernel module uses the same way.

See ``docs/architecture.md`` ("Kernels"). In one place:

- **dtypes**: ``TRITON_DTYPE`` maps the torch dtypes the kernels take to Triton
  type names; ``check_kernel_dtype`` raises for any other.
- **precision policy** (``dot_precision``): fp16/bf16 operands multiply on
  tensor cores and accumulate in fp32; fp32 operands follow torch's own
  setting for CUDA matmuls (``torch.backends.cuda.matmul.fp32_precision`` /
  ``allow_tf32``): exact ``"ieee"`` by default, ``"tf32"`` when the user
  allowed TF32 for torch's matmuls too. Every ``tl.dot`` goes through ``mma``,
  which also applies the interpreter's bf16 work-around (``interpreter_upcast``).
- **dropout**: the keep-mask of element ``(row, col)`` of a row-major
  ``[rows, row_len]`` operand is output ``col % 4`` of Philox4x32-10 at
  counter ``row * ceil(row_len / 4) + col // 4``, kept when ``>= p * 2**32``
  (one Philox call per four elements), with the 62-bit key passed as two
  31-bit halves (``split_seed``, ``dropout_args``), never stored; forward,
  backward and every op that shares an input draw the same mask for one seed.
- **tile order**: ``grouped_tile`` maps a 1-D program id onto (row tile,
  column tile) in groups of ``GROUP_M`` row tiles, so a group shares its
  column tiles of the right operand in L2.
- **launch configs**: ``LaunchConfig``, one type for every kernel (tile sizes
  ``block_m``/``block_n``/``block_k``, warps, stages, group size).
- **device guard**: Triton launches on the *current* CUDA device, so every
  public launcher runs inside ``on_device_of(tensor)`` (``@launcher``): a model
  spread over several GPUs launches each kernel where its tensors live.

Naming convention in kernels: a pointer argument is ``<name>_ptr``; its strides
are ``stride_<name><dim>`` (e.g. ``stride_xm``, ``stride_xk``); tile sizes are
the constexprs ``BLOCK_M``/``BLOCK_N``/``BLOCK_K`` (``BLOCK_R`` for a rank);
feature flags are ``HAS_<THING>`` / ``DROPOUT``; the dot precision is the
constexpr ``DOT_PRECISION``, the interpreter work-around ``UPCAST``.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreter_enabled

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KERNEL_DTYPES = tuple(TRITON_DTYPE)
# SMs of the largest GPU the launch plans fill (H100 SXM; an A100 has 108): a launch at a benchmark shape
# should have at least this many programs. The kernel report's grid gate judges sm_90 against it.
TARGET_SMS = 132
SEED_LIMIT = 2**62  # fastpeft.ops draws dropout seeds in [0, SEED_LIMIT)
SEED_ARGS = ["seed_lo", "seed_hi"]  # never specialised: every seed shares one compiled kernel
# The token count changes from call to call: not specialised either (no recompile for M = 1 or for an M that
# is a multiple of 16; M only bounds masks), so one variant per launch config serves every M.
TOKEN_ARGS = ["M"]


def on_device_of(where):
    """A context in which CUDA launches go to the GPU of ``where`` (a tensor or a device); none for CPU."""
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launcher(fn):
    """Runs the public launcher ``fn`` on the device of its first tensor argument."""
    @functools.wraps(fn)
    def on_tensor_device(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with on_device_of(first):
            return fn(*args, **kwargs)

    return on_tensor_device


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_kernel_dtype(what: str, dtype: torch.dtype) -> None:
    """TypeError unless the Triton kernels take ``dtype``."""
    if dtype not in TRITON_DTYPE:
        raise TypeError(f"the Triton {what} kernels take float32, float16 or bfloat16 inputs, not {dtype}")


def fp32_matmul_allows_tf32() -> bool:
    """Whether the user allowed TF32 for torch's fp32 CUDA matmuls (the setting fastpeft follows)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is not None and precision != "none":
        return precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype`` (see the module docstring)."""
    if dtype == torch.float32 and not fp32_matmul_allows_tf32():
        return "ieee"
    return "tf32"


def runs_on_tensor_cores(dtype: torch.dtype, precision: str) -> bool:
    """Whether a ``tl.dot`` on ``dtype`` operands at ``precision`` compiles to tensor-core instructions."""
    return dtype != torch.float32 or precision != "ieee"


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """True when ``mma`` must multiply in fp32: the Triton interpreter's bf16 ``tl.dot`` is wrong."""
    return dtype == torch.bfloat16 and triton_interpreter_enabled()


def split_seed(seed: int) -> tuple[int, int]:
    """The two 31-bit halves a kernel joins into its 62-bit Philox key."""
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**62), got {seed}")
    return seed & 0x7FFFFFFF, seed >> 31


def dropout_args(dropout_p: float, seed: int) -> dict:
    """Keyword arguments ``p, seed_lo, seed_hi, DROPOUT`` of a kernel that applies a dropout mask."""
    seed_lo, seed_hi = split_seed(seed) if dropout_p > 0.0 else (0, 0)
    return dict(p=float(dropout_p), seed_lo=seed_lo, seed_hi=seed_hi, DROPOUT=dropout_p > 0.0)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters of one kernel launch.

    ``block_m``/``block_n`` are the output tile, ``block_k`` the step of the
    reduction loop; a kernel that has no third dimension ignores ``block_n``.
    ``name`` labels the config in the kernel report.
    """

    name: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8

    def launch_options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


@triton.jit
def keep_mask(seed_lo, seed_hi, rows, cols, row_len, p):
    """Dropout keep-mask (True = kept) of elements ``(rows[:, None], cols[None, :])`` of a ``[*, row_len]`` operand.

    ``cols`` must be ``c0 + tl.arange(0, n)`` with ``c0`` and ``n`` multiples of 4 (every kernel's column
    tile is). One Philox4x32-10 call draws the four elements ``4j .. 4j+3`` of a row: counter
    ``row * ceil(row_len / 4) + j``, its output ``col % 4`` kept when ``>= p * 2**32``. The mask is a function
    of (seed, row, col, row_len) only, not of tile sizes or layouts.
    """
    key = (seed_hi.to(tl.int64) << 31) | seed_lo.to(tl.int64)
    n: tl.constexpr = cols.shape[0]
    tl.static_assert(n % 4 == 0, "keep_mask: the column tile must be a multiple of 4 wide")
    # The first column of each group of four (cols is c0 + arange(n), c0 % 4 == 0).
    firsts, _ = tl.split(tl.reshape(cols, (n // 4, 2, 2)))
    firsts, _ = tl.split(firsts)
    words = rows[:, None].to(tl.int64) * ((row_len + 3) // 4) + (firsts // 4)[None, :]
    r0, r1, r2, r3 = tl.randint4x(key, words)
    draws = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], n))
    threshold = tl.minimum(p * 4294967296.0, 4294967040.0).to(tl.uint32)
    return draws >= threshold


@triton.jit
def keep_mask_per_element(seed_lo, seed_hi, rows, cols, row_len, p):
    """Dropout keep-mask with one Philox call per element: ``tl.rand(key, row * row_len + col) >= p``.

    The adapter kernels' mask (their own forward, backward and ``dropout_mask`` all use it, so they agree).
    ``keep_mask``'s four-outputs form costs about a third of the instructions, but in the adapter kernels'
    tile layouts it spilled registers on sm_80 (the kernel report's gate), so they keep this form.
    """
    key = (seed_hi.to(tl.int64) << 31) | seed_lo.to(tl.int64)
    offsets = rows[:, None].to(tl.int64) * row_len + cols[None, :]
    return tl.rand(key, offsets) >= p


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` at the policy's precision (fp32 accumulate)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in the grouped (L2-friendly) order."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n
