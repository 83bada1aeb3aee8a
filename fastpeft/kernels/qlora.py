"""Triton QLoRA linear: LoRA's orchestration (``fastpeft.kernels.lora``) around the NF4 kernels.

Dispatch contract (``docs/architecture.md``): ``fastpeft.ops.qlora`` calls
``qlora_forward`` / ``qlora_backward`` here or in ``fastpeft.cpu.qlora``,
which has the same functions.

Forward: the LoRA shrink makes ``h = drop(x) Aᵀ / (1-p)`` (fp32, saved), then
one NF4 kernel computes ``x Wᵀ + s · h Bᵀ + b``. Backward: LoRA's ``dB``,
``dh``, ``dA`` launches, and ``dx = dy W + s/(1-p) · drop'(dh A)`` in one NF4
kernel (dropout mask regenerated). The NF4 weight is frozen: no gradient.
"""
from __future__ import annotations

import torch

from ._common import TRITON_DTYPE, check_kernel_dtype, dot_precision, launcher, runs_on_tensor_cores
from .aot_spec import launch_label, module_specs
from .lora import lora_backward_with_base, lora_forward_with_base
from . import nf4
from .nf4 import (AOT_BLOCKSIZE, AOT_FEATURES, GEMV_MAX_M, HEADLINE_DTYPE, HEADLINE_TOKENS, aot_weight, nf4_matmul,
                  nf4_matmul_transposed)

__all__ = ["check_kernel_dtype", "qlora_backward", "qlora_forward"]


@launcher
def qlora_forward(x2d, packed, absmax, code, n: int, k: int, blocksize: int, bias, lora_A, lora_B,
                  scaling: float, dropout_p: float, seed: int):
    """Returns ``(y [M, n], h [M, r])`` in x's dtype; see the module docstring."""
    def base_plus_lora(h):
        return nf4_matmul(x2d, packed, absmax, code, n, k, blocksize, bias=bias, lora_h=h, lora_B=lora_B,
                          lora_scale=scaling)

    return lora_forward_with_base(x2d, lora_A, dropout_p, seed, base_plus_lora)


@launcher
def qlora_backward(dy, x2d, packed, absmax, code, n: int, k: int, blocksize: int, lora_A, lora_B, h,
                   scaling: float, dropout_p: float, seed: int, need_dx: bool, need_dA: bool, need_dB: bool):
    """Returns ``(dx | None, dA | None, dB | None)``; only the asked-for ones are computed."""
    def base_grad_plus_lora(dh):
        return nf4_matmul_transposed(dy, packed, absmax, code, n, k, blocksize, lora_dh=dh, lora_A=lora_A,
                                     lora_scale=scaling / (1.0 - dropout_p), dropout_p=dropout_p, seed=seed)

    return lora_backward_with_base(dy, x2d, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_dA, need_dB,
                                   base_grad_plus_lora)


# --------------------------------------------------------------------------- AOT report
# The NF4 kernels with their LoRA term (the LoRA shrink/reduce launches are lora's own variants, the NF4
# token classes are nf4's): r = 8, 16 and 64; with and without a bias (Llama's projections have none) and
# dropout.
AOT_RANKS = (8, 16, 64)
AOT_TOKENS = nf4.AOT_TOKENS


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
    dtype, r = HEADLINE_DTYPE, 16  # the GPU benchmark's shapes (benchmarks/ops/qlora.py): r = 16, no dropout
    lora_A, lora_B = torch.empty((r, k), dtype=dtype), torch.empty((n, r), dtype=dtype)
    for m in HEADLINE_TOKENS:
        x, dy, h = torch.empty((m, k), dtype=dtype), torch.empty((m, n), dtype=dtype), torch.empty((m, r), dtype=dtype)
        with launch_label(f"bf16,r{r},m{m},fwd", m > GEMV_MAX_M, headline=True):
            qlora_forward(x, *weight, n, k, AOT_BLOCKSIZE, None, lora_A, lora_B, 2.0, 0.0, 1)
        with launch_label(f"bf16,r{r},m{m},bwd", True, headline=True):
            qlora_backward(dy, x, *weight, n, k, AOT_BLOCKSIZE, lora_A, lora_B, h, 2.0, 0.0, 1, True, True, True)


def aot_specs():
    """Every variant ``aot_launches`` makes (see ``fastpeft.kernels.aot_spec``)."""
    return list(module_specs(__name__))
