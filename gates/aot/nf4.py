"""AOT launches of ``fastpeft.kernels.nf4``: what the kernel report compiles for the NF4 GEMMs.

See ``gates.aot_spec``.
"""
from __future__ import annotations

import torch

from fastpeft.kernels._common import TRITON_DTYPE, dot_precision, runs_on_tensor_cores
from fastpeft.kernels.nf4 import nf4_dequantize, nf4_forward, nf4_input_grad
from fastpeft.kernels.nf4_gemv import GEMV_MAX_M

from ..aot_spec import launch_label, module_specs
from ..headline_shapes import distinct, gpu_shapes

KERNEL_MODULE = "fastpeft.kernels.nf4"

# Blocksize 64 (bitsandbytes' default), K = N = 4096, one token count M per launch config (M is never
# specialised): 1-16 rows run the decode GEMV (its own module reports its shapes too; a variant launched by
# both is reported once), then the small and the large GEMM.
AOT_BLOCKSIZE = 64
AOT_FEATURES = 4096
AOT_TOKENS = (1, 2, 4, 8, 16, 256, 2048)
# The GPU benchmark's shapes (benchmarks/ops/nf4.py and qlora.py: bf16, K = N = 4096): launched again as headline
# launches, whose grids the kernel report's grid gate checks.
HEADLINE_TOKENS = distinct(gpu_shapes("nf4", "full", K=AOT_FEATURES, N=AOT_FEATURES), "tokens")
HEADLINE_DTYPE = torch.bfloat16


def aot_weight(n: int, k: int, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty packed bytes, fp32 absmax and codebook of an ``[n, k]`` NF4 weight (for recording launches)."""
    return (torch.empty(n * k // 2, dtype=torch.uint8), torch.empty(n * k // blocksize, dtype=torch.float32),
            torch.empty(16, dtype=torch.float32))


def aot_launches() -> None:
    """Runs the launchers on realistic contiguous arguments: every dtype, config and flag."""
    n = k = AOT_FEATURES
    weight = aot_weight(n, k, AOT_BLOCKSIZE)
    for dtype, t in TRITON_DTYPE.items():
        gemm = runs_on_tensor_cores(dtype, dot_precision(dtype))
        bias = torch.empty(n, dtype=dtype)
        for m in AOT_TOKENS:
            x, dy = torch.empty((m, k), dtype=dtype), torch.empty((m, n), dtype=dtype)
            fwd_gemm = gemm and m > GEMV_MAX_M
            with launch_label(f"{t},m{m},fwd", fwd_gemm):
                nf4_forward(x, *weight, n, k, AOT_BLOCKSIZE, bias)
            with launch_label(f"{t},m{m},dx", gemm):
                nf4_input_grad(dy, *weight, n, k, AOT_BLOCKSIZE)
        with launch_label(f"{t},dequant", False):
            nf4_dequantize(*weight, n, k, AOT_BLOCKSIZE, dtype)
    bias = torch.empty(n, dtype=HEADLINE_DTYPE)
    for m in HEADLINE_TOKENS:  # the NF4 benchmark is forward only
        with launch_label(f"bf16,m{m},fwd", m > GEMV_MAX_M, headline=True):
            nf4_forward(torch.empty((m, k), dtype=HEADLINE_DTYPE), *weight, n, k, AOT_BLOCKSIZE, bias)


def aot_specs():
    """Every variant ``aot_launches`` makes (see ``gates.aot_spec``)."""
    return list(module_specs(KERNEL_MODULE))
