"""NF4 linear: ``y = x · dequant(W)ᵀ (+ bias)`` with a frozen NF4 weight, as an autograd op.

Layers (``docs/architecture.md``): ``nf4_linear`` (functional API, validates) ->
``NF4LinearFunction`` (autograd: grads for x and bias, never for the frozen
weight) -> the ``fastpeft::nf4_linear_forward`` / ``fastpeft::nf4_linear_input_grad``
custom ops (fake implementations for ``torch.compile``) ->
``fastpeft.kernels.nf4`` (Triton fused dequant-matmul) or
``fastpeft.cpu.nf4`` (native C++ kernels, or dequantize-then-matmul),
picked by ``_dispatch.implementation``; never reached by falling back from a
failing kernel.

Custom ops take tensors, not ``NF4Weight``: the packed bytes, the fp32 block
scales (``absmax_float()``, double quantization already resolved), the
codebook, and ``(out_features, in_features, blocksize)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import FLOAT_DTYPES, check_dim, check_same_device, check_same_dtype, check_tensor
from ..quant.nf4 import NF4Weight
from ._autocast import any_autocast_enabled, autocast_inputs, autocast_off, outside_autocast
from ._autograd import forward_ad_active, gradients, needs, once_differentiable
from ._dispatch import custom_op_with_eager_path, implementation
from ..cpu.nf4 import cpu_path_uses_native  # noqa: F401  (re-exported: which CPU form runs)


# --------------------------------------------------------------------------- custom ops
def _forward_impl(x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, out_features: int,
                  in_features: int, blocksize: int, bias: Optional[Tensor]) -> Tensor:
    impl = implementation("nf4", x2d.device, x2d.dtype)
    return impl.nf4_forward(x2d, packed, absmax, code, out_features, in_features, blocksize, bias)


_forward_op, _forward = custom_op_with_eager_path("fastpeft::nf4_linear_forward", _forward_impl)


@_forward_op.register_fake
def _(x2d, packed, absmax, code, out_features, in_features, blocksize, bias):
    return x2d.new_empty((x2d.shape[0], out_features))


def _input_grad_impl(dy2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, out_features: int,
                     in_features: int, blocksize: int) -> Tensor:
    impl = implementation("nf4", dy2d.device, dy2d.dtype)
    return impl.nf4_input_grad(dy2d, packed, absmax, code, out_features, in_features, blocksize)


_input_grad_op, _input_grad = custom_op_with_eager_path("fastpeft::nf4_linear_input_grad", _input_grad_impl)


@_input_grad_op.register_fake
def _(dy2d, packed, absmax, code, out_features, in_features, blocksize):
    return dy2d.new_empty((dy2d.shape[0], in_features))


# --------------------------------------------------------------------------- autograd
# The forward arguments of NF4LinearFunction, named once for its backward.
NF4_INPUTS = ("x", "packed", "absmax", "code", "out_features", "in_features", "blocksize", "bias")


class NF4LinearFunction(torch.autograd.Function):
    """Autograd for ``nf4_linear``; inputs are already validated. The weight gets no gradient."""


    @staticmethod
    def forward(ctx, x, packed, absmax, code, out_features, in_features, blocksize, bias):
        x2d = x if x.dim() == 2 else x.reshape(-1, in_features)
        y2d = _forward(x2d, packed, absmax, code, out_features, in_features, blocksize, bias)
        ctx.save_for_backward(packed, absmax, code)
        ctx.dims = (out_features, in_features, blocksize)
        ctx.x_shape = None if x2d is x else x.shape  # None: dx needs no reshape
        ctx.has_bias = bias is not None
        return y2d if x2d is x else y2d.view(*x.shape[:-1], out_features)

    @staticmethod
    @once_differentiable
    @outside_autocast
    def backward(ctx, dy):
        packed, absmax, code = ctx.saved_tensors
        out_features, in_features, blocksize = ctx.dims
        need = needs(ctx, NF4_INPUTS)
        dy2d = dy if dy.dim() == 2 else dy.reshape(-1, out_features)
        grads = {}
        if need["x"]:
            dx = _input_grad(dy2d, packed, absmax, code, out_features, in_features, blocksize)
            grads["x"] = dx if ctx.x_shape is None else dx.view(ctx.x_shape)
        if need["bias"] and ctx.has_bias:
            grads["bias"] = dy2d.sum(0)
        return gradients(NF4_INPUTS, **grads)


def nf4_linear(x: Tensor, w_nf4: NF4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """``x · dequant(w_nf4)ᵀ (+ bias)`` with the NF4 weight kept packed.

    Shapes: ``x [..., K]``, ``w_nf4`` an ``NF4Weight`` of shape ``[N, K]`` with
    ``K % blocksize == 0``, ``bias [N]`` of x's dtype. x is fp32, fp16 or bf16
    (fp64 too on the CPU path); the weight is dequantized to x's dtype (bit-equal
    to bitsandbytes) and products accumulate in fp32. Returns ``[..., N]``.
    Gradients flow to x and bias; the NF4 weight is frozen.

    Under ``torch.autocast`` x and bias are cast like torch's ``linear`` casts
    its inputs (``fastpeft.ops._autocast``); the weight is dequantized to that dtype.
    """
    autocast = any_autocast_enabled()
    if autocast:
        x, bias = autocast_inputs(x, bias)
    if not _arguments_ok(x, w_nf4, bias):
        _validate(x, w_nf4, bias)
    n, k = w_nf4.shape
    if not autocast:
        return _run(x, w_nf4.packed, w_nf4.absmax_float(), w_nf4.code, n, k, w_nf4.blocksize, bias)
    with autocast_off(x.device.type):
        return _run(x, w_nf4.packed, w_nf4.absmax_float(), w_nf4.code, n, k, w_nf4.blocksize, bias)


def _run(x, packed, absmax, code, n, k, blocksize, bias) -> Tensor:
    """``NF4LinearFunction.apply``, or its forward alone when no gradient can be asked for
    (see ``fastpeft.ops.lora._run``)."""
    if (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))) \
            or forward_ad_active():
        return NF4LinearFunction.apply(x, packed, absmax, code, n, k, blocksize, bias)
    if x.dim() == 2:
        return _forward(x, packed, absmax, code, n, k, blocksize, bias)
    return _forward(x.reshape(-1, k), packed, absmax, code, n, k, blocksize, bias).view(*x.shape[:-1], n)


def _arguments_ok(x, w_nf4, bias) -> bool:
    """True when ``_validate`` would pass (the cheap form run on every call)."""
    try:
        n, k = w_nf4.shape
        dtype, device = x.dtype, x.device
        return (nf4_weight_ok(w_nf4) and isinstance(x, Tensor) and dtype in FLOAT_DTYPES and x.shape[-1] == k
                and w_nf4.packed.device == device
                and (bias is None or (isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == n
                                      and bias.device == device and bias.dtype is dtype)))
    except (AttributeError, TypeError, ValueError, IndexError):
        return False


def _validate(x, w_nf4, bias) -> None:
    validate_nf4_weight("w_nf4", w_nf4)
    n, k = w_nf4.shape
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., in_features]")
    check_dim("x", x.shape[-1], k, "last dimension (in_features)")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_dim("bias", bias.shape[0], n, "length (out_features)")
    check_same_device("x", x, w_nf4=w_nf4.packed, bias=bias)
    check_same_dtype("x", x, bias=bias)


def nf4_weight_ok(w) -> bool:
    """True when ``validate_nf4_weight`` would pass (the cheap form run on every call)."""
    if not isinstance(w, NF4Weight):
        return False
    try:
        n, k = w.shape
        packed, absmax, code, blocksize = w.packed, w.absmax_float(), w.code, w.blocksize
        device = packed.device
        return (k % blocksize == 0 and isinstance(packed, Tensor)
                and packed.dtype is torch.uint8 and packed.numel() * 2 == n * k
                and absmax.dtype is torch.float32 and absmax.numel() == n * k // blocksize
                and absmax.device == device and (code is None or code.device == device))
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return False


def validate_nf4_weight(name: str, w) -> None:
    """Checks an ``NF4Weight`` for the NF4 kernels: 2-D, K divisible by blocksize, consistent state."""
    if not isinstance(w, NF4Weight):
        raise TypeError(f"{name} must be a fastpeft.quant.NF4Weight, got {type(w).__name__}")
    w.check_matmul_layout(name)
    check_same_device(f"{name}.packed", w.packed, **{f"{name}.absmax": w.absmax_float(), f"{name}.code": w.code})
