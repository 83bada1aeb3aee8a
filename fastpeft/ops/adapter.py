"""Bottleneck adapter ``y = residual + dropout(s · (act(x W_dᵀ + b_d) W_uᵀ + b_u))`` as an autograd op.

Layers (``docs/architecture.md``): ``bottleneck_adapter`` (functional API,
validates) -> ``BottleneckAdapterFunction`` (autograd) -> the
``fastpeft::bottleneck_adapter_forward`` / ``..._backward`` custom ops (fake
implementations, so ``torch.compile(fullgraph=True)`` traces them; eager
calls skip the dispatcher) -> ``fastpeft.kernels.adapter`` (Triton) or
``fastpeft.cpu.adapter``, by the backend rule.

The math is AdapterHub's ``Adapter.forward`` without its LayerNorms and gate
(``fastpeft.nn.BottleneckAdapter`` composes those around this op): dropout
acts on the scaled adapter output, before the residual. ``scaling`` is a
float, or a tensor of shape ``[]``/``[1]`` ("learned") or ``[H]``
("channel") that may require grad.

Backward saves the pre-activation ``pre = x W_dᵀ + b_d`` (``[M, b]``, fp32;
fp64 for fp64 inputs) instead of recomputing it: it costs ``4·b`` bytes per
row, a small fraction of re-reading x, and it is stored only when some input
needs a gradient. ``z = act(pre)`` is recomputed from it. Gradients are
computed only for the inputs that need them, deterministically (fixed-order
reductions, no atomics); ``residual`` gets ``dy`` itself.

Dropout: the mask is never stored; each training call draws a seed from
torch's default CPU generator (``torch.manual_seed`` makes runs repeatable)
and backward regenerates the mask from it (``adapter_dropout_mask`` shows it).
"""
from __future__ import annotations

from numbers import Real
from typing import Optional, Union

import torch
from torch import Tensor

from .._backend import Backend, select_backend
from .._validation import (FLOAT_DTYPES, check_device, check_dim, check_probability, check_same_device,
                           check_same_dtype, check_scaling, check_tensor)
from ..cpu import adapter as adapter_cpu
from ._autocast import any_autocast_enabled, autocast_inputs, autocast_off, outside_autocast
from ._autograd import forward_ad_active, gradients, needs, once_differentiable
from ._dispatch import custom_op_with_eager_path, implementation, not_computed
from ._dropout_seed import check_seed, draw_seed, seed_value
from ..activations import activation as lookup_activation

_SIX_TENSORS = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # custom ops need a fixed arity

__all__ = ["bottleneck_adapter", "adapter_dropout_mask", "BottleneckAdapterFunction"]


def _forward_impl(x2d: Tensor, down_weight: Tensor, up_weight: Tensor, down_bias: Optional[Tensor],
                  up_bias: Optional[Tensor], residual2d: Optional[Tensor], scaling: float, scale: Optional[Tensor],
                  act: str, dropout_p: float, seed: Optional[Tensor], store_pre: bool) -> tuple[Tensor, Tensor]:
    impl = implementation("adapter", x2d.device, x2d.dtype)
    y, pre = impl.adapter_forward(x2d, down_weight, up_weight, down_bias, up_bias, residual2d, scaling, scale, act,
                                  dropout_p, seed_value(seed), store_pre)
    if pre is None:
        pre = x2d.new_empty(0, dtype=adapter_cpu.adapter_pre_dtype(x2d.dtype))
    return y, pre


_forward_op, _forward = custom_op_with_eager_path("fastpeft::bottleneck_adapter_forward", _forward_impl)


@_forward_op.register_fake
def _(x2d, down_weight, up_weight, down_bias, up_bias, residual2d, scaling, scale, act, dropout_p, seed, store_pre):
    y = x2d.new_empty((x2d.shape[0], up_weight.shape[0]))
    pre_shape = (x2d.shape[0], down_weight.shape[0]) if store_pre else (0,)
    return y, x2d.new_empty(pre_shape, dtype=adapter_cpu.adapter_pre_dtype(x2d.dtype))


def _backward_impl(dy: Tensor, x2d: Tensor, down_weight: Tensor, up_weight: Tensor, up_bias: Optional[Tensor],
                   pre: Tensor, scaling: float, scale: Optional[Tensor], act: str, dropout_p: float,
                   seed: Optional[Tensor], need_dx: bool, need_down_weight: bool, need_up_weight: bool,
                   need_down_bias: bool, need_up_bias: bool, need_scale: bool) -> _SIX_TENSORS:
    impl = implementation("adapter", dy.device, dy.dtype)
    grads = impl.adapter_backward(dy, x2d, down_weight, up_weight, up_bias, pre, scaling, scale, act, dropout_p,
                                  seed_value(seed), need_dx, need_down_weight, need_up_weight, need_down_bias,
                                  need_up_bias, need_scale)
    return not_computed(grads, dy)


