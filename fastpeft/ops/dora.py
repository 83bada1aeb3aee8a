"""DoRA linear (HF PEFT's ``use_dora=True``) as an autograd op, with the weight norm in factored form.

``y = x Wᵀ + b + (c − 1) ⊙ (x' Wᵀ) + c ⊙ s·(x' Aᵀ) Bᵀ``, ``c = m / ‖W + s·BA‖``
per output row, the norm detached (DoRA paper §4.3, as PEFT), ``x' = drop(x)``
in training with dropout (PEFT recomputes the base part on the dropped x)
and ``x' = x`` otherwise, where it is ``c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b``.

Layers (``docs/architecture.md``): ``dora_linear`` (validates, computes the
norm) -> ``DoRALinearFunction`` -> the ``fastpeft::dora_linear_forward`` /
``_backward`` custom ops -> ``fastpeft.kernels.dora`` or ``fastpeft.cpu.dora``.

The norm never forms ``B·A`` (PEFT builds it through a ``[K, K]`` identity
every call): ``‖W_i + s·B_i A‖² = ‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ``,
one ``[r, K] × [K, N]`` product plus rank-sized work, accumulated in fp32
(fp64 for fp64 input). ``‖W_i‖²`` can be passed in (``weight_norm_sq``):
the layers cache it while their frozen weight is unchanged, and the whole
norm (``weight_norm``) while W, A and B are all unchanged (inference, where
``A Wᵀ`` would otherwise cost r times a one-token forward)
(``fastpeft.variants.dora``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import check_dim, check_probability, check_same_device, check_same_dtype, check_scaling, check_tensor
from ..cpu import lora as lora_cpu
from ._autocast import any_autocast_enabled, autocast_inputs, autocast_off, outside_autocast
from ._autograd import forward_ad_active, gradients, needs, once_differentiable
from ._dispatch import custom_op_with_eager_path, implementation, not_computed
from ._dropout_seed import draw_seed, seed_value
from .lora import lora_input_grads
from .lora import _arguments_ok as _lora_arguments_ok
from .lora import _validate as _validate_lora
from .lora import lora_dropout_mask


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype DoRA's norms and column scale are accumulated in: fp32, or fp64 for fp64 input."""
    return torch.promote_types(dtype, torch.float32)


