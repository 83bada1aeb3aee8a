"""LoRA linear: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` as an autograd op.

Layers (``docs/architecture.md``): ``lora_linear`` (functional API, validates) ->
``LoRALinearFunction`` (autograd) -> the ``fastpeft::lora_linear_forward`` /
``fastpeft::lora_linear_backward`` custom ops (with fake implementations, so
``torch.compile(fullgraph=True)`` traces them) -> ``fastpeft.kernels.lora``
(Triton) or ``fastpeft.cpu.lora``, picked by ``_dispatch.implementation``.

Gradients are computed only for inputs that need them: no ``dW`` for a frozen
weight, no ``dx`` when x needs none. A trainable weight or bias (full
fine-tuning) gets a correct gradient from plain torch GEMMs. LoRA is twice
differentiable, as PEFT's layer is: a ``create_graph=True`` backward records
the gradients as torch ops (``differentiable_grads``), and inside a
forward-AD level the op runs as torch ops (``composite_lora``).

Dropout follows HF PEFT: the mask is applied to x before ``A`` only, kept
elements are scaled by ``1/(1-p)``. Each call draws an int64 seed from
torch's default CPU generator (so ``torch.manual_seed`` makes runs
repeatable); backward uses the same mask: Triton regenerates it from the seed,
the CPU path keeps its forward's (``fastpeft.cpu.lora``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._backend import Backend, select_backend
from .._validation import (FLOAT_DTYPES, check_device, check_lora_adapter, check_probability, check_same_device,
                           check_same_dtype, check_scaling, check_tensor, lora_adapter_ok)
from ..cpu import lora as lora_cpu
from ._autocast import any_autocast_enabled, autocast_inputs, autocast_off, outside_autocast
from ._autograd import forward_ad_active, gradients, needs
from ._dispatch import custom_op_with_eager_path, implementation, not_computed
from ._dropout_seed import check_seed, draw_seed, seed_value


def _forward_impl(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                  scaling: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    impl = implementation("lora", x2d.device, x2d.dtype)
    return impl.lora_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_value(seed))


_forward_op, _forward = custom_op_with_eager_path("fastpeft::lora_linear_forward", _forward_impl)


@_forward_op.register_fake
def _(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    y = x2d.new_empty((x2d.shape[0], weight.shape[0]))
    h = x2d.new_empty((x2d.shape[0], lora_A.shape[0]), dtype=lora_cpu.lora_h_dtype(x2d.dtype))
    return y, h


def _backward_grads(dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
                    scaling: float, dropout_p: float, seed: Optional[Tensor],
                    need_dx: bool, need_dA: bool, need_dB: bool) -> tuple:
    """``(dx, dA, dB)``, None where not asked for (the eager path: no placeholder tensors)."""
    impl = implementation("lora", dy.device, dy.dtype)
    return impl.lora_backward(dy, x2d, weight, lora_A, lora_B, h, scaling, dropout_p, seed_value(seed),
                              need_dx, need_dA, need_dB)


def _backward_impl(dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
                   scaling: float, dropout_p: float, seed: Optional[Tensor],
                   need_dx: bool, need_dA: bool, need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = _backward_grads(dy, x2d, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_dA, need_dB)
    return not_computed(grads, dy)


_backward_op, _backward = custom_op_with_eager_path("fastpeft::lora_linear_backward", _backward_impl,
                                                    eager=_backward_grads)


@_backward_op.register_fake
def _(dy, x2d, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
    def maybe(needed, like):
        return dy.new_empty(like.shape) if needed else dy.new_empty(0)

    return maybe(need_dx, x2d), maybe(need_dA, lora_A), maybe(need_dB, lora_B)


# The forward arguments of LoRALinearFunction, named once for its backward.
LORA_INPUTS = ("x", "weight", "bias", "lora_A", "lora_B", "scaling", "dropout_p", "seed")


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for ``lora_linear``; inputs are already validated."""


    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y2d, h = _forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x2d, weight, lora_A, lora_B, h, seed)
        # x_shape None: dx needs no reshape. One attribute: each costs about a microsecond to set and to read.
        ctx.state = (scaling, dropout_p, None if x2d is x else x.shape, bias is not None)
        return y2d if x2d is x else y2d.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @outside_autocast
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B, h, seed = ctx.saved_tensors
        scaling, dropout_p, x_shape, has_bias = ctx.state
        need = needs(ctx, LORA_INPUTS)
        dy2d = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
        if torch.is_grad_enabled():  # create_graph=True: record the gradients for a second differentiation
            return gradients(LORA_INPUTS, **differentiable_grads(need, x_shape, has_bias, dy2d, x2d, weight, lora_A,
                                                                 lora_B, scaling, dropout_p, seed))
        grads = {}
        if need["x"] or need["lora_A"] or need["lora_B"]:
            grads = lora_input_grads(need, x_shape, *_backward(dy2d, x2d, weight, lora_A, lora_B, h, scaling,
                                                                 dropout_p, seed, need["x"], need["lora_A"],
                                                                 need["lora_B"]))
        if need["weight"]:
            grads["weight"] = torch.mm(dy2d.t(), x2d)
        if need["bias"] and has_bias:
            grads["bias"] = dy2d.sum(0)
        return gradients(LORA_INPUTS, **grads)


