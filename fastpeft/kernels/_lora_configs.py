"""Launch configurations of the LoRA kernels, chosen by shape (no autotuning).

Each kernel has a short explicit list; ``gates.aot.lora.aot_launches``
launches every entry for sm_80 and sm_90 so the kernel report can check
registers, spills, shared memory and tensor-core use of exactly what the
launchers run. Half-precision inputs (fp16/bf16) use tensor-core tiles; fp32
inputs use smaller tiles because an exact (``ieee``) fp32 ``tl.dot`` runs on
the FMA units and holds its operands in registers.
"""
from __future__ import annotations

import torch

from ._common import TARGET_SMS, LaunchConfig, cdiv

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
# How many of those chunks are unrolled at most (r <= 32); larger ranks loop over the rest. Unrolling all eight
# chunks of r = 128 took the fp32 "ieee" (FMA) kernel to 255 registers and 2 CTAs/SM on sm_80 and sm_90; four
# unrolled chunks spilled 16 B in its sm_90 dx variant; two give 0 spills and fp32 r = 64/128 dx 5 CTAs/SM on
# sm_90 (4 before), with the same CTAs/SM as four for fp16/bf16.
GEMM_UNROLLED_RANK_STEPS = 2

# Programs a launch should have to fill the largest GPU we target (``_common.TARGET_SMS``). The kernel report's
# grid gate checks every launch at a benchmark headline shape against it.
FILL_PROGRAMS = TARGET_SMS


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
# Narrow column tiles for few tokens and few output features (M <= 64, N = 4096 gives 64 programs with
# 64-wide tiles): the grid must still put a program on every SM. Each program streams its 16 rows of W.
_GEMM_NARROW_HALF = LaunchConfig("gemm_m16_n16", 16, 16, 64, 4, 4)
_GEMM_NARROW_FP32 = LaunchConfig("gemm32_m16_n16", 16, 16, 32, 4, 3)
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
# Shrink: h = src @ mat over rows of src; block_m rows, block_k = loop step over the long dim (and the
# granularity of its split). Order of preference (see plan_shrink): large row tiles first; the k16 tile only
# where 64-wide steps are too few splits to fill the GPU (M <= 64 with L = 4096: 64 steps < 132 SMs).
_SHRINK_HALF = (
    LaunchConfig("shrink_m64", 64, 0, 64, 4, 3),
    LaunchConfig("shrink_m16", 16, 0, 64, 4, 3),
    LaunchConfig("shrink_m16_k16", 16, 0, 16, 4, 3),
)
_SHRINK_FP32 = (
    LaunchConfig("shrink32_m64", 64, 0, 16, 8, 3),
    LaunchConfig("shrink32_m16", 16, 0, 64, 4, 2),
    LaunchConfig("shrink32_m16_k16", 16, 0, 16, 4, 2),
)
# Reduce over M: out[cols, r] = src[:, cols]ᵀ @ hmat; block_m cols, block_k = loop step over M. The 16-column
# tile serves short M (nothing to split) with few columns: 64-wide tiles of 4096 columns are 64 programs.
_REDUCE_HALF = (LaunchConfig("reduce", 64, 0, 64, 4, 3),  # 8 warps spill on sm_80 for r <= 16
                LaunchConfig("reduce_p16", 16, 0, 64, 4, 2))  # 3 stages: the r = 8 dA variant spilled 36 B on sm_80
_REDUCE_FP32 = (LaunchConfig("reduce32", 64, 0, 32, 8, 3),
                LaunchConfig("reduce32_p16", 16, 0, 32, 4, 3))
# M-split of the reductions: at most this many programs, each split keeping at least this many rows.
REDUCE_TARGET_PROGRAMS = 264
REDUCE_MIN_SPLIT_ROWS = 512

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


def narrow_gemm_config(dtype: torch.dtype) -> LaunchConfig:
    return _GEMM_NARROW_HALF if _is_half(dtype) else _GEMM_NARROW_FP32


