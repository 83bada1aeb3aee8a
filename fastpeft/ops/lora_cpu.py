"""LoRA linear on the CPU path: torch ops arranged for the fewest passes.

Dispatch contract (``docs/architecture.md``): the same functions as the Triton
launchers in ``fastpeft.kernels.lora`` (``lora_forward``, ``lora_backward``,
``dropout_mask``), so ``fastpeft.ops.lora`` can pick either. Also runs on
CUDA tensors when ``FASTPEFT_BACKEND=cpu`` forces it.

Forward: ``y = addmm(b, x, Wᵀ)`` then one in-place ``addmm_`` adds
``s · h Bᵀ`` with ``h = drop(x) Aᵀ / (1-p)`` (saved); the scaling is the
``addmm_``'s ``alpha``, applied in its accumulator, so ``s · h`` is never
rounded to fp16/bf16 on its own (where it could overflow). No temporary of
size ``M x N`` besides ``y``.
Backward: ``dx = dy W`` with ``s · dh A`` added in place (masked when dropout
is on) for ``dh = dy B``; ``dB = s · dyᵀ h`` reuses the saved ``h`` (scalings in
the GEMMs' accumulators, ``scaled_mm``); frozen
tensors get no gradient. ``lora_backward_with_base`` is the same around any
frozen base (QLoRA's NF4 base in ``fastpeft.ops.qlora_cpu``).

Dropout mask: not stored. It is regenerated in backward from the integer seed
with a ``torch.Generator`` on the tensors' device (``dropout_mask``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_h_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved ``h = drop(x) Aᵀ / (1-p)`` (and of ``dh``): x's own.

    Every use multiplies ``h`` in x's dtype (as torch does), so a wider copy
    would only cost memory; on a GPU it would also keep the LoRA reductions'
    wgmma loops synchronous (an operand converted in registers each step).
    """
    return x_dtype


def dropout_mask(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """Boolean keep-mask (True = kept) that the CPU path uses for ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def apply_dropout(x2d: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """``x ∘ keep / (1-p)`` with the mask of ``seed``; x itself when p is 0."""
    if dropout_p == 0.0:
        return x2d
    keep = dropout_mask(x2d.shape, dropout_p, seed, x2d.device)
    return x2d * keep * (1.0 / (1.0 - dropout_p))


def lora_forward(x2d, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int):
    """Returns ``(y [M, N] in x's dtype, h [M, r] in lora_h_dtype)``."""
    y = F.linear(x2d, weight, bias)  # torch.addmm(bias, x, Wᵀ) / torch.mm(x, Wᵀ), without a Python-level Wᵀ
    return y, add_lora_term(y, x2d, lora_A, lora_B, scaling, dropout_p, seed)


def add_lora_term(y, x2d, lora_A, lora_B, scaling: float, dropout_p: float, seed: int):
    """``y += s · h Bᵀ`` in place for any base output ``y``; returns ``h = drop(x) Aᵀ / (1-p)``."""
    h = F.linear(x2d if dropout_p == 0.0 else apply_dropout(x2d, dropout_p, seed), lora_A)
    h_dtype = lora_h_dtype(x2d.dtype)
    if h.dtype is not h_dtype:
        h = h.to(h_dtype)
    y.addmm_(h if h.dtype is y.dtype else h.to(y.dtype), lora_B.t(), alpha=scaling)
    return h


def scaled_mm(a, b, scaling: float, like):
    """``scaling · (a @ b)``, the scaling applied in the GEMM's accumulator (addmm's ``alpha``).

    One op instead of ``mm(a, b).mul_(scaling)``: no second pass and no
    second rounding in fp16/bf16. ``like`` only gives the result's shape
    (``beta=0``: addmm ignores its values, NaN included).
    """
    return torch.addmm(like, a, b, beta=0, alpha=scaling)


def lora_backward(dy, x2d, weight, lora_A, lora_B, h, scaling: float, dropout_p: float, seed: int,
                  need_dx: bool, need_dA: bool, need_dB: bool):
    """Returns ``(dx, dA, dB)``; an entry not asked for is ``None``."""
    return lora_backward_with_base(lambda dy: torch.mm(dy, weight), dy, x2d, lora_A, lora_B, h, scaling,
                                   dropout_p, seed, need_dx, need_dA, need_dB)


def lora_backward_with_base(base_input_grad, dy, x2d, lora_A, lora_B, h, scaling: float, dropout_p: float,
                            seed: int, need_dx: bool, need_dA: bool, need_dB: bool):
    """LoRA backward around any frozen base: ``base_input_grad(dy)`` gives the base's ``dy W``.

    Returns ``(dx, dA, dB)``; an entry not asked for is ``None``.
    """
    dx = dA = dB = None
    if need_dB:
        dB = scaled_mm(dy.t(), h if h.dtype is dy.dtype else h.to(dy.dtype), scaling, lora_B)
    if need_dx or need_dA:
        dh = torch.mm(dy, lora_B)
        if need_dA:
            dA = scaled_mm(dh.t(), x2d if dropout_p == 0.0 else apply_dropout(x2d, dropout_p, seed), scaling, lora_A)
        if need_dx:
            dx = base_input_grad(dy)
            if dropout_p == 0.0:
                dx.addmm_(dh, lora_A, alpha=scaling)
            else:
                dx.add_(apply_dropout(torch.mm(dh, lora_A), dropout_p, seed), alpha=scaling)
    return dx, dA, dB
