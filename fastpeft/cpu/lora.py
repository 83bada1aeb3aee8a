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
frozen base (QLoRA's NF4 base in ``fastpeft.cpu.qlora``).

Few rows of fp16/bf16 on the CPU: the LoRA branch's GEMMs (everything but the
base's) run in fp32 on upcast copies of the operands while ``M·(K+N)`` is at
most ``FP32_BRANCH_MAX_FORWARD`` / ``_BACKWARD`` (``branch_dtype``). A
bf16/fp16 GEMM on the CPU goes through oneDNN, which costs about 25 µs per
call whatever its size: more than the whole fp32 branch at one token, where
the upcast copies of A and B (``r·(K+N)`` elements) cost most. The fp32 GEMMs
grow with ``M·(K+N)``; the limits (forward: M=16 at K=N=1024, M=4 at
K=N=4096; backward: M=32 and M=8) are about the crossovers measured at r=16
on an AVX512-BF16/AMX Xeon, one thread. Above them oneDNN runs the branch in
x's dtype with fp32 accumulation. Only the rounding of the results (``y``, ``h``,
``dx``, ``dA``, ``dB``) to x's dtype remains, so the fp32 branch is more
accurate than torch's own bf16 LoRA.

Dropout: the keep-mask of ``seed`` (``dropout_mask``: ``torch.rand`` of a
``torch.Generator`` seeded with it, ``>= p``) is drawn once per forward as 0/1
values in the branch's dtype (``keep_values``); ``1/(1-p)`` goes into the
GEMMs' ``alpha`` (``h = (1/(1-p)) · (x ∘ keep) Aᵀ``), never into a pass of its
own. The forward leaves the mask on ``h`` (``KEEP_ATTR``), which the autograd op
saves for backward, so backward draws no second mask: ``dA`` multiplies
``x ∘ keep`` by ``s/(1-p)`` in its GEMM and ``dx`` adds ``(s/(1-p)) · (dh A) ∘ keep``
in one ``addcmul_``. A backward given an ``h`` without the mask (torch.compile's
graph, or an ``h`` made elsewhere) regenerates it from the seed: the same bits.
Drawing the mask costs about 2 ns per element (torch's CPU generator), most of
dropout's cost; the mask kept lives as long as ``h`` (4 bytes per element of x
in fp32, what PEFT's ``nn.Dropout`` also keeps besides the dropped x).
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


# The LoRA branch of fp16/bf16 input runs in fp32 while M·(K+N) is at most this (module docstring).
FP32_BRANCH_MAX_FORWARD = 1 << 15
FP32_BRANCH_MAX_BACKWARD = 1 << 16
_REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def branch_dtype(x2d: torch.Tensor, n: int, limit: int) -> torch.dtype:
    """dtype the LoRA branch's GEMMs run in for the input ``x2d [M, K]`` of a layer with ``n`` outputs."""
    if x2d.dtype in _REDUCED_DTYPES and x2d.shape[0] * (x2d.shape[1] + n) <= limit and x2d.device.type == "cpu":
        return torch.float32
    return x2d.dtype


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` itself when it already has ``dtype``, else a converted copy."""
    return t if t.dtype is dtype else t.to(dtype)


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


KEEP_ATTR = "_fastpeft_dropout_keep"  # the forward's keep values, left on h for backward (module docstring)


def keep_values(shape, dropout_p: float, seed: int, device, dtype: torch.dtype) -> torch.Tensor:
    """``dropout_mask`` as 1.0 (kept) / 0.0 in ``dtype``: compared in place in the random draw's own buffer."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    keep = torch.rand(shape, generator=generator, device=device).ge_(dropout_p)
    return in_dtype(keep, dtype)


def _saved_keep(h: torch.Tensor, x2d: torch.Tensor, dropout_p: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The forward's keep values left on ``h``, else the same values drawn again from ``seed``."""
    keep = getattr(h, KEEP_ATTR, None)
    if keep is None or keep.shape != x2d.shape:
        keep = keep_values(x2d.shape, dropout_p, seed, x2d.device, dtype)
    return in_dtype(keep, dtype)


def lora_forward(x2d, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int):
    """Returns ``(y [M, N] in x's dtype, h [M, r] in lora_h_dtype)``."""
    y = base_output(x2d, weight, bias)
    return y, add_lora_term(y, x2d, lora_A, lora_B, scaling, dropout_p, seed)


def base_output(x2d, weight, bias):
    """``x Wᵀ + b`` (a new tensor), one bf16 row on the CPU as a matrix-vector product.

    For one bf16 row, torch's ``mv`` (a gemv with fp32 accumulation, reading W
    once) takes about 0.6x the time of ``linear``'s oneDNN matmul; the values
    are the same. Everything else is ``F.linear`` (``addmm(b, x, Wᵀ)`` /
    ``mm(x, Wᵀ)`` without a Python-level ``Wᵀ``).
    """
    if x2d.shape[0] == 1 and x2d.dtype is torch.bfloat16 and x2d.device.type == "cpu":
        row = x2d[0]
        return (torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)).unsqueeze(0)
    return F.linear(x2d, weight, bias)


def add_lora_term(y, x2d, lora_A, lora_B, scaling: float, dropout_p: float, seed: int):
    """``y += s · h Bᵀ`` in place for any base output ``y``; returns ``h = drop(x) Aᵀ / (1-p)``."""
    work = branch_dtype(x2d, y.shape[1], FP32_BRANCH_MAX_FORWARD)
    x_work = in_dtype(x2d, work)
    keep = None
    if dropout_p == 0.0:
        h = F.linear(x_work, in_dtype(lora_A, work))
    else:  # h = (1/(1-p)) · (x ∘ keep) Aᵀ, the 1/(1-p) in the GEMM's accumulator
        keep = keep_values(x2d.shape, dropout_p, seed, x2d.device, work)
        h = scaled_mm(x_work * keep, in_dtype(lora_A, work).t(), 1.0 / (1.0 - dropout_p),
                      x_work.new_empty(()))
    if work is y.dtype:
        y.addmm_(h, in_dtype(lora_B, work).t(), alpha=scaling)
    else:  # one rounding of y + s · h Bᵀ, the sum formed in fp32
        y.add_(F.linear(h, in_dtype(lora_B, work)), alpha=scaling)
    h = in_dtype(h, lora_h_dtype(x2d.dtype))
    if keep is not None:
        setattr(h, KEEP_ATTR, keep)
    return h


def scaled_mm(a, b, scaling: float, like):
    """``scaling · (a @ b)``, the scaling applied in the GEMM's accumulator (addmm's ``alpha``).

    One op instead of ``mm(a, b).mul_(scaling)``: no second pass and no
    second rounding in fp16/bf16. ``like`` only gives the result's dtype:
    it is broadcast to the result's shape (a 0-dim tensor will do) and
    ``beta=0`` ignores its values, NaN included.
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

    Returns ``(dx, dA, dB)``; an entry not asked for is ``None``. The LoRA
    GEMMs run in ``branch_dtype``; each gradient comes back in its input's
    dtype.
    """
    work = branch_dtype(x2d, dy.shape[1], FP32_BRANCH_MAX_BACKWARD)
    dy_work = in_dtype(dy, work)
    dx = dA = dB = None
    if need_dB:
        dB = in_dtype(scaled_mm(dy_work.t(), in_dtype(h, work), scaling, _like(lora_B, work)), lora_B.dtype)
    if need_dx or need_dA:
        dh = torch.mm(dy_work, in_dtype(lora_B, work))
        # dropout: the forward's mask, 1/(1-p) folded into each GEMM's alpha or the addcmul's value
        keep = None if dropout_p == 0.0 else _saved_keep(h, x2d, dropout_p, seed, work)
        s = scaling if keep is None else scaling / (1.0 - dropout_p)
        if need_dA:
            x_work = in_dtype(x2d, work)
            dA = in_dtype(scaled_mm(dh.t(), x_work if keep is None else x_work * keep, s, _like(lora_A, work)),
                          lora_A.dtype)
        if need_dx:
            dx = base_input_grad(dy)
            a_work = in_dtype(lora_A, work)
            if keep is not None:  # dx + s/(1-p) · (dh A) ∘ keep, one pass, one rounding
                dx.addcmul_(torch.mm(dh, a_work), keep, value=s)
            elif work is dx.dtype:
                dx.addmm_(dh, a_work, alpha=scaling)
            else:  # one rounding of dx + s · dh A, the sum formed in fp32
                dx.add_(torch.mm(dh, a_work), alpha=scaling)
    return dx, dA, dB


def _like(grad_of: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scaled_mm``'s ``like`` for the gradient of ``grad_of`` computed in ``dtype`` (0-dim when it must be made)."""
    return grad_of if grad_of.dtype is dtype else grad_of.new_empty((), dtype=dtype)
