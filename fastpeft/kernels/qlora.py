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

from ._common import check_kernel_dtype, launcher
from .lora import lora_backward_with_base, lora_forward_with_base
from .nf4 import nf4_matmul, nf4_matmul_transposed

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
