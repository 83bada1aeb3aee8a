"""Bottleneck adapter on the CPU path: torch ops arranged for the fewest passes.

Same contract as the Triton launchers in ``fastpeft.kernels.adapter``
(``adapter_forward`` / ``adapter_backward`` / ``dropout_mask``), so
``fastpeft.ops.adapter`` can pick either. Also runs on CUDA tensors when
``FASTPEFT_BACKEND=cpu`` forces it.

Forward: ``pre = addmm(b_d, x, W_dᵀ)``, the activation in place on it, then
the up-projection lands in one ``addmm`` whose input is the residual (with
``alpha = s``) when the scale is a float and there is no dropout; otherwise
``u = addmm(b_u, z, W_uᵀ)`` is scaled, masked and gets the residual added in
place. Without dropout there is no temporary of size ``M x H`` besides the
output (with dropout, the keep-mask is one).

Backward: ``g = keep ∘ dy / (1-p)``, ``ds = s ∘ g``; ``dW_u = dsᵀ z``,
``db_u = Σ ds``, ``dz = ds W_u``, ``da = dz ∘ act'(pre)``, ``dx = da W_d``,
``dW_d = daᵀ x``, ``db_d = Σ da``; ``dscale = Σ g ∘ u`` recomputes
``u = z W_uᵀ + b_u``. ``pre`` is the one the forward saved (fp32, fp64 for
fp64 inputs); ``z = act(pre)`` is recomputed from it. Only the asked-for
gradients are computed.

Dropout mask: never stored; regenerated from the integer seed with a
``torch.Generator`` on the tensors' device (``dropout_mask``, shared with the
LoRA CPU path).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..activations import activation
from .lora import dropout_mask

__all__ = ["adapter_pre_dtype", "adapter_forward", "adapter_backward", "dropout_mask"]


def adapter_pre_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved pre-activation ``x W_dᵀ + b_d``: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def _keep_scaled(shape, dropout_p: float, seed: int, device, dtype) -> Tensor:
    return dropout_mask(shape, dropout_p, seed, device).to(dtype).mul_(1.0 / (1.0 - dropout_p))


def adapter_forward(x2d: Tensor, down_weight: Tensor, up_weight: Tensor, down_bias: Optional[Tensor],
                    up_bias: Optional[Tensor], residual2d: Optional[Tensor], scaling: float, scale: Optional[Tensor],
                    act: str, dropout_p: float, seed: int, store_pre: bool):
    """Returns ``(y [M, H] in x's dtype, pre [M, b] in adapter_pre_dtype or None unless store_pre)``.

    ``scale`` (``[]`` or ``[H]``, x's dtype) replaces the float ``scaling`` when given.
    """
    fn = activation(act)
    pre = torch.mm(x2d, down_weight.t()) if down_bias is None else torch.addmm(down_bias, x2d, down_weight.t())
    saved = pre.to(adapter_pre_dtype(x2d.dtype), copy=True) if store_pre else None
    z = fn.forward_(pre)
    if scale is None and dropout_p == 0.0:
        if residual2d is not None:
            y = torch.addmm(residual2d, z, up_weight.t(), alpha=scaling)
        else:
            y = torch.mm(z, up_weight.t())
            if scaling != 1.0:
                y.mul_(scaling)
        if up_bias is not None:
            y.add_(up_bias, alpha=scaling)
        return y, saved
    y = torch.mm(z, up_weight.t()) if up_bias is None else torch.addmm(up_bias, z, up_weight.t())
    y.mul_(scale if scale is not None else scaling)
    if dropout_p > 0.0:
        y.mul_(_keep_scaled(y.shape, dropout_p, seed, y.device, y.dtype))
    if residual2d is not None:
        y.add_(residual2d)
    return y, saved


def adapter_backward(dy: Tensor, x2d: Tensor, down_weight: Tensor, up_weight: Tensor, up_bias: Optional[Tensor],
                     pre: Tensor, scaling: float, scale: Optional[Tensor], act: str, dropout_p: float, seed: int,
                     need_dx: bool, need_down_weight: bool, need_up_weight: bool, need_down_bias: bool,
                     need_up_bias: bool, need_scale: bool):
    """Returns ``(dx, d_down_weight, d_up_weight, d_down_bias, d_up_bias, d_scale)``; ``None`` where not asked.

    ``d_scale`` has the shape and dtype of ``scale`` (asked for only when ``scale`` is given).
    """
    fn = activation(act)
    dtype = dy.dtype
    g = dy if dropout_p == 0.0 else dy * _keep_scaled(dy.shape, dropout_p, seed, dy.device, dtype)
    if scale is not None:
        ds = g * scale
    else:
        ds = g * scaling if scaling != 1.0 else g
    need_z = need_up_weight or need_scale
    z = fn.forward_(pre.to(dtype, copy=True)) if need_z else None
    dx = d_down_weight = d_up_weight = d_down_bias = d_up_bias = d_scale = None
    if need_up_weight:
        d_up_weight = torch.mm(ds.t(), z)
    if need_up_bias:
        d_up_bias = ds.sum(0)
    if need_scale:
        u = torch.mm(z, up_weight.t()) if up_bias is None else torch.addmm(up_bias, z, up_weight.t())
        terms = u.mul_(g)
        # A scalar scale sums every term in one reduction (torch's cascade order, as autograd's sum_to_size):
        # summing the per-channel sums instead lost up to ~30x more to rounding when the terms cancel.
        d_scale = terms.sum(0) if scale.dim() == 1 else terms.sum()
    if need_dx or need_down_weight or need_down_bias:
        dz = torch.mm(ds, up_weight)
        act_grad = fn.derivative(pre)
        # Where the derivative is 0 the gradient is exactly 0, as torch's relu backward selects (not 0 · inf).
        da = dz.to(pre.dtype).mul_(act_grad).masked_fill_(act_grad == 0, 0.0).to(dtype)
        if need_dx:
            dx = torch.mm(da, down_weight)
        if need_down_weight:
            d_down_weight = torch.mm(da.t(), x2d)
        if need_down_bias:
            d_down_bias = da.sum(0)
    return dx, d_down_weight, d_up_weight, d_down_bias, d_up_bias, d_scale
