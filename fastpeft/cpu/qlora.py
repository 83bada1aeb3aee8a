"""QLoRA linear on the CPU path: the NF4 CPU path for the frozen GEMMs, LoRA's CPU orchestration around it.

Dispatch contract (``docs/architecture.md``): the same functions as
``fastpeft.kernels.qlora`` (``qlora_forward``, ``qlora_backward``).
"""
from __future__ import annotations

from . import lora
from .nf4 import nf4_forward, nf4_input_grad


def qlora_forward(x2d, packed, absmax, code, n: int, k: int, blocksize: int, bias, lora_A, lora_B,
                  scaling: float, dropout_p: float, seed: int):
    """Returns ``(y [M, n] in x's dtype, h [M, r])``, ``h = drop(x) Aᵀ / (1-p)`` (see ``fastpeft.cpu.lora``)."""
    y = nf4_forward(x2d, packed, absmax, code, n, k, blocksize, bias)
    return y, lora.add_lora_term(y, x2d, lora_A, lora_B, scaling, dropout_p, seed)


def qlora_backward(dy, x2d, packed, absmax, code, n: int, k: int, blocksize: int, lora_A, lora_B, h,
                   scaling: float, dropout_p: float, seed: int, need_dx: bool, need_dA: bool, need_dB: bool):
    """Returns ``(dx | None, dA | None, dB | None)``; only the asked-for ones are computed."""
    def base_input_grad(dy):
        return nf4_input_grad(dy, packed, absmax, code, n, k, blocksize)

    return lora.lora_backward_with_base(base_input_grad, dy, x2d, lora_A, lora_B, h, scaling, dropout_p, seed,
                                            need_dx, need_dA, need_dB)
