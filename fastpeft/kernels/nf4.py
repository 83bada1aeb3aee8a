"""Triton NF4 (bitsandbytes 4-bit NormalFloat) linear: plain launchers (no autograd).

Dispatch contract (``docs/architecture.md``): ``fastpeft.ops.nf4`` calls
``nf4_forward`` / ``nf4_input_grad`` here or in ``fastpeft.cpu.nf4``,
which has the same functions. ``nf4_matmul`` / ``nf4_matmul_transposed`` are
the general launchers (optional LoRA term in the accumulator, used by
``fastpeft.kernels.qlora``); ``nf4_dequantize`` runs the same dequantization
helper and is what tests compare against bitsandbytes.

The kernels (``_nf4_kernels``) keep ``W`` packed and dequantize tiles in
registers, bit-identical to ``bitsandbytes.functional.dequantize_4bit``. The
launchers require ``K % blocksize == 0``; double-quantized absmax must be
resolved to fp32 by the caller (``NF4Weight.absmax_float()``). Dot precision
follows the shared policy (``_common.dot_precision``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..quant.nf4 import NF4Weight
from ._common import LaunchConfig, check_kernel_dtype, dot_precision, interpreter_upcast, launcher, split_seed
from ._nf4_kernels import _nf4_dequant_kernel, _nf4_matmul_kernel, _nf4_matmul_t_kernel
from .nf4_gemv import GEMV_MAX_M, LORA_RANK_BLOCK, launch_gemv

__all__ = ["check_kernel_dtype", "nf4_dequantize", "nf4_forward", "nf4_input_grad", "nf4_matmul",
           "nf4_matmul_transposed"]

# GEMM tiles by dot precision: forward and dX (backward), each for M < 1024 ("small") and M >= 1024
# ("large"). The kernels compute the transposed tile (the dequantized weight is the register operand of the
# dot), so block_m is the dot's N: a larger block_m spreads each dequantized weight tile over more tokens.
# 16-bit tiles are sized for sm_90 (kernel report): wgmma kept in flight, >= 2 CTAs per SM, no spills on
# sm_80 or sm_90. fp32 "ieee" runs on FMA units, whose dot needs much smaller tiles; tf32 sits in between.
_GEMM = {
    "16bit": dict(small=LaunchConfig("small", 64, 64, 64, 4, 2), large=LaunchConfig("large", 128, 128, 64, 8, 2),
                  # with the LoRA term, 8-warp tiles fit only one CTA per SM on sm_90; these 4-warp ones fit 2-3
                  large_lora=LaunchConfig("large_lora", 128, 64, 32, 4, 3),
                  bwd_small=LaunchConfig("bwd_small", 64, 64, 64, 4, 3),
                  bwd_large=LaunchConfig("bwd_large", 128, 32, 128, 8, 3),
                  bwd_large_lora=LaunchConfig("bwd_large_lora", 128, 32, 64, 4, 3)),
    "tf32": dict(small=LaunchConfig("small", 64, 64, 32, 4, 3), large=LaunchConfig("large", 128, 64, 32, 8, 3),
                 bwd_small=LaunchConfig("bwd", 64, 32, 64, 4, 3)),
    "ieee": dict(small=LaunchConfig("small", 32, 64, 16, 4, 2), large=LaunchConfig("large", 64, 64, 16, 8, 2),
                 bwd_small=LaunchConfig("bwd", 32, 16, 64, 4, 2)),
}
LARGE_M = 1024

def _gemm_family(dtype: torch.dtype) -> str:
    return "16bit" if dtype != torch.float32 else dot_precision(dtype)


def forward_config(m: int, blocksize: int, dtype: torch.dtype = torch.float16,
                   has_lora: bool = False) -> LaunchConfig:
    """The GEMM tile for ``m > GEMV_MAX_M`` tokens (fewer run ``nf4_gemv``)."""
    family = _GEMM[_gemm_family(dtype)]
    label = "large_lora" if has_lora and "large_lora" in family else "large"
    return family["small" if m < LARGE_M else label]


def backward_config(m: int, blocksize: int, dtype: torch.dtype = torch.float16,
                    has_lora: bool = False) -> LaunchConfig:
    family = _GEMM[_gemm_family(dtype)]
    if m < LARGE_M:
        return family["bwd_small"]
    label = "bwd_large_lora" if has_lora and "bwd_large_lora" in family else "bwd_large"
    return family.get(label, family["bwd_small"])


def _check_layout(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
                  blocksize: int) -> None:
    NF4Weight.check_packed_layout(packed, absmax, code, n, k, blocksize)
    if blocksize & (blocksize - 1):  # the GEMMs' tiles hold whole blocks or whole parts of one
        raise ValueError(f"blocksize={blocksize} must be a power of two")


def _output(out: Optional[torch.Tensor], shape: tuple, like: torch.Tensor, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name} must be a {list(shape)} {like.dtype} tensor on {like.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


@launcher
def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
                   blocksize: int, dtype: torch.dtype = torch.float32,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense ``[n, k]`` weight in ``dtype``, from the same helper the matmuls use."""
    packed = packed.reshape(-1)
    _check_layout(packed, absmax, code, n, k, blocksize)
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=packed.device)
    elif out.shape != (n, k) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {k}] tensor, got {tuple(out.shape)}")
    block_n, block_k = 32, min(64, blocksize)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _nf4_dequant_kernel[grid](packed, absmax, code, out, n, k, BLOCKSIZE=blocksize, BLOCK_N=block_n,
                              BLOCK_K=block_k)
    return out


