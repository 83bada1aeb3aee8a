"""Triton NF4 decode GEMV (1 <= M <= 16 token rows): the launcher (no autograd).

``nf4_gemv`` computes what ``fastpeft.kernels.nf4.nf4_matmul`` computes
(``x2d · dequant(W)ᵀ (+ bias) (+ lora_scale · lora_h · lora_Bᵀ)``, the weight
rounded to x's dtype before the product) for the decode shapes, where the
cost is reading the packed weight: ``N · K / 2`` bytes.

Launch layout (``_nf4_gemv_kernels``): one program per ``block_n = 4``
weight rows (one warp per row) and ``block_m`` token rows, walking its rows
whole in chunks of ``block_kb = 512`` bytes, one 16-byte load per thread:
``N / 4`` programs (1024 at N = 4096, 3584 at N = 14336), more than 4 per SM
on 132 SMs without splitting K, so no second pass. M > 2 token rows run as
``ceil(M / 2)`` programs per row tile over the same bytes (neighbouring
program ids: the re-reads hit L2), each dequantizing again.

Static facts (sm_90 SASS, N = K = 4096, blocksize 64; count with
``gates.sass_loops``): the main loop has LDG.E.128 weight loads,
one 64-bit LDS per weight byte (the byte table), two barriers per trip (the
gather stages its table), no shuffles; instructions per weight per program
4.5 / 6.7 / 7.3 (fp32 / fp16 / bf16, one token row) and 6.1 / 9.1 / 9.4 (two
token rows), against 33-35 (one row) to 203-208 (16 rows) in the former
``_nf4_gemv_kernel`` of ``_nf4_kernels``; <= 110 registers, no spills,
>= 4 CTAs/SM (kernel report).
A 16-entry fp32 code table (one LDS per weight, conflict-free) took 6.8 /
9.2 / 9.7 at one row; four token rows per program needed 130-140 registers.
Estimated (issue rate 132 SMs x 4 x 32 lanes x 1.755 GHz vs 3.35 TB/s) at
4096 x 4096, M = 1: 2.8 us (HBM-bound) fp32, 3.8-4.2 us fp16/bf16; the byte
table's bank conflicts (random 8-byte entries) are not in these numbers.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..quant.nf4 import NF4Weight
from ._common import TRITON_DTYPE, LaunchConfig, launcher
from ._nf4_gemv_kernels import _nf4_decode_gemv_kernel

__all__ = ["GEMV_MAX_M", "gemv_config", "launch_gemv", "nf4_gemv"]

GEMV_MAX_M = 16
# Rank chunk of the LoRA term (as fastpeft.kernels.nf4).
LORA_RANK_BLOCK = 16

# block_m: token rows per program; block_n: weight rows per program (one warp each); block_k: BYTES per row
# per trip (16 per thread). Four token rows per program needed 130-140 registers on sm_90 (3 CTAs per SM).
_CONFIGS = {
    1: LaunchConfig("gemv_m1", 1, 4, 512, 4, 1),
    2: LaunchConfig("gemv_m2", 2, 4, 512, 4, 1),
}


def gemv_config(m: int, dtype: torch.dtype, k: int) -> LaunchConfig:
    """The launch config for ``m`` token rows (``1 <= m <= GEMV_MAX_M``) of ``dtype``, ``k`` input features.

    bf16 and fp32 with a ragged K (``even_k`` false: masked loads) take one token row per program: two
    spilled on sm_80 (bf16 4 B; fp32 with the LoRA term 28 B), fp16 does not.
    """
    if not 1 <= m <= GEMV_MAX_M:
        raise ValueError(f"nf4_gemv takes 1 to {GEMV_MAX_M} token rows, got {m}")
    if dtype != torch.float16 and not even_k(k):
        return _CONFIGS[1]
    return _CONFIGS[min(m, 2)]


def even_k(k: int) -> bool:
    """Whether a row is a whole number of ``block_k``-byte steps (the kernel's loads need no mask)."""
    return (k // 2) % _CONFIGS[1].block_k == 0


def _check_layout(x2d, packed, absmax, code, n: int, k: int, blocksize: int) -> None:
    # The op layer validates user input; these guard direct launcher calls.
    if x2d.dim() != 2 or x2d.shape[1] != k:
        raise ValueError(f"x2d must be [M, {k}], got {tuple(x2d.shape)}")
    if x2d.dtype not in TRITON_DTYPE:
        raise TypeError(f"x2d must be float32, float16 or bfloat16, not {x2d.dtype}")
    NF4Weight.check_packed_layout(packed, absmax, code, n, k, blocksize)


# x's elements 2j and 2j + 1 meet byte j of the weight: the kernel reads them as one word.
_PAIR_DTYPE = {torch.float32: torch.int64, torch.float16: torch.int32, torch.bfloat16: torch.int32}


def x_pairs(x2d: torch.Tensor) -> torch.Tensor:
    """``x2d [M, k]`` seen as ``[M, k / 2]`` words of two elements (a copy when its rows are not contiguous)."""
    if x2d.stride(1) != 1 or x2d.storage_offset() % 2 or (x2d.shape[0] > 1 and x2d.stride(0) % 2):
        x2d = x2d.contiguous()
    return x2d.view(_PAIR_DTYPE[x2d.dtype])


@launcher
def nf4_gemv(x2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
             blocksize: int, bias: Optional[torch.Tensor] = None, lora_h: Optional[torch.Tensor] = None,
             lora_B: Optional[torch.Tensor] = None, lora_scale: float = 1.0,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2d [M, k] · dequant(W)ᵀ (+ bias [n]) (+ lora_scale · lora_h [M, r] · lora_B [n, r]ᵀ)`` -> ``[M, n]``.

    ``1 <= M <= 16``. Same arguments and math as ``nf4_matmul``: ``lora_h`` is
    ``drop(x) Aᵀ / (1-p)``, ``lora_h`` and ``lora_B`` are rounded to x's dtype
    and their product scaled in fp32; ``out``: an ``[M, n]`` tensor of x's
    dtype to write into (any strides).
    """
    packed = packed.reshape(-1)
    _check_layout(x2d, packed, absmax, code, n, k, blocksize)
    m = x2d.shape[0]
    gemv_config(m, x2d.dtype, k)  # raises for a token count the kernel does not take
    if out is None:
        out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    elif tuple(out.shape) != (m, n) or out.dtype != x2d.dtype or out.device != x2d.device:
        raise ValueError(f"out must be a [{m}, {n}] {x2d.dtype} tensor on {x2d.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if n == 0:
        return out
    has_lora = lora_h is not None
    if has_lora and (lora_B is None or lora_h.dim() != 2 or lora_h.shape[0] != m or lora_B.dim() != 2
                     or lora_B.shape != (n, lora_h.shape[1])):
        raise ValueError(f"lora_h must be [{m}, r] and lora_B [{n}, r]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    return launch_gemv(x2d, packed, absmax, code, n, k, blocksize, bias, lora_h, lora_B, lora_scale, out)


def launch_gemv(x2d, packed, absmax, code, n: int, k: int, blocksize: int, bias, lora_h, lora_B, lora_scale: float,
                out: torch.Tensor) -> torch.Tensor:
    """``nf4_gemv`` after its checks, for a caller that made them (``nf4_matmul``: a decode step checks once).

    ``packed`` flat, ``1 <= M <= GEMV_MAX_M``, ``n > 0``, ``out`` an ``[M, n]`` tensor of x's dtype; run inside
    the tensors' device (``@launcher``).
    """
    m = x2d.shape[0]
    cfg = gemv_config(m, x2d.dtype, k)
    has_lora = lora_h is not None
    r = lora_h.shape[1] if has_lora else 0
    h = lora_h if has_lora else out
    lb = lora_B if has_lora else out
    b = bias if bias is not None else out
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m),)
    xp = x_pairs(x2d)
    _nf4_decode_gemv_kernel[grid](xp, packed, absmax, code, b, h, lb, out, m, n, k, r, k // 2,
                           xp.stride(0), out.stride(0), out.stride(1), b.stride(0),
                           h.stride(0), h.stride(1), lb.stride(0), lb.stride(1), float(lora_scale),
                           BLOCKSIZE=blocksize, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
                           BLOCK_R=LORA_RANK_BLOCK, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           BLOCK_KB=cfg.block_k, VEC=16,
                           EVEN_K=even_k(k), **cfg.launch_options())
    return out
