"""Triton DoRA linear: LoRA's launches (``fastpeft.kernels.lora``) with DoRA's column scale around them.

Dispatch contract (``docs/architecture.md``): ``fastpeft.ops.dora`` calls
``dora_forward`` / ``dora_backward`` here or in ``fastpeft.cpu.dora``, which
has the same functions and states the maths (``z = x' Wᵀ + s·(x' Aᵀ) Bᵀ``,
``y = c ⊙ z + b`` [``+ (x − x') Wᵀ`` with dropout], backward through LoRA's
launches on ``g = c ⊙ dy``, ``dm = Σ_rows(dy ⊙ z) / ‖·‖``).

This first form runs LoRA's fused launches unchanged (no bias, no dropout
inside them: the dropped ``x'`` is formed once with the kernels' own mask) and
the column scale, bias, ``dm`` and the dropout-only base product as torch
ops. It adds no kernel of its own, so it has no AOT variants yet
(``aot_launches`` records none): the scale in the fused GEMM's epilogue and
``dm`` as a reduction are the next step (``docs/architecture.md``, "How to
add a LoRA variant").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_kernel_dtype, launcher
from .lora import dropout_mask, lora_backward, lora_forward

__all__ = ["check_kernel_dtype", "dora_backward", "dora_forward"]


def _dropped(x2d, dropout_p: float, seed: int):
    """``(x', keep / (1-p))`` with the LoRA kernels' mask for ``seed``; ``(x, None)`` without dropout."""
    if dropout_p == 0.0:
        return x2d, None
    keep_scale = dropout_mask(x2d.shape, dropout_p, seed, x2d.device).to(x2d.dtype) * (1.0 / (1.0 - dropout_p))
    return x2d * keep_scale, keep_scale


@launcher
def dora_forward(x2d, weight, bias, lora_A, lora_B, scale, scaling: float, dropout_p: float, seed: int,
                 keep_z: bool):
    """Returns ``(y [M, N], h [M, r], z [M, N] or None)``; ``scale`` is ``c = m/‖W + s·BA‖`` (fp32)."""
    x_dropped, _ = _dropped(x2d, dropout_p, seed)
    z, h = lora_forward(x_dropped, weight, None, lora_A, lora_B, scaling, 0.0, 0)
    c = scale.to(z.dtype)
    y = torch.mul(z, c) if bias is None else torch.addcmul(bias, z, c)
    if dropout_p != 0.0:
        y.add_(F.linear(x2d - x_dropped, weight))
    return y, h, (z if keep_z else None)


@launcher
def dora_backward(dy, x2d, weight, lora_A, lora_B, h, z, scale, norm, scaling: float, dropout_p: float, seed: int,
                  need_dx: bool, need_dA: bool, need_dB: bool, need_dm: bool):
    """Returns ``(dx, dA, dB, dm)``; an entry not asked for is ``None`` (dm in fp32)."""
    dm = (dy * z).sum(0, dtype=torch.float32).div_(norm) if need_dm else None
    if not (need_dx or need_dA or need_dB):
        return None, None, None, dm
    x_dropped, keep_scale = _dropped(x2d, dropout_p, seed)
    g = dy * scale.to(dy.dtype)
    dx, dA, dB = lora_backward(g, x_dropped, weight, lora_A, lora_B, h, scaling, 0.0, 0, need_dx, need_dA, need_dB)
    if need_dx and keep_scale is not None:  # dx = dy W + drop'(dx' − dy W), dx' the gradient of x'
        dy_w = torch.mm(dy, weight)
        dx = dx.sub_(dy_w).mul_(keep_scale).add_(dy_w)
    return dx, dA, dB, dm


def aot_launches() -> None:
    """No kernel of this module's own yet: its launches are ``fastpeft.kernels.lora``'s (reported there)."""


def aot_specs():
    return []