@launcher
def nf4_matmul(x2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               n: int, k: int, blocksize: int, bias: Optional[torch.Tensor] = None,
               lora_h: Optional[torch.Tensor] = None, lora_B: Optional[torch.Tensor] = None,
               lora_scale: float = 1.0, config: Optional[LaunchConfig] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2d [M, k] · dequant(W)ᵀ (+ bias [n]) (+ lora_scale · lora_h [M, r] · lora_B[n, r]ᵀ)`` -> ``[M, n]``.

    ``lora_h`` is ``drop(x) Aᵀ / (1-p)``; the scale is applied to the fp32
    accumulator. M <= 16 runs the decode GEMV (``fastpeft.kernels.nf4_gemv``),
    more rows the ``tl.dot`` kernel; ``config`` forces the ``tl.dot`` kernel
    with those tiles. ``out``: an ``[M, n]`` tensor of x's dtype to write into.
    """
    packed = packed.reshape(-1)
    _check_layout(packed, absmax, code, n, k, blocksize)
    m = x2d.shape[0]
    y = _output(out, (m, n), x2d, "out")
    if m == 0 or n == 0:
        return y
    if config is None and m <= GEMV_MAX_M:
        return launch_gemv(x2d, packed, absmax, code, n, k, blocksize, bias, lora_h, lora_B, lora_scale, y)
    has_lora = lora_h is not None
    cfg = config or forward_config(m, blocksize, x2d.dtype, has_lora)
    r = lora_h.shape[1] if has_lora else 0
    h = lora_h if has_lora else y
    lb = lora_B if has_lora else y
    b = bias if bias is not None else y
    common = (x2d, packed, absmax, code, b, h, lb, y, m, n, k, r,
              x2d.stride(0), x2d.stride(1), y.stride(0), y.stride(1), b.stride(0),
              h.stride(0), h.stride(1), lb.stride(0), lb.stride(1), float(lora_scale))
    flags = dict(BLOCKSIZE=blocksize, HAS_BIAS=bias is not None, HAS_LORA=has_lora, BLOCK_R=LORA_RANK_BLOCK)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    gemm_args = common[:14] + (k // 2,) + common[14:]  # + stride_pn: bytes per packed row
    _nf4_matmul_kernel[grid](*gemm_args, **flags, DOT_PRECISION=dot_precision(x2d.dtype),
                             UPCAST=interpreter_upcast(x2d.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                             BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, **cfg.launch_options())
    return y


@launcher
def nf4_matmul_transposed(dy2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                          n: int, k: int, blocksize: int, lora_dh: Optional[torch.Tensor] = None,
                          lora_A: Optional[torch.Tensor] = None, lora_scale: float = 1.0,
                          dropout_p: float = 0.0, seed: int = 0,
                          config: Optional[LaunchConfig] = None,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dy2d [M, n] · dequant(W) (+ lora_scale · drop'(lora_dh [M, r] · lora_A [r, k]))`` -> ``[M, k]``.

    With ``dropout_p > 0`` the LoRA term is masked by the shared keep-mask for
    ``seed`` (the one x saw in the forward pass): the input gradient of
    ``drop(x) Aᵀ``; ``lora_scale`` then includes ``1/(1-p)``.
    """
    packed = packed.reshape(-1)
    _check_layout(packed, absmax, code, n, k, blocksize)
    m = dy2d.shape[0]
    dx = _output(out, (m, k), dy2d, "out")
    if m == 0:
        return dx
    has_lora = lora_dh is not None
    cfg = config or backward_config(m, blocksize, dy2d.dtype, has_lora)
    r = lora_dh.shape[1] if has_lora else 0
    dh = lora_dh if has_lora else dx
    la = lora_A if has_lora else dx
    dropout = has_lora and dropout_p > 0.0
    seed_lo, seed_hi = split_seed(seed) if dropout else (0, 0)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(k, cfg.block_k),)
    _nf4_matmul_t_kernel[grid](dy2d, packed, absmax, code, dh, la, dx, m, n, k, r,
                               dy2d.stride(0), dy2d.stride(1), k // 2, dx.stride(0), dx.stride(1),
                               dh.stride(0), dh.stride(1), la.stride(0), la.stride(1),
                               float(lora_scale), float(dropout_p), seed_lo, seed_hi,
                               BLOCKSIZE=blocksize, HAS_LORA=has_lora, BLOCK_R=LORA_RANK_BLOCK, DROPOUT=dropout,
                               DOT_PRECISION=dot_precision(dy2d.dtype), UPCAST=interpreter_upcast(dy2d.dtype),
                               BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                               GROUP_M=cfg.group_m,
                               **cfg.launch_options())
    return dx


def nf4_forward(x2d, packed, absmax, code, n: int, k: int, blocksize: int, bias=None) -> torch.Tensor:
    """``x2d · dequant(W)ᵀ (+ bias)`` (dispatch contract; see ``fastpeft.cpu.nf4``)."""
    return nf4_matmul(x2d, packed, absmax, code, n, k, blocksize, bias=bias)


def nf4_input_grad(dy2d, packed, absmax, code, n: int, k: int, blocksize: int) -> torch.Tensor:
    """``dy2d · dequant(W)`` (dispatch contract; see ``fastpeft.cpu.nf4``)."""
    return nf4_matmul_transposed(dy2d, packed, absmax, code, n, k, blocksize)
