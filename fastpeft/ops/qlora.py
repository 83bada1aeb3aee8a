"""QLoRA linear: ``y = x · dequant(W_nf4)ᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` as an autograd op.

Layers (DESIGN.md §2): ``qlora_linear`` (validates) -> ``QLoRALinearFunction``
-> the ``fastpeft::qlora_linear_forward`` / ``fastpeft::qlora_linear_backward``
custom ops (fake implementations for ``torch.compile``) -> Triton kernels or
the CPU path, chosen by ``fastpeft._backend.select_backend`` (see
``fastpeft.ops.nf4`` for the NF4 half of each).

Triton: the LoRA shrink kernel of ``fastpeft.kernels.lora`` makes
``h = s · drop(x) Aᵀ`` (fp32, saved), then one NF4 kernel computes
``x Wᵀ + h Bᵀ + b``. Backward: ``dB = dyᵀ h`` and ``dA = dhᵀ drop(x)`` with the
LoRA reduce kernel, ``dh = s · dy B`` with the shrink kernel, and
``dx = dy W + drop'(dh A)`` in one NF4 kernel (dropout mask regenerated).
CPU: the NF4 CPU path for the frozen GEMMs, torch ops for the LoRA terms.

Dropout and seeds follow ``fastpeft.ops.lora`` exactly: mask on x before A
only, kept values scaled by ``1/(1-p)``, never stored; an int64 seed drawn from
torch's default generator per call; ``fastpeft.ops.lora_dropout_mask`` returns
the mask a backend applies for a seed. The NF4 weight is frozen: no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import FLOAT_DTYPES, check_lora_adapter, check_probability, check_same_device, check_tensor
from ..quant.nf4 import NF4Weight
from ._dispatch import custom_op_with_eager_path
from . import lora_cpu
from ._dropout_seed import draw_seed, seed_value
from .nf4 import cpu_nf4_matmul, cpu_nf4_matmul_transposed, use_triton, validate_nf4_weight


# --------------------------------------------------------------------------- Triton path
def _triton_forward(x2d, packed, absmax, code, n, k, blocksize, bias, lora_A, lora_B, scaling, dropout_p, seed):
    from ..kernels import lora as triton_lora
    from ..kernels import nf4 as triton_nf4

    r = lora_A.shape[0]
    h = torch.empty((x2d.shape[0], r), dtype=torch.float32, device=x2d.device)
    if x2d.shape[0] > 0:
        triton_lora.lora_shrink(x2d, lora_A, (lora_A.stride(1), lora_A.stride(0)), h,
                            scaling / (1.0 - dropout_p), dropout_p, seed)
    y = triton_nf4.nf4_matmul(x2d, packed.reshape(-1), absmax, code, n, k, blocksize, bias=bias,
                              lora_h=h, lora_B=lora_B)
    return y, h


def _triton_backward(dy, x2d, packed, absmax, code, n, k, blocksize, lora_A, lora_B, h, scaling, dropout_p, seed,
                     need_dx, need_dA, need_dB):
    from ..kernels import lora as triton_lora
    from ..kernels import nf4 as triton_nf4

    m, r = x2d.shape[0], lora_A.shape[0]
    dx = dA = dB = None
    if need_dB:
        dB = torch.zeros((n, r), dtype=lora_B.dtype, device=dy.device)
        if m > 0:
            triton_lora.lora_reduce(dy, h.contiguous(), dB, 1.0, 0.0, 0)
    if need_dx or need_dA:
        dh = torch.empty((m, r), dtype=torch.float32, device=dy.device)
        if m > 0:
            triton_lora.lora_shrink(dy, lora_B, (lora_B.stride(0), lora_B.stride(1)), dh, scaling, 0.0, 0)
        if need_dA:
            dA = torch.zeros((r, k), dtype=lora_A.dtype, device=dy.device)
            if m > 0:
                triton_lora.lora_reduce(x2d, dh, dA.t(), 1.0 / (1.0 - dropout_p), dropout_p, seed)
        if need_dx:
            dx = triton_nf4.nf4_matmul_transposed(dy, packed.reshape(-1), absmax, code, n, k, blocksize,
                                                  lora_dh=dh, lora_A=lora_A, dropout_p=dropout_p, seed=seed)
    return dx, dA, dB


# --------------------------------------------------------------------------- CPU path
def _cpu_forward(x2d, packed, absmax, code, n, k, blocksize, bias, lora_A, lora_B, scaling, dropout_p, seed):
    y = cpu_nf4_matmul(x2d, packed, absmax, code, n, k, blocksize, bias)
    return y, lora_cpu.add_lora_term(y, x2d, lora_A, lora_B, scaling, dropout_p, seed)


def _cpu_backward(dy, x2d, packed, absmax, code, n, k, blocksize, lora_A, lora_B, h, scaling, dropout_p, seed,
                  need_dx, need_dA, need_dB):
    def base_input_grad(dy):
        return cpu_nf4_matmul_transposed(dy, packed, absmax, code, n, k, blocksize)

    return lora_cpu.lora_backward_with_base(base_input_grad, dy, x2d, lora_A, lora_B, h, scaling, dropout_p, seed,
                                            need_dx, need_dA, need_dB)


# --------------------------------------------------------------------------- custom ops
def _forward_impl(x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, out_features: int, in_features: int,
                  blocksize: int, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                  dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    impl = _triton_forward if use_triton(x2d.device, x2d.dtype) else _cpu_forward
    return impl(x2d, packed, absmax, code, out_features, in_features, blocksize, bias, lora_A, lora_B,
                scaling, dropout_p, seed_value(seed))


_forward_op, _forward = custom_op_with_eager_path("fastpeft::qlora_linear_forward", _forward_impl)


@_forward_op.register_fake
def _(x2d, packed, absmax, code, out_features, in_features, blocksize, bias, lora_A, lora_B, scaling,
      dropout_p, seed):
    y = x2d.new_empty((x2d.shape[0], out_features))
    h = x2d.new_empty((x2d.shape[0], lora_A.shape[0]), dtype=lora_cpu.lora_h_dtype(x2d.dtype))
    return y, h


def _backward_impl(dy: Tensor, x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, out_features: int,
                   in_features: int, blocksize: int, lora_A: Tensor, lora_B: Tensor, h: Tensor, scaling: float,
                   dropout_p: float, seed: Optional[Tensor], need_dx: bool, need_dA: bool,
                   need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    impl = _triton_backward if use_triton(dy.device, dy.dtype) else _cpu_backward
    grads = impl(dy, x2d, packed, absmax, code, out_features, in_features, blocksize, lora_A, lora_B, h,
                 scaling, dropout_p, seed_value(seed), need_dx, need_dA, need_dB)
    # Custom ops cannot return None: an empty tensor stands for "not computed".
    return tuple(g if g is not None else dy.new_empty(0) for g in grads)


_backward_op, _backward = custom_op_with_eager_path("fastpeft::qlora_linear_backward", _backward_impl)


@_backward_op.register_fake
def _(dy, x2d, packed, absmax, code, out_features, in_features, blocksize, lora_A, lora_B, h, scaling,
      dropout_p, seed, need_dx, need_dA, need_dB):
    def maybe(needed, like):
        return dy.new_empty(like.shape) if needed else dy.new_empty(0)

    return maybe(need_dx, x2d), maybe(need_dA, lora_A), maybe(need_dB, lora_B)


# --------------------------------------------------------------------------- autograd
class QLoRALinearFunction(torch.autograd.Function):
    """Autograd for ``qlora_linear``; inputs are already validated. The NF4 weight is frozen."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, out_features, in_features, blocksize, bias, lora_A, lora_B,
                scaling, dropout_p, seed):
        x2d = x.reshape(-1, in_features)
        y2d, h = _forward(x2d, packed, absmax, code, out_features, in_features, blocksize, bias,
                             lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x2d, packed, absmax, code, lora_A, lora_B, h, seed)
        ctx.dims = (out_features, in_features, blocksize)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y2d.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x2d, packed, absmax, code, lora_A, lora_B, h, seed = ctx.saved_tensors
        out_features, in_features, blocksize = ctx.dims
        need = ctx.needs_input_grad
        need_dx, need_db, need_dA, need_dB = need[0], need[7], need[8], need[9]
        dy2d = dy.reshape(-1, out_features)
        dx = db = dA = dB = None
        if need_dx or need_dA or need_dB:
            dx, dA, dB = _backward(dy2d, x2d, packed, absmax, code, out_features, in_features, blocksize,
                                      lora_A, lora_B, h, ctx.scaling, ctx.dropout_p, seed,
                                      need_dx, need_dA, need_dB)
            dx = dx.view(ctx.x_shape) if need_dx else None
            dA = dA if need_dA else None
            dB = dB if need_dB else None
        if need_db and ctx.has_bias:
            db = dy2d.sum(0)
        return dx, None, None, None, None, None, None, db, dA, dB, None, None, None