def weight_row_norm_sq(weight_out_in: Tensor) -> Tensor:
    """``‖W_i‖²`` per output row of ``W [N, K]``, in ``norm_dtype`` (what a layer caches while W is frozen)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight_out_in, dim=1, dtype=norm_dtype(weight_out_in.dtype)).square_()


def factored_weight_norm(weight_norm_sq: Tensor, a_w: Tensor, lora_A: Tensor, lora_B: Tensor,
                         scaling: float) -> Tensor:
    """``‖W_i + s·B_i A‖`` for every row i from ``‖W_i‖²`` and ``a_w = A Wᵀ [r, N]``; no dense ``B·A``.

    Any frozen base gives ``a_w`` from its own forward on the rows of A (QDoRA: the NF4 kernels).
    """
    acc = weight_norm_sq.dtype
    a, b = lora_A.detach().to(acc), lora_B.detach().to(acc)
    cross = torch.einsum("nr,rn->n", b, a_w.to(acc))
    quad = torch.einsum("nr,nr->n", b @ (a @ a.t()), b)
    return (weight_norm_sq + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min_(0).sqrt_()


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     weight_norm_sq: Optional[Tensor] = None) -> Tensor:
    """``‖W + s·BA‖`` per output row of a dense ``W [N, K]`` (detached), in ``norm_dtype``."""
    with torch.no_grad():
        if weight_norm_sq is None:
            weight_norm_sq = weight_row_norm_sq(weight)
        a_w = torch.nn.functional.linear(lora_A.detach(), weight.detach())
        return factored_weight_norm(weight_norm_sq.to(norm_dtype(weight.dtype)), a_w, lora_A, lora_B, scaling)


# --------------------------------------------------------------------------- custom ops
def _forward_impl(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                  scale: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                  keep_z: bool) -> tuple[Tensor, Tensor, Tensor]:
    impl = implementation("dora", x2d.device, x2d.dtype)
    y, h, z = impl.dora_forward(x2d, weight, bias, lora_A, lora_B, scale, scaling, dropout_p, seed_value(seed),
                                keep_z)
    return y, h, (z if z is not None else x2d.new_empty(0))


_forward_op, _forward = custom_op_with_eager_path("fastpeft::dora_linear_forward", _forward_impl)


@_forward_op.register_fake
def _(x2d, weight, bias, lora_A, lora_B, scale, scaling, dropout_p, seed, keep_z):
    y = x2d.new_empty((x2d.shape[0], weight.shape[0]))
    h = x2d.new_empty((x2d.shape[0], lora_A.shape[0]), dtype=lora_cpu.lora_h_dtype(x2d.dtype))
    return y, h, (x2d.new_empty(y.shape) if keep_z else x2d.new_empty(0))


def _backward_grads(dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor, z: Tensor,
                    scale: Tensor, norm: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                    need_dx: bool, need_dA: bool, need_dB: bool, need_dm: bool) -> tuple:
    impl = implementation("dora", dy.device, dy.dtype)
    return impl.dora_backward(dy, x2d, weight, lora_A, lora_B, h, z, scale, norm, scaling, dropout_p,
                              seed_value(seed), need_dx, need_dA, need_dB, need_dm)


def _backward_impl(dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor, z: Tensor,
                   scale: Tensor, norm: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                   need_dx: bool, need_dA: bool, need_dB: bool,
                   need_dm: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return not_computed(_backward_grads(dy, x2d, weight, lora_A, lora_B, h, z, scale, norm, scaling, dropout_p,
                                        seed, need_dx, need_dA, need_dB, need_dm), dy)


_backward_op, _backward = custom_op_with_eager_path("fastpeft::dora_linear_backward", _backward_impl,
                                                    eager=_backward_grads)


@_backward_op.register_fake
def _(dy, x2d, weight, lora_A, lora_B, h, z, scale, norm, scaling, dropout_p, seed, need_dx, need_dA, need_dB,
      need_dm):
    def maybe(needed, shape, dtype=None):
        return dy.new_empty(shape, dtype=dtype) if needed else dy.new_empty(0)

    return (maybe(need_dx, x2d.shape), maybe(need_dA, lora_A.shape), maybe(need_dB, lora_B.shape),
            maybe(need_dm, norm.shape, norm.dtype))


# --------------------------------------------------------------------------- autograd
# The forward arguments of DoRALinearFunction, named once for its backward.
DORA_INPUTS = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude", "norm", "scaling", "dropout_p", "seed")


class DoRALinearFunction(torch.autograd.Function):
    """Autograd for ``dora_linear``; inputs are validated and ``norm`` (detached) computed already."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed):
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        scale = magnitude.detach().to(norm.dtype) / norm
        keep_z = ctx.needs_input_grad[5]
        y2d, h, z = _forward(x2d, weight, bias, lora_A, lora_B, scale, scaling, dropout_p, seed, keep_z)
        ctx.save_for_backward(x2d, weight, lora_A, lora_B, h, z, scale, norm, seed)
        ctx.state = (scaling, dropout_p, None if x2d is x else x.shape, bias is not None, magnitude.dtype)
        return y2d if x2d is x else y2d.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    @outside_autocast
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B, h, z, scale, norm, seed = ctx.saved_tensors
        scaling, dropout_p, x_shape, has_bias, magnitude_dtype = ctx.state
        need = needs(ctx, DORA_INPUTS)
        dy2d = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
        grads = {}
        if need["x"] or need["lora_A"] or need["lora_B"] or need["magnitude"]:
            dx, dA, dB, dm = _backward(dy2d, x2d, weight, lora_A, lora_B, h, z, scale, norm, scaling, dropout_p,
                                       seed, need["x"], need["lora_A"], need["lora_B"], need["magnitude"])
            grads = lora_input_grads(need, x_shape, dx, dA, dB)
            if need["magnitude"]:
                grads["magnitude"] = dm.to(magnitude_dtype)
        if need["weight"]:
            grads["weight"] = _weight_grad(dy2d, x2d, scale, dropout_p, seed)
        if need["bias"] and has_bias:
            grads["bias"] = dy2d.sum(0)
        return gradients(DORA_INPUTS, **grads)


def _weight_grad(dy2d, x2d, scale, dropout_p, seed):
    """dW of a trainable base weight (full fine-tuning beside DoRA): ``(c ⊙ dy)ᵀ x' + dyᵀ (x − x')``."""
    g = dy2d * scale.to(dy2d.dtype)
    if dropout_p == 0.0:
        return torch.mm(g.t(), x2d)
    keep = lora_dropout_mask(x2d.shape, dropout_p, seed_value(seed), x2d.device)
    x_dropped = x2d * keep * (1.0 / (1.0 - dropout_p))
    return torch.mm(g.t(), x_dropped).addmm_(dy2d.t(), x2d - x_dropped)


