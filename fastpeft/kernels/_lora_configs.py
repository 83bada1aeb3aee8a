"""Launch configurations of the LoRA kernels, chosen by shape (no autotuning).

Each kernel has a short explicit list; ``fastpeft.kernels.lora.aot_launches``
launches every entry for sm_80 and sm_90 so the kernel report can check
registers, spills, shared memory and tensor-core use of exactly what the
launchers run. Half-precision inputs (fp16/bf16) use tensor-core tiles; fp32
inputs use smaller tiles because an exact (``ieee``) fp32 ``tl.dot`` runs on
the FMA units and holds its operands in registers.
"""
from __future__ import annotations

import torch

from ._common import LaunchConfig

# Rank chunk: the rank r is processed in chunks of this many columns. r <= 16
# takes one 16-wide chunk (16 is the smallest tensor-core K), larger r 64-wide
# chunks, so any r works with two compiled variants.
RANK_BLOCKS = (16, 64)
# Rank chunk of the fused GEMM's LoRA term (the accumulator's initial value). The rank is padded to whole
# chunks by masked loads (zeros past r) and the chunks are unrolled (a constexpr count, gemm_rank_steps): a
# runtime rank loop before the main loop cost r % 16 != 0 (PEFT's default r = 8) 161 instead of 128 registers
# and half the CTAs per SM on sm_90. 16-wide chunks keep the prologue's shared memory at one 16-wide tile
# pair for every r (one 64-wide dot at r = 64 needed 24 KB more: 1 CTA/SM instead of 2).
GEMM_RANK_BLOCK = 16


# Rank-output kernels ([rows, r] or [cols, r]) use block_m for the rows/cols tile and block_k for
# the loop step; block_n is unused (0).
_GEMM_HALF = (
    LaunchConfig("gemm_m16", 16, 64, 64, 4, 4),
    LaunchConfig("gemm_m64", 64, 128, 64, 4, 4),
    LaunchConfig("gemm_m128", 128, 128, 64, 8, 3),
)
_GEMM_FP32 = (
    LaunchConfig("gemm32_m16", 16, 64, 32, 4, 3),
    LaunchConfig("gemm32_m64", 64, 64, 32, 4, 3),
)
# dx with dropout: the Philox mask over the whole output tile needs more
# registers, so these tiles are spread over more warps (no spills, see the report).
_GEMM_HALF_DROPOUT = (
    LaunchConfig("gemm_m16_drop", 16, 64, 64, 4, 4),
    LaunchConfig("gemm_m64_drop", 64, 128, 64, 8, 4),
)
_GEMM_FP32_DROPOUT = (
    LaunchConfig("gemm32_m16_drop", 16, 64, 32, 4, 3),
    LaunchConfig("gemm32_m64_drop", 64, 64, 32, 8, 3),
)
# Shrink: h = src @ mat over rows of src; block_m rows, block_k = loop step over the long dim.
_SHRINK_HALF = (
    LaunchConfig("shrink_m16", 16, 0, 64, 4, 3),
    LaunchConfig("shrink_m64", 64, 0, 64, 4, 3),
)
_SHRINK_FP32 = (
    LaunchConfig("shrink32_m16", 16, 0, 64, 4, 2),
    LaunchConfig("shrink32_m64", 64, 0, 16, 8, 3),
)
# Reduce over M: out[cols, r] = src[:, cols]ᵀ @ hmat; block_m cols, block_k = loop step over M.
_REDUCE_HALF = (LaunchConfig("reduce", 64, 0, 64, 4, 3),)  # 8 warps spill on sm_80 for r <= 16
_REDUCE_FP32 = (LaunchConfig("reduce32", 64, 0, 32, 8, 3),)

MASK_BLOCK = (32, 64)  # dropout_mask kernel tile [rows, cols]


def _is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def gemm_configs(dtype: torch.dtype, dropout: bool = False) -> tuple[LaunchConfig, ...]:
    if dropout:
        return _GEMM_HALF_DROPOUT if _is_half(dtype) else _GEMM_FP32_DROPOUT
    return _GEMM_HALF if _is_half(dtype) else _GEMM_FP32


def shrink_configs(dtype: torch.dtype) -> tuple[LaunchConfig, ...]:
    return _SHRINK_HALF if _is_half(dtype) else _SHRINK_FP32


def reduce_configs(dtype: torch.dtype) -> tuple[LaunchConfig, ...]:
    return _REDUCE_HALF if _is_half(dtype) else _REDUCE_FP32


def pick_gemm(m: int, dtype: torch.dtype, dropout: bool = False) -> LaunchConfig:
    """Smallest row tile that covers M (decode-sized M), else the largest tile."""
    configs = gemm_configs(dtype, dropout)
    for config in configs:
        if m <= config.block_m:
            return config
    return configs[-1]


def pick_shrink(m: int, dtype: torch.dtype) -> LaunchConfig:
    configs = shrink_configs(dtype)
    return configs[0] if m <= configs[0].block_m else configs[-1]


def pick_reduce(dtype: torch.dtype) -> LaunchConfig:
    return reduce_configs(dtype)[0]


def rank_block(r: int) -> int:
    return RANK_BLOCKS[0] if r <= RANK_BLOCKS[0] else RANK_BLOCKS[1]


def gemm_rank_steps(r: int) -> int:
    """How many ``GEMM_RANK_BLOCK`` chunks the fused GEMM's LoRA term unrolls for rank ``r``: a power of two,
    so ranks up to 256 compile at most five variants (r = 48 runs 4 chunks, the last one all zeros)."""
    chunks = -(-r // GEMM_RANK_BLOCK)
    return 1 << max(chunks - 1, 0).bit_length()
