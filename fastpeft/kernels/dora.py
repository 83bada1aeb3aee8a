"""Triton DoRA linear: LoRA's launches (``fastpeft.kernels.lora``) with DoRA's column scale around them.

Dispatch contract (``docs/architecture.md``): ``fastpeft.ops.dora`` calls
``dora_forward`` / ``dora_backward`` here or in ``fastpeft.cpu.dora``, which
has the same functions and states the maths (``z = x' Wᵀ + s·(x' Aᵀ) Bᵀ``,
``y = c ⊙ z + b`` [``+ (x − x') Wᵀ`` with dropout], backward through LoRA's
launches on ``g = c ⊙ dy``, ``dm = Σ_rows(dy ⊙ z) / ‖·‖``).

LoRA's fused launches run unchanged (no bias, no dropout inside them: the
dropped ``x'`` is formed once with the kernels' own mask). The backward's
``g = c ⊙ dy`` and ``dm`` come from one pass over ``dy`` and ``z``
(``_dora_grad_scale_kernel``: column sums per row split, added in a fixed
order). The forward's column scale and bias, and the dropout-only base
product, are still torch ops: the scale in the fused GEMM's epilogue is the
next step (``docs/architecture.md``, "How to add a LoRA variant"). AOT
launches: ``gates/aot/dora.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import TARGET_SMS, cdiv, check_kernel_dtype, launcher
from ._dora_kernels import _dora_grad_scale_kernel
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
    need_g = need_dx or need_dA or need_dB
    g, dm = dora_grad_scale(dy, z if need_dm else None, scale, norm, need_g)
    if not need_g:
        return None, None, None, dm
    x_dropped, keep_scale = _dropped(x2d, dropout_p, seed)
    dx, dA, dB = lora_backward(g, x_dropped, weight, lora_A, lora_B, h, scaling, 0.0, 0, need_dx, need_dA, need_dB)
    if need_dx and keep_scale is not None:  # dx = dy W + drop'(dx' − dy W), dx' the gradient of x'
        dy_w = torch.mm(dy, weight)
        dx = dx.sub_(dy_w).mul_(keep_scale).add_(dy_w)
    return dx, dA, dB, dm


GRAD_SCALE_BLOCK_M, GRAD_SCALE_BLOCK_N = 32, 128


def dora_grad_scale(dy, z, scale, norm, write_g: bool):
    """``(g = c ⊙ dy or None, dm = Σ_rows(dy ⊙ z) / norm in fp32, or None when z is None)`` in one pass."""
    m, n = dy.shape
    if dy.stride(1) != 1:
        dy = dy.contiguous()
    g = torch.empty((m, n), dtype=dy.dtype, device=dy.device) if write_g else None
    has_z = z is not None
    if m == 0 or n == 0:
        return g, (torch.zeros(n, dtype=torch.float32, device=dy.device) if has_z else None)
    col_tiles = cdiv(n, GRAD_SCALE_BLOCK_N)
    # Row splits until the grid has a program per SM (never more splits than row tiles).
    splits = max(1, min(cdiv(m, GRAD_SCALE_BLOCK_M), cdiv(TARGET_SMS, col_tiles)))
    rows_per_split = cdiv(m, splits)
    partials = torch.empty((splits, n), dtype=torch.float32, device=dy.device) if has_z else None
    _dora_grad_scale_kernel[(col_tiles, splits)](
        dy, z if has_z else dy, scale, g if write_g else dy, partials if has_z else scale, m, n, rows_per_split,
        dy.stride(0), z.stride(0) if has_z else 0, WRITE_G=write_g, HAS_Z=has_z,
        BLOCK_M=GRAD_SCALE_BLOCK_M, BLOCK_N=GRAD_SCALE_BLOCK_N, num_warps=4, num_stages=1)
    return g, (partials.sum(0).div_(norm) if has_z else None)