def dora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
                bias: Optional[Tensor] = None, dropout_p: float = 0.0, training: bool = False,
                weight_norm_sq: Optional[Tensor] = None, weight_norm: Optional[Tensor] = None) -> Tensor:
    """Fused DoRA linear (PEFT's semantics, see the module docstring).

    Shapes: ``x [..., K]``, ``weight [N, K]``, ``lora_A [r, K]``, ``lora_B [N, r]``,
    ``magnitude [N]``, ``bias [N]``; one device and one floating dtype (fp32,
    fp16, bf16; fp64 on the CPU path). ``weight_norm_sq [N]``: ``‖W_i‖²``
    (``weight_row_norm_sq(weight)``) when the caller caches it, else computed.
    ``weight_norm [N]``: the detached ``‖W + s·BA‖`` itself when the caller has it
    (``dora_weight_norm``; then ``weight_norm_sq`` is not used). Both are in
    ``norm_dtype(x.dtype)``. Dropout only when ``training``. Gradients flow to x, lora_A, lora_B,
    magnitude (and weight/bias when they require grad); never through the norm.
    """
    autocast = any_autocast_enabled()
    if autocast:
        x, weight, lora_A, lora_B, magnitude, bias = autocast_inputs(x, weight, lora_A, lora_B, magnitude, bias)
    norms = (weight_norm_sq, weight_norm)
    if not _arguments_ok(x, weight, lora_A, lora_B, magnitude, bias, norms):
        _validate(x, weight, lora_A, lora_B, magnitude, bias, norms)
    scaling = check_scaling("scaling", scaling)
    dropout_p = check_probability("dropout_p", dropout_p)
    if not training:
        dropout_p = 0.0
    seed = draw_seed(dropout_p)
    if not autocast:
        return _run(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, norms)
    with autocast_off(x.device.type):
        return _run(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, norms)


def _run(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, norms) -> Tensor:
    """``DoRALinearFunction.apply``, or its forward alone when no gradient can be asked for."""
    weight_norm_sq, norm = norms
    if norm is None:
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_norm_sq)
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                        for t in (x, weight, lora_A, lora_B, magnitude, bias))) \
            or forward_ad_active():
        return DoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed)
    scale = magnitude.to(norm.dtype) / norm
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y2d = _forward(x2d, weight, bias, lora_A, lora_B, scale, scaling, dropout_p, seed, False)[0]
    return y2d if x2d is x else y2d.view(*x.shape[:-1], weight.shape[0])


def _arguments_ok(x, weight, lora_A, lora_B, magnitude, bias, norms) -> bool:
    """True when ``_validate`` would pass (the cheap form run on every call)."""
    if not _lora_arguments_ok(x, weight, lora_A, lora_B, bias):
        return False
    n = weight.shape[0]
    return (_vector_ok(magnitude, n, x, x.dtype)
            and all(t is None or _vector_ok(t, n, x, norm_dtype(x.dtype)) for t in norms))


def _vector_ok(t, n: int, x: Tensor, dtype: torch.dtype) -> bool:
    return isinstance(t, Tensor) and t.shape == (n,) and t.dtype is dtype and t.device == x.device


def _validate(x, weight, lora_A, lora_B, magnitude, bias, norms) -> None:
    _validate_lora(x, weight, lora_A, lora_B, bias)
    check_magnitude(x, magnitude, weight.shape[0])
    for name, t in zip(("weight_norm_sq", "weight_norm"), norms):
        if t is None:
            continue
        check_tensor(name, t, ndim=1)
        check_same_device("x", x, **{name: t})
        check_dim(name, t.shape[0], weight.shape[0], "length (out_features)")
        if t.dtype is not norm_dtype(x.dtype):
            raise TypeError(f"{name} must be {norm_dtype(x.dtype)} for {x.dtype} input, got {t.dtype}")


def check_magnitude(x: Tensor, magnitude, out_features: int) -> None:
    """DoRA's magnitude vector: ``[out_features]``, on x's device, in x's dtype (every DoRA-carrying op)."""
    check_tensor("magnitude", magnitude, ndim=1)
    check_same_device("x", x, magnitude=magnitude)
    check_same_dtype("x", x, magnitude=magnitude)
    check_dim("magnitude", magnitude.shape[0], out_features, "length (out_features)")