_backward_op, _backward = custom_op_with_eager_path("fastpeft::bottleneck_adapter_backward", _backward_impl)


@_backward_op.register_fake
def _(dy, x2d, down_weight, up_weight, up_bias, pre, scaling, scale, act, dropout_p, seed, need_dx, need_down_weight,
      need_up_weight, need_down_bias, need_up_bias, need_scale):
    def maybe(needed, like):
        return dy.new_empty(like.shape, dtype=like.dtype) if needed else dy.new_empty(0)

    b, h = down_weight.shape
    return (maybe(need_dx, x2d), maybe(need_down_weight, down_weight), maybe(need_up_weight, up_weight),
            dy.new_empty((b,)) if need_down_bias else dy.new_empty(0),
            dy.new_empty((h,)) if need_up_bias else dy.new_empty(0),
            maybe(need_scale and scale is not None, scale if scale is not None else dy))


# Module constants, not class attributes: torch.compile cannot read a Function's class attributes in backward.
_INPUTS = ("x", "down_weight", "up_weight", "down_bias", "up_bias", "residual", "scale", "scaling", "act",
           "dropout_p", "seed", "store_pre")
_GRADIENTS = ("x", "down_weight", "up_weight", "down_bias", "up_bias", "scale")  # from the backward custom op


class BottleneckAdapterFunction(torch.autograd.Function):
    """Autograd for ``bottleneck_adapter``; inputs are already validated (``scale`` is ``[]``/``[H]`` or None)."""

    INPUTS = _INPUTS

    @staticmethod
    def forward(ctx, x, down_weight, up_weight, down_bias, up_bias, residual, scale, scaling, act, dropout_p, seed,
                store_pre):
        hidden = x.shape[-1]
        x2d = x.reshape(-1, hidden)
        residual2d = residual.reshape(-1, hidden) if residual is not None else None
        y2d, pre = _forward(x2d, down_weight, up_weight, down_bias, up_bias, residual2d, scaling, scale, act,
                            dropout_p, seed, store_pre)
        if store_pre:
            ctx.save_for_backward(x2d, down_weight, up_weight, up_bias, pre, scale, seed)
        ctx.scaling, ctx.act, ctx.dropout_p, ctx.x_shape = scaling, act, dropout_p, x.shape
        return y2d.view(x.shape)

    @staticmethod
    @once_differentiable
    @outside_autocast
    def backward(ctx, dy):
        need = needs(ctx, _INPUTS)
        names = _GRADIENTS
        flags = [need[name] for name in names]
        grads = {}
        if any(flags):
            x2d, down_weight, up_weight, up_bias, pre, scale, seed = ctx.saved_tensors
            dy2d = dy.reshape(-1, dy.shape[-1])
            computed = _backward(dy2d, x2d, down_weight, up_weight, up_bias, pre, ctx.scaling, scale, ctx.act,
                                 ctx.dropout_p, seed, *flags)
            grads = {name: g for name, g, flag in zip(names, computed, flags) if flag}
            if "x" in grads:
                grads["x"] = grads["x"].view(ctx.x_shape)
        if need["residual"]:
            grads["residual"] = dy
        return gradients(_INPUTS, **grads)


def bottleneck_adapter(x: Tensor, down_weight: Tensor, up_weight: Tensor, down_bias: Optional[Tensor] = None,
                       up_bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                       scaling: Union[float, Tensor] = 1.0, activation: str = "relu", dropout_p: float = 0.0,
                       training: bool = False) -> Tensor:
    """Fused bottleneck adapter ``residual + dropout(scaling · (act(x W_dᵀ + b_d) W_uᵀ + b_u))``.

    Shapes: ``x [..., H]``, ``down_weight [b, H]``, ``up_weight [H, b]``,
    ``down_bias [b]``, ``up_bias [H]``, ``residual`` x's shape or None (no
    residual); ``scaling`` a float or a tensor of shape ``[]``, ``[1]`` or
    ``[H]`` (it gets a gradient when it requires one). All tensors on one
    device and of one floating dtype (fp32, fp16, bf16; fp64 on the CPU path).
    ``activation``: a transformers ``ACT2FN`` name (see
    ``fastpeft.activations.ACTIVATIONS``). Dropout is applied only when
    ``training`` is true. Returns x's shape and dtype.

    Under ``torch.autocast`` the op casts like torch's ``linear``: every
    floating tensor (x, the weights and biases, the residual, a tensor
    scaling; not fp64) runs in the autocast dtype and gradients flow back to
    each in its own dtype (``fastpeft.ops._autocast``). First derivatives
    only: a double backward or a forward-mode (``jvp``) tangent raises.
    """
    autocast = any_autocast_enabled()
    if autocast:
        x, down_weight, up_weight, down_bias, up_bias, residual, scaling = autocast_inputs(
            x, down_weight, up_weight, down_bias, up_bias, residual, scaling)
    hidden = _validate(x, down_weight, up_weight, down_bias, up_bias, residual)
    lookup_activation(activation)
    scale, scaling = _scaling(scaling, x, hidden)
    dropout_p = check_probability("dropout_p", dropout_p)
    if not training:
        dropout_p = 0.0
    seed = draw_seed(dropout_p)
    if not autocast:
        return _run(x, down_weight, up_weight, down_bias, up_bias, residual, scale, scaling, activation, dropout_p,
                    seed)
    with autocast_off(x.device.type):
        return _run(x, down_weight, up_weight, down_bias, up_bias, residual, scale, scaling, activation, dropout_p,
                    seed)


