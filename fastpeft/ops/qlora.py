"""QLoRA linear: ``y = x · dequant(W_nf4)ᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` as an autograd op.

Layers (``docs/architecture.md``): ``qlora_linear`` (validates) ->
``QLoRALinearFunction`` -> the ``fastpeft::qlora_linear_forward`` /
``fastpeft::qlora_linear_backward`` custom ops (fake implementations for
``torch.compile``) -> ``fastpeft.kernels.qlora`` (Triton) or
``fastpeft.cpu.qlora``, picked by ``_dispatch.implementation``. Both run
LoRA's own orchestration (``kernels.lora`` / ``cpu.lora``) around the NF4
kernels of their backend.

Dropout and seeds follow ``fastpeft.ops.lora`` exactly: mask on x before A
only, kept values scaled by ``1/(1-p)``, never stored; an int64 seed drawn from
torch's default generator per call; ``fastpeft.ops.lora_dropout_mask`` returns
the mask a backend applies for a seed. The NF4 weight is frozen: no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import (FLOAT_DTYPES, check_lora_adapter, check_probability, check_same_device, check_scaling,
                           check_tensor, lora_adapter_ok)
from ..quant.nf4 import NF4Weight, dequantize_nf4_reference
from ..cpu import lora as lora_cpu
from ._autocast import any_autocast_enabled, autocast_inputs, autocast_off, outside_autocast
from ._autograd import forward_ad_active, gradients, needs
from ._dispatch import custom_op_with_eager_path, implementation, not_computed
from ._dropout_seed import draw_seed, seed_value
from .lora import composite_lora, differentiable_grads, lora_input_grads
from .nf4 import nf4_weight_ok, validate_nf4_weight


# --------------------------------------------------------------------------- custom ops
def _forward_impl(x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, out_features: int, in_features: int,
                  blocksize: int, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                  dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    impl = implementation("qlora", x2d.device, x2d.dtype)
    return impl.qlora_forward(x2d, packed, absmax, code, out_features, in_features, blocksize, bias, lora_A,
                              lora_B, scaling, dropout_p, seed_value(seed))


_forward_op, _forward = custom_op_with_eager_path("fastpeft::qlora_linear_forward", _forward_impl)


@_forward_op.register_fake
def _(x2d, packed, absmax, code, out_features, in_features, blocksize, bias, lora_A, lora_B, scaling,
      dropout_p, seed):
    y = x2d.new_empty((x2d.shape[0], out_features))
    h = x2d.new_empty((x2d.shape[0], lora_A.shape[0]), dtype=lora_cpu.lora_h_dtype(x2d.dtype))
    return y, h


def _backward_grads(dy: Tensor, x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, out_features: int,
                    in_features: int, blocksize: int, lora_A: Tensor, lora_B: Tensor, h: Tensor, scaling: float,
                    dropout_p: float, seed: Optional[Tensor], need_dx: bool, need_dA: bool, need_dB: bool) -> tuple:
    """``(dx, dA, dB)``, None where not asked for (the eager path: no placeholder tensors)."""
    impl = implementation("qlora", dy.device, dy.dtype)
    return impl.qlora_backward(dy, x2d, packed, absmax, code, out_features, in_features, blocksize, lora_A,
                               lora_B, h, scaling, dropout_p, seed_value(seed), need_dx, need_dA, need_dB)


def _backward_impl(dy: Tensor, x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, out_features: int,
                   in_features: int, blocksize: int, lora_A: Tensor, lora_B: Tensor, h: Tensor, scaling: float,
                   dropout_p: float, seed: Optional[Tensor], need_dx: bool, need_dA: bool,
                   need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = _backward_grads(dy, x2d, packed, absmax, code, out_features, in_features, blocksize, lora_A, lora_B, h,
                            scaling, dropout_p, seed, need_dx, need_dA, need_dB)
    return not_computed(grads, dy)


_backward_op, _backward = custom_op_with_eager_path("fastpeft::qlora_linear_backward", _backward_impl,
                                                    eager=_backward_grads)


@_backward_op.register_fake
def _(dy, x2d, packed, absmax, code, out_features, in_features, blocksize, lora_A, lora_B, h, scaling,
      dropout_p, seed, need_dx, need_dA, need_dB):
    def maybe(needed, like):
        return dy.new_empty(like.shape) if needed else dy.new_empty(0)

    return maybe(need_dx, x2d), maybe(need_dA, lora_A), maybe(need_dB, lora_B)


# --------------------------------------------------------------------------- autograd
# The forward arguments of QLoRALinearFunction, named once for its backward.
QLORA_INPUTS = ("x", "packed", "absmax", "code", "out_features", "in_features", "blocksize", "bias", "lora_A",
              "lora_B", "scaling", "dropout_p", "seed")


class QLoRALinearFunction(torch.autograd.Function):
    """Autograd for ``qlora_linear``; inputs are already validated. The NF4 weight is frozen."""


    @staticmethod
    def forward(ctx, x, packed, absmax, code, out_features, in_features, blocksize, bias, lora_A, lora_B,
                scaling, dropout_p, seed):
        x2d = x if x.dim() == 2 else x.reshape(-1, in_features)
        y2d, h = _forward(x2d, packed, absmax, code, out_features, in_features, blocksize, bias,
                          lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x2d, packed, absmax, code, lora_A, lora_B, h, seed)
        # x_shape None: dx needs no reshape. One attribute: each costs about a microsecond to set and to read.
        ctx.state = (out_features, in_features, blocksize, scaling, dropout_p, None if x2d is x else x.shape,
                     bias is not None)
        return y2d if x2d is x else y2d.view(*x.shape[:-1], out_features)

    @staticmethod
    @outside_autocast
    def backward(ctx, dy):
        x2d, packed, absmax, code, lora_A, lora_B, h, seed = ctx.saved_tensors
        out_features, in_features, blocksize, scaling, dropout_p, x_shape, has_bias = ctx.state
        need = needs(ctx, QLORA_INPUTS)
        dy2d = dy if dy.dim() == 2 else dy.reshape(-1, out_features)
        if torch.is_grad_enabled():  # create_graph=True: record the gradients for a second differentiation
            weight = dequantize_nf4_reference(packed, absmax, (out_features, in_features), blocksize, x2d.dtype)
            return gradients(QLORA_INPUTS, **differentiable_grads(need, x_shape, has_bias, dy2d, x2d, weight, lora_A,
                                                                  lora_B, scaling, dropout_p, seed))
        grads = {}
        if need["x"] or need["lora_A"] or need["lora_B"]:
            grads = lora_input_grads(need, x_shape, *_backward(dy2d, x2d, packed, absmax, code, out_features,
                                                                 in_features, blocksize, lora_A, lora_B, h, scaling,
                                                                 dropout_p, seed, need["x"], need["lora_A"],
                                                                 need["lora_B"]))
        if need["bias"] and has_bias:
            grads["bias"] = dy2d.sum(0)
        return gradients(QLORA_INPUTS, **grads)


def qlora_linear(x: Tensor, w_nf4: NF4Weight, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 bias: Optional[Tensor] = None, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """Fused QLoRA linear ``x · dequant(w_nf4)ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Shapes: ``x [..., K]``, ``w_nf4`` an ``NF4Weight`` ``[N, K]`` with
    ``K % blocksize == 0``, ``lora_A [r, K]``, ``lora_B [N, r]``, ``bias [N]``;
    x, lora_A, lora_B and bias share one device and floating dtype (fp32, fp16,
    bf16; fp64 on the CPU path). Dropout is applied only when ``training``.
    Gradients flow to x, lora_A, lora_B and bias. Returns ``[..., N]``.

    Under ``torch.autocast`` x, bias and the LoRA pair are cast like torch's
    ``linear`` casts its inputs (``fastpeft.ops._autocast``); the NF4 weight is
    dequantized to that dtype.
    """
    autocast = any_autocast_enabled()
    if autocast:
        x, lora_A, lora_B, bias = autocast_inputs(x, lora_A, lora_B, bias)
    if not _arguments_ok(x, w_nf4, lora_A, lora_B, bias):
        _validate(x, w_nf4, lora_A, lora_B, bias)
    n, k = w_nf4.shape
    scaling = check_scaling("scaling", scaling)
    dropout_p = check_probability("dropout_p", dropout_p)
    if not training:
        dropout_p = 0.0
    seed = draw_seed(dropout_p)
    args = (x, w_nf4.packed, w_nf4.absmax_float(), w_nf4.code, n, k, w_nf4.blocksize, bias, lora_A, lora_B, scaling,
            dropout_p, seed)
    if not autocast:
        return _run(args)
    with autocast_off(x.device.type):
        return _run(args)


def _run(args: tuple) -> Tensor:
    """``QLoRALinearFunction.apply``, or its forward alone when no gradient can be asked for
    (see ``fastpeft.ops.lora._run``)."""
    x, bias, lora_A, lora_B = args[0], args[7], args[8], args[9]
    if forward_ad_active():  # tangents through torch ops on the dequantized weight (see lora.composite_lora)
        weight = dequantize_nf4_reference(args[1], args[2], (args[4], args[5]), args[6], x.dtype)
        return composite_lora(x, weight, bias, lora_A, lora_B, *args[10:])
    if torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return QLoRALinearFunction.apply(*args)
    if x.dim() == 2:
        return _forward(*args)[0]
    n, k = args[4], args[5]
    return _forward(x.reshape(-1, k), *args[1:])[0].view(*x.shape[:-1], n)


def _arguments_ok(x, w_nf4, lora_A, lora_B, bias) -> bool:
    """True when ``_validate`` would pass (the cheap form run on every call)."""
    try:
        n, k = w_nf4.shape
        return (nf4_weight_ok(w_nf4) and w_nf4.packed.device == x.device
                and lora_adapter_ok(x, lora_A, lora_B, bias, n, k))
    except (AttributeError, TypeError, ValueError):
        return False


def _validate(x, w_nf4, lora_A, lora_B, bias) -> None:
    validate_nf4_weight("w_nf4", w_nf4)
    n, k = w_nf4.shape
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., in_features]")
    check_same_device("x", x, w_nf4=w_nf4.packed)
    check_lora_adapter(x, lora_A, lora_B, bias, n, k)