def pick_gemm(m: int, n: int, dtype: torch.dtype, dropout: bool = False) -> LaunchConfig:
    """The smallest row tile that covers M (decode-sized M; the largest tile above), unless its grid leaves
    SMs idle: then the next smaller tile that fills the GPU, or the narrow 16x16 tile."""
    configs = gemm_configs(dtype, dropout)
    cover = next((i for i, c in enumerate(configs) if m <= c.block_m), len(configs) - 1)
    for config in (*reversed(configs[:cover + 1]), narrow_gemm_config(dtype)):
        if cdiv(m, config.block_m) * cdiv(n, config.block_n) >= FILL_PROGRAMS:
            return config
    return configs[cover]


def plan_splits(tiles: int, steps: int) -> tuple[int, int]:
    """``(splits, steps per split)`` of a loop of ``steps`` steps run by ``tiles`` programs: no split when the
    tiles fill the GPU, else the fewest splits that give ``FILL_PROGRAMS`` programs (rounding the steps per
    split down, so never fewer), or one step per split when the loop is too short for that."""
    if tiles >= FILL_PROGRAMS or steps <= 1:
        return 1, max(steps, 1)
    wanted = min(cdiv(FILL_PROGRAMS, tiles), steps)
    per_split = steps // wanted
    return cdiv(steps, per_split), per_split


def plan_shrink(m: int, length: int, r: int, dtype: torch.dtype) -> tuple[LaunchConfig, int, int]:
    """``(config, splits, columns per split)`` of the shrink ``[M, L] @ [L, r]``.

    Unsplit when a row tile fills the GPU (the largest such tile: long M, one
    launch); else L is split, with the first config (largest row tile first,
    16-row tiles when M <= 16) whose split grid fills it; else the plan with
    the most programs (small problems).
    """
    configs = shrink_configs(dtype)
    ranks = cdiv(r, rank_block(r))
    for config in configs:
        if cdiv(m, config.block_m) * ranks >= FILL_PROGRAMS:
            return config, 1, cdiv(length, config.block_k) * config.block_k
    if m <= configs[1].block_m:
        configs = configs[1:]
    best = None
    for config in configs:
        tiles = cdiv(m, config.block_m) * ranks
        splits, per_split = plan_splits(tiles, cdiv(length, config.block_k))
        plan = (config, splits, per_split * config.block_k)
        if tiles * splits >= FILL_PROGRAMS:
            return plan
        if best is None or tiles * splits > best[0]:
            best = (tiles * splits, plan)
    return best[1]


def plan_reduce(m: int, p_len: int, r: int, dtype: torch.dtype, may_split: bool = True
                ) -> tuple[LaunchConfig, int, int]:
    """``(config, splits, rows per split)`` of the reduction ``[M, P]ᵀ @ [M, r]`` over M.

    The first that fills the GPU: 64-column tiles unsplit, 16-column tiles
    unsplit (one launch either way), 64-column tiles with M split into ranges
    of at least ``REDUCE_MIN_SPLIT_ROWS`` rows (partials, summed by a second
    launch; only when ``may_split``). Small problems: the 64-column plan.
    """
    wide, narrow = reduce_configs(dtype)
    ranks = cdiv(r, rank_block(r))
    tiles = cdiv(p_len, wide.block_m) * ranks
    rows = cdiv(max(m, 1), wide.block_k) * wide.block_k
    if tiles < FILL_PROGRAMS and cdiv(p_len, narrow.block_m) * ranks >= FILL_PROGRAMS:
        return narrow, 1, cdiv(max(m, 1), narrow.block_k) * narrow.block_k
    if tiles >= FILL_PROGRAMS or not may_split:
        return wide, 1, rows
    splits = max(1, min(REDUCE_TARGET_PROGRAMS // max(tiles, 1), m // REDUCE_MIN_SPLIT_ROWS))
    rows_per_split = cdiv(cdiv(m, splits), wide.block_k) * wide.block_k
    return wide, cdiv(m, rows_per_split), rows_per_split


def rank_block(r: int) -> int:
    return RANK_BLOCKS[0] if r <= RANK_BLOCKS[0] else RANK_BLOCKS[1]


def gemm_rank_steps(r: int) -> int:
    """How many ``GEMM_RANK_BLOCK`` chunks the fused GEMM's LoRA term unrolls for rank ``r``: a power of two,
    so ranks up to 256 compile at most five variants (r = 48 runs 4 chunks, the last one all zeros)."""
    chunks = -(-r // GEMM_RANK_BLOCK)
    return 1 << max(chunks - 1, 0).bit_length()