def _dropped(x2d: Tensor, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    """``dropout(x2d)`` with the keep-mask the selected implementation drew for ``seed``, as torch ops."""
    if dropout_p == 0.0:
        return x2d
    keep = implementation("lora", x2d.device, x2d.dtype).dropout_mask(x2d.shape, dropout_p, seed_value(seed),
                                                                      x2d.device)
    return x2d * (keep.to(x2d.dtype) / (1.0 - dropout_p))


def composite_lora(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   scaling: float, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    """``lora_linear``'s forward as plain torch ops (dense ``weight [N, K]``), for forward-mode AD.

    The fused op's Function has no ``jvp``; inside a forward-AD level the op
    runs this instead, so tangents flow through torch's own rules (as through
    PEFT's layer) rather than raising or being dropped.
    """
    x2d = x.reshape(-1, x.shape[-1])
    y2d = torch.nn.functional.linear(x2d, weight, bias) \
        + scaling * (_dropped(x2d, dropout_p, seed) @ lora_A.t()) @ lora_B.t()
    return y2d.view(*x.shape[:-1], weight.shape[0])


def differentiable_grads(need: dict, x_shape, has_bias: bool, dy2d: Tensor, x2d: Tensor, weight: Tensor,
                         lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
                         seed: Optional[Tensor]) -> dict:
    """The asked-for gradients as torch ops on the saved inputs, for a ``create_graph=True`` backward.

    LoRA is twice differentiable (PEFT's layer is): Hessian-vector products,
    gradient penalties and ``allow_unused`` second derivatives must see the
    real dependence of the gradients on x, W, A and B, which the fused
    backward (run under no_grad) would hide. ``weight`` is the dense base
    ``[N, K]`` (QLoRA passes its dequantized weight; its ``need`` has no
    ``"weight"``). A plain backward never comes here.
    """
    xd = _dropped(x2d, dropout_p, seed)
    dh = dy2d @ lora_B
    grads = {}
    if need["x"]:
        dxd = _dropped(dh @ lora_A, dropout_p, seed) if dropout_p else dh @ lora_A
        dx = dy2d @ weight + scaling * dxd
        grads["x"] = dx if x_shape is None else dx.view(x_shape)
    if need["lora_A"]:
        grads["lora_A"] = scaling * (dh.t() @ xd)
    if need["lora_B"]:
        grads["lora_B"] = scaling * (dy2d.t() @ (xd @ lora_A.t()))
    if need.get("weight"):
        grads["weight"] = dy2d.t() @ x2d
    if need["bias"] and has_bias:
        grads["bias"] = dy2d.sum(0)
    return grads


def lora_input_grads(need: dict, x_shape, dx, dA, dB) -> dict:
    """The asked-for gradients of x (back in x's shape), lora_A and lora_B, by input name (LoRA and QLoRA)."""
    grads = {}
    if need["x"]:
        grads["x"] = dx if x_shape is None else dx.view(x_shape)
    if need["lora_A"]:
        grads["lora_A"] = dA
    if need["lora_B"]:
        grads["lora_B"] = dB
    return grads


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                bias: Optional[Tensor] = None, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """Fused LoRA linear ``x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Shapes: ``x [..., K]``, ``weight [N, K]``, ``lora_A [r, K]``, ``lora_B [N, r]``,
    ``bias [N]``; all on one device and of one floating dtype (fp32, fp16, bf16;
    fp64 on the CPU path). Dropout is applied only when ``training`` is true.
    Returns ``[..., N]`` in x's dtype.

    Under ``torch.autocast`` the op casts like torch's ``linear``: x, weight,
    bias and the LoRA pair run in the autocast dtype (gradients flow back to
    each input in its own dtype); see ``fastpeft.ops._autocast`` for why the
    cast is explicit at this entry.
    """
    autocast = any_autocast_enabled()
    if autocast:
        x, weight, lora_A, lora_B, bias = autocast_inputs(x, weight, lora_A, lora_B, bias)
    if not _arguments_ok(x, weight, lora_A, lora_B, bias):
        _validate(x, weight, lora_A, lora_B, bias)
    scaling = check_scaling("scaling", scaling)
    dropout_p = check_probability("dropout_p", dropout_p)
    if not training:
        dropout_p = 0.0
    seed = draw_seed(dropout_p)
    if not autocast:
        return _run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    with autocast_off(x.device.type):
        return _run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> Tensor:
    """``LoRALinearFunction.apply``, or its forward alone when no gradient can be asked for.

    Without an autograd graph to record (grad mode off, or no input needing a
    gradient) the Function's bookkeeping (its node, ``ctx``, saved tensors)
    would be thrown away: the forward runs directly, with the same result.
    Inside a forward-AD level the op runs as torch ops (``composite_lora``), so
    tangents flow rather than being lost in a kernel.
    """
    if forward_ad_active():
        return composite_lora(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_A.requires_grad or
                                    lora_B.requires_grad or (bias is not None and bias.requires_grad)):
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    if x.dim() == 2:
        return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]
    y2d = _forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]
    return y2d.view(*x.shape[:-1], weight.shape[0])