def qlora_linear(x: Tensor, w_nf4: NF4Weight, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 bias: Optional[Tensor] = None, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """Fused QLoRA linear ``x · dequant(w_nf4)ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Shapes: ``x [..., K]``, ``w_nf4`` an ``NF4Weight`` ``[N, K]`` with
    ``K % blocksize == 0``, ``lora_A [r, K]``, ``lora_B [N, r]``, ``bias [N]``;
    x, lora_A, lora_B and bias share one device and floating dtype (fp32, fp16,
    bf16; fp64 on the CPU path). Dropout is applied only when ``training``.
    Gradients flow to x, lora_A, lora_B and bias. Returns ``[..., N]``.
    """
    validate_nf4_weight("w_nf4", w_nf4)
    n, k = w_nf4.shape
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., in_features]")
    check_same_device("x", x, w_nf4=w_nf4.packed)
    check_lora_adapter(x, lora_A, lora_B, bias, n, k)
    dropout_p = check_probability("dropout_p", dropout_p)
    if not training:
        dropout_p = 0.0
    seed = draw_seed(dropout_p)
    return QLoRALinearFunction.apply(x, w_nf4.packed, w_nf4.absmax_float(), w_nf4.code, n, k, w_nf4.blocksize,
                                     bias, lora_A, lora_B, float(scaling), dropout_p, seed)