def _run(x, down_weight, up_weight, down_bias, up_bias, residual, scale, scaling, activation, dropout_p, seed):
    """``BottleneckAdapterFunction.apply``, or its forward alone when no gradient can be asked for. Inside a
    forward-AD level the Function runs (it has no ``jvp``), so dual inputs raise rather than lose their
    tangents in a kernel."""
    tensors = (x, down_weight, up_weight, down_bias, up_bias, residual, scale)
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)) or forward_ad_active():
        store_pre = any(t is not None and t.requires_grad for t in tensors[:5] + (scale,))
        return BottleneckAdapterFunction.apply(*tensors, scaling, activation.lower(), dropout_p, seed, store_pre)
    # Inference: no autograd node, no saved pre-activation.
    hidden = x.shape[-1]
    y2d, _ = _forward(x.reshape(-1, hidden), down_weight, up_weight, down_bias, up_bias,
                      residual.reshape(-1, hidden) if residual is not None else None, scaling, scale,
                      activation.lower(), dropout_p, seed, False)
    return y2d.view(x.shape)


def _validate(x, down_weight, up_weight, down_bias, up_bias, residual) -> int:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., hidden_size]")
    check_tensor("down_weight", down_weight, ndim=2)
    check_tensor("up_weight", up_weight, ndim=2)
    if down_bias is not None:
        check_tensor("down_bias", down_bias, ndim=1)
    if up_bias is not None:
        check_tensor("up_bias", up_bias, ndim=1)
    if residual is not None:
        check_tensor("residual", residual)
    others = dict(down_weight=down_weight, up_weight=up_weight, down_bias=down_bias, up_bias=up_bias,
                  residual=residual)
    check_same_device("x", x, **others)
    check_same_dtype("x", x, **others)
    hidden, bottleneck = x.shape[-1], down_weight.shape[0]
    if bottleneck <= 0:
        raise ValueError(f"down_weight has bottleneck size {bottleneck}; it must be positive")
    check_dim("down_weight", down_weight.shape[1], hidden, "dim 1 (hidden size, from x)")
    check_dim("up_weight", up_weight.shape[0], hidden, "dim 0 (hidden size, from x)")
    check_dim("up_weight", up_weight.shape[1], bottleneck, "dim 1 (bottleneck size, from down_weight)")
    if down_bias is not None:
        check_dim("down_bias", down_bias.shape[0], bottleneck, "length (bottleneck size)")
    if up_bias is not None:
        check_dim("up_bias", up_bias.shape[0], hidden, "length (hidden size)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}; it must match x's {tuple(x.shape)}")
    return hidden


def _scaling(scaling, x: Tensor, hidden: int) -> tuple[Optional[Tensor], float]:
    """``(scale tensor of shape [] or [H], or None; float scaling)`` from the user's ``scaling``."""
    if isinstance(scaling, Tensor):
        check_tensor("scaling", scaling)
        check_same_device("x", x, scaling=scaling)
        check_same_dtype("x", x, scaling=scaling)
        if scaling.dim() == 0 or (scaling.dim() == 1 and scaling.shape[0] == 1):
            return scaling.reshape(()), 1.0
        if scaling.dim() == 1 and scaling.shape[0] == hidden:
            return scaling, 1.0
        raise ValueError(f"scaling has shape {tuple(scaling.shape)}; a tensor scaling must have shape [], [1] "
                         f"or [{hidden}] (hidden size)")
    if isinstance(scaling, bool) or not isinstance(scaling, Real):
        raise TypeError(f"scaling must be a float or a tensor, got {type(scaling).__name__}")
    return None, check_scaling("scaling", scaling)


def adapter_dropout_mask(shape, dropout_p: float, seed: int, device) -> Tensor:
    """The boolean keep-mask ``[M, H]`` the selected backend applies for ``seed`` (for tests and debugging)."""
    dropout_p = check_probability("dropout_p", dropout_p)
    seed = check_seed("seed", seed)
    device = check_device("device", device)
    if select_backend(device) is Backend.TRITON:
        from ..kernels import adapter as triton_adapter

        return triton_adapter.dropout_mask(shape, dropout_p, seed, device)
    return adapter_cpu.dropout_mask(shape, dropout_p, seed, device)