def _arguments_ok(x, weight, lora_A, lora_B, bias) -> bool:
    """True when ``_validate`` would pass (the cheap form run on every call)."""
    try:
        n, k = weight.shape
        return (isinstance(weight, Tensor) and weight.dtype is x.dtype and weight.device == x.device
                and lora_adapter_ok(x, lora_A, lora_B, bias, n, k))
    except (AttributeError, TypeError, ValueError):
        return False


def _validate(x, weight, lora_A, lora_B, bias) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., in_features]")
    check_tensor("weight", weight, ndim=2)
    check_same_device("x", x, weight=weight)
    check_same_dtype("x", x, weight=weight)
    check_lora_adapter(x, lora_A, lora_B, bias, *weight.shape)


def lora_dropout_mask(shape, dropout_p: float, seed: int, device) -> Tensor:
    """The boolean keep-mask the selected backend applies for ``seed`` (for tests and debugging)."""
    dropout_p = check_probability("dropout_p", dropout_p)
    seed = check_seed("seed", seed)
    device = check_device("device", device)
    if select_backend(device) is Backend.TRITON:
        from ..kernels import lora as triton_lora

        return triton_lora.dropout_mask(shape, dropout_p, seed, device)
    return lora_cpu.dropout_mask(shape, dropout_p, seed, device)
