"""AOT launches of ``fastpeft.kernels.lora``: what the kernel report compiles for the LoRA kernels.

See ``gates.aot_spec``.
"""
from __future__ import annotations

import torch

from fastpeft.kernels._common import TRITON_DTYPE, dot_precision, runs_on_tensor_cores
from fastpeft.kernels._lora_kernels import _lora_split_sum_kernel
from fastpeft.kernels.lora import dropout_mask, lora_backward, lora_forward

from ..aot_spec import launch_label, module_specs
from ..headline_shapes import distinct, gpu_shapes

KERNEL_MODULE = "fastpeft.kernels.lora"
# The sum of a split reduction's fp32 partials (``kernels.lora.sum_partials``): an epilogue
# (``aot_spec.epilogue_kernels``).
EPILOGUE_KERNELS = (_lora_split_sum_kernel,)

# What the report launches: r = 8 (PEFT's default; not a multiple of 16, so R carries no divisibility hint)
# and r = 4 (the same variants as r = 8, reported under r8), 16, 32, 64 and 128. The fused GEMM pads r to a
# power of two of 16-wide chunks (``_lora_configs.gemm_rank_steps``, a constexpr), unrolls up to two and loops
# over the rest, so each of 16, 32, 64 and 128 is a variant of its own; the shrink and reduce kernels compile
# alike for every r >= 64. The shapes (M, K, N) reach every plan of ``_lora_configs``: M = 16 (decode: split shrink with 16-wide steps, 16x16
# GEMM tiles, 16-column reductions), 64 (split shrink over 16-row tiles), 512 (split shrink over 64-row
# tiles, the 64-row GEMM tile), 2048 (the largest GEMM tile) at K = N = 4096, and K = N = 1024 with
# M = 512 (64-column reductions, unsplit) and M = 4096 (unsplit 16-row shrink, split reductions and their one
# summing launch). M is never specialised.
AOT_RANKS = (8, 4, 16, 32, 64, 128)
AOT_SHAPES = ((16, 4096, 4096), (64, 4096, 4096), (512, 4096, 4096), (2048, 4096, 4096), (512, 1024, 1024),
              (4096, 1024, 1024))
# The GPU shapes of the benchmark (benchmarks/ops/lora.py, level "full": tokens x (K, N) x r), launched as
# headline shapes: the kernel report requires each of their grids to fill the GPU (at least one CTA per SM).
_HEADLINE = gpu_shapes("lora", "full")
HEADLINE_TOKENS = distinct(_HEADLINE, "tokens")
HEADLINE_FEATURES = distinct(_HEADLINE, "K", "N")
HEADLINE_RANKS = distinct(_HEADLINE, "r")


def aot_launches() -> None:
    """Runs the launchers on realistic contiguous arguments: every dtype, rank class, config and flag, then
    the benchmark's GPU shapes as headline launches."""
    for dtype, t in TRITON_DTYPE.items():
        gemm = runs_on_tensor_cores(dtype, dot_precision(dtype))
        for r in AOT_RANKS:
            for m, k, n in AOT_SHAPES:
                shape = f"m{m}" if k == 4096 else f"m{m}k{k}"
                _aot_layer(dtype, m, k, n, r, f"{t},r{r},{shape}", gemm, dropout=True)
        for r in HEADLINE_RANKS:
            for k, n in HEADLINE_FEATURES:
                for m in HEADLINE_TOKENS:
                    _aot_layer(dtype, m, k, n, r, f"{t},r{r},m{m},k{k},n{n}", gemm, dropout=False, headline=True)
    with launch_label("mask", False):
        dropout_mask((64, AOT_FEATURES), 0.1, 1, "cpu")


AOT_FEATURES = 4096


def _aot_layer(dtype: torch.dtype, m: int, k: int, n: int, r: int, label: str, gemm: bool, dropout: bool,
               headline: bool = False) -> None:
    """Forward and backward of one LoRA layer (``[M, K] -> [M, N]``, rank r), labelled ``<label>,<pass>``."""
    weight, bias = torch.empty((n, k), dtype=dtype), torch.empty(n, dtype=dtype)
    lora_A, lora_B = torch.empty((r, k), dtype=dtype), torch.empty((n, r), dtype=dtype)
    x, dy, h = torch.empty((m, k), dtype=dtype), torch.empty((m, n), dtype=dtype), torch.empty((m, r), dtype=dtype)
    with launch_label(f"{label},fwd", gemm, headline):
        lora_forward(x, weight, bias, lora_A, lora_B, 2.0, 0.0, 0)
    with launch_label(f"{label},bwd", gemm, headline):
        lora_backward(dy, x, weight, lora_A, lora_B, h, 2.0, 0.0, 0, True, True, True)
    if dropout:
        with launch_label(f"{label},fwd_dropout", gemm):
            lora_forward(x, weight, bias, lora_A, lora_B, 2.0, 0.1, 1)
        with launch_label(f"{label},bwd_dropout", gemm):
            lora_backward(dy, x, weight, lora_A, lora_B, h, 2.0, 0.1, 1, True, True, False)


def aot_specs():
    """Every variant ``aot_launches`` makes (see ``gates.aot_spec``)."""
    return list(module_specs(KERNEL_MODULE))
