"""DoRA linear on the CPU path: LoRA's CPU steps (``fastpeft.cpu.lora``) with DoRA's column scale around them.

Dispatch contract (``docs/architecture.md``): the same functions as
``fastpeft.kernels.dora`` (``dora_forward``, ``dora_backward``).

With the detached column scale ``c = m / ‖W + s·BA‖`` (``[N]``, computed by
``fastpeft.ops.dora``), PEFT's DoRA output is
``y = x Wᵀ + b + (c − 1) ⊙ (x' Wᵀ) + c ⊙ s·(x' Aᵀ) Bᵀ`` with ``x' = drop(x)``
in training with dropout and ``x' = x`` otherwise. Written as
``z = x' Wᵀ + s·(x' Aᵀ) Bᵀ`` (LoRA's forward on ``x'`` without bias):

- no dropout: ``y = c ⊙ z + b``;
- dropout: ``y = c ⊙ z + b + (x − x') Wᵀ`` (PEFT's recomputation of the base
  on the dropped x, folded into one extra GEMM).

Backward with ``g = c ⊙ dy``: LoRA's backward run on ``g`` gives dA and dB;
dx is LoRA's with the base part ``g W`` (no dropout) or
``dy W + drop'((g − dy) W)`` (dropout); ``dm = Σ_rows(dy ⊙ z) / ‖·‖``
(``z`` saved by the forward when m needs a gradient). No dense ``B·A``.

``*_with_base`` take the frozen base's products as callables (``base_forward(x)
= x Wᵀ``, ``base_input_grad(dy) = dy W``), so QDoRA runs the same steps around
the NF4 CPU path.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import lora


def dora_forward(x2d, weight, bias, lora_A, lora_B, scale, scaling: float, dropout_p: float, seed: int,
                 keep_z: bool):
    """Returns ``(y [M, N], h [M, r], z [M, N] or None)``; ``scale`` is ``c = m/‖W + s·BA‖`` in fp32."""
    return dora_forward_with_base(lambda x: F.linear(x, weight), x2d, bias, lora_A, lora_B, scale, scaling,
                                  dropout_p, seed, keep_z)


def dora_forward_with_base(base_forward: Callable, x2d, bias, lora_A, lora_B, scale, scaling: float,
                           dropout_p: float, seed: int, keep_z: bool):
    """DoRA's forward around any frozen base (``base_forward(x) = x Wᵀ``, no bias); see the module docstring."""
    x_dropped = lora.apply_dropout(x2d, dropout_p, seed)
    z = base_forward(x_dropped)
    h = lora.add_lora_term(z, x_dropped, lora_A, lora_B, scaling, 0.0, 0)
    c = scale.to(z.dtype)
    if keep_z:
        y = torch.mul(z, c) if bias is None else torch.addcmul(bias, z, c)
    else:  # in place, with the same kernels (the same bits) as above
        y = z.mul_(c) if bias is None else torch.addcmul(bias, z, c, out=z)
        z = None
    if dropout_p != 0.0:
        y.add_(base_forward(x2d - x_dropped))
    return y, h, z


def dora_backward(dy, x2d, weight, lora_A, lora_B, h, z, scale, norm, scaling: float, dropout_p: float, seed: int,
                  need_dx: bool, need_dA: bool, need_dB: bool, need_dm: bool):
    """Returns ``(dx, dA, dB, dm)``; an entry not asked for is ``None``."""
    return dora_backward_with_base(lambda g: torch.mm(g, weight), dy, x2d, lora_A, lora_B, h, z, scale, norm,
                                   scaling, dropout_p, seed, need_dx, need_dA, need_dB, need_dm)


def dora_backward_with_base(base_input_grad: Callable, dy, x2d, lora_A, lora_B, h, z: Optional[torch.Tensor],
                            scale, norm, scaling: float, dropout_p: float, seed: int, need_dx: bool, need_dA: bool,
                            need_dB: bool, need_dm: bool):
    """DoRA's backward around any frozen base (``base_input_grad(dy) = dy W``); see the module docstring."""
    dm = None
    if need_dm:
        dm = magnitude_grad(dy, z, norm)
    if not (need_dx or need_dA or need_dB):
        return None, None, None, dm
    g = dy * scale.to(dy.dtype)
    if dropout_p == 0.0:
        grad_of_base = base_input_grad
    else:
        def grad_of_base(g):
            dx = base_input_grad(dy)
            dx.add_(lora.apply_dropout(base_input_grad(g - dy), dropout_p, seed))
            return dx
    dx, dA, dB = lora.lora_backward_with_base(grad_of_base, g, x2d, lora_A, lora_B, h, scaling, dropout_p, seed,
                                              need_dx, need_dA, need_dB)
    return dx, dA, dB, dm


def magnitude_grad(dy, z, norm):
    """``dm = Σ_rows(dy ⊙ z) / ‖W + s·BA‖`` in fp32 (the caller casts it to m's dtype)."""
    return (dy * z).sum(0, dtype=torch.float32).div_(norm)
