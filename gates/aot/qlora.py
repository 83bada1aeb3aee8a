"""AOT launches of ``fastpeft.kernels.qlora``: what the kernel report compiles for QLoRA (see ``gates.aot_spec``)."""
from __future__ import annotations

import torch

from fastpeft.kernels._common import TRITON_DTYPE, dot_precision, runs_on_tensor_cores
from fastpeft.kernels.nf4_gemv import GEMV_MAX_M
from fastpeft.kernels.qlora import qlora_backward, qlora_forward

from ..aot_spec import launch_label, module_specs
from . import nf4
from ..headline_shapes import distinct, gpu_shapes
from .nf4 import AOT_BLOCKSIZE, AOT_FEATURES, HEADLINE_DTYPE, aot_weight

KERNEL_MODULE = "fastpeft.kernels.qlora"

# The NF4 kernels with their LoRA term (the LoRA shrink/reduce launches are lora's own variants, the NF4
# token classes are nf4's): r = 8, 16 and 64; with and without a bias (Llama's projections have none) and
# dropout.
AOT_RANKS = (8, 16, 64)
AOT_TOKENS = nf4.AOT_TOKENS
HEADLINE = gpu_shapes("qlora", "default", K=AOT_FEATURES, N=AOT_FEATURES)


def aot_launches() -> None:
    n = k = AOT_FEATURES
    weight = aot_weight(n, k, AOT_BLOCKSIZE)
    for dtype, t in TRITON_DTYPE.items():
        gemm = runs_on_tensor_cores(dtype, dot_precision(dtype))
        bias = torch.empty(n, dtype=dtype)
        for r in AOT_RANKS:
            lora_A, lora_B = torch.empty((r, k), dtype=dtype), torch.empty((n, r), dtype=dtype)
            for m in AOT_TOKENS:
                x, dy = torch.empty((m, k), dtype=dtype), torch.empty((m, n), dtype=dtype)
                h = torch.empty((m, r), dtype=dtype)
                for p, layer_bias, tag in ((0.0, None, "fwd"), (0.0, bias, "fwd_bias"), (0.1, None, "fwd_dropout")):
                    with launch_label(f"{t},r{r},m{m},{tag}", gemm and m > GEMV_MAX_M):
                        qlora_forward(x, *weight, n, k, AOT_BLOCKSIZE, layer_bias, lora_A, lora_B, 2.0, p, 1)
                for p, tag in ((0.0, "bwd"), (0.1, "bwd_dropout")):
                    with launch_label(f"{t},r{r},m{m},{tag}", gemm):
                        qlora_backward(dy, x, *weight, n, k, AOT_BLOCKSIZE, lora_A, lora_B, h, 2.0, p, 1,
                                       True, False, False)
    dtype = HEADLINE_DTYPE  # the GPU benchmark's shapes at K = N = 4096 (benchmarks/ops/qlora.py), no dropout
    (r,) = distinct(HEADLINE, "r")
    lora_A, lora_B = torch.empty((r, k), dtype=dtype), torch.empty((n, r), dtype=dtype)
    for m in distinct(HEADLINE, "tokens"):
        x, dy, h = torch.empty((m, k), dtype=dtype), torch.empty((m, n), dtype=dtype), torch.empty((m, r), dtype=dtype)
        with launch_label(f"bf16,r{r},m{m},fwd", m > GEMV_MAX_M, headline=True):
            qlora_forward(x, *weight, n, k, AOT_BLOCKSIZE, None, lora_A, lora_B, 2.0, 0.0, 1)
        with launch_label(f"bf16,r{r},m{m},bwd", True, headline=True):
            qlora_backward(dy, x, *weight, n, k, AOT_BLOCKSIZE, lora_A, lora_B, h, 2.0, 0.0, 1, True, True, True)


def aot_specs():
    """Every variant ``aot_launches`` makes (see ``gates.aot_spec``)."""
    return list(module_specs(KERNEL_MODULE))
