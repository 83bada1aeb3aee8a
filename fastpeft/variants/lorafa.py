"""LoRA-FA (arXiv 2308.03303) as a LoRA variant: A frozen, only B trained, and the layer keeps h, not x.

With A frozen the backward of ``y = x Wᵀ + b + s·h Bᵀ``, ``h = drop(x) Aᵀ``
needs only ``dB = s·dyᵀ h`` and ``dx = dy W + s·drop'(dy B A)``: no x. The op
(``LoRAFALinearFunction``) runs the shared LoRA forward (``ops.lora``'s
dispatch: ``cpu.lora`` / ``kernels.lora``), saves ``h [M, r]`` (plus W, A, B,
which are parameters, and the dropout seed) instead of ``x [M, K]``, and runs
the shared LoRA backward with ``need_dA=False`` on a zero-stride stand-in that
carries only x's shape and dtype; the dropout mask is drawn again from its
seed. Per adapted layer this keeps ``(K − r)·M`` fewer elements alive than
plain LoRA (whose op saves x for dA), unless something else keeps x.

PEFT has no LoRA-FA config field: the variant saves as plain LoRA (an empty
``peft_config``), as PEFT's LoRA-FA model does. When A still requires a
gradient (before ``create_lorafa_optimizer`` froze it) the layer runs plain
LoRA's op, which computes dA. On an NF4 base the variant is plain QLoRA.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops._autograd import gradients, needs, once_differentiable
from ..ops._autocast import outside_autocast
from ..ops._dropout_seed import draw_seed
from .._validation import check_probability, check_scaling
from ..ops.lora import _arguments_ok, _backward_grads, _forward, _validate, lora_linear
from .lora import PlainLora


class LoraFA(PlainLora):
    name = "lorafa"
    peft_config: dict = {}

    def forward_dense(self, layer, x, weight, bias, lora_A, lora_B):
        if lora_A.requires_grad or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            return super().forward_dense(layer, x, weight, bias, lora_A, lora_B)
        dropout_p = layer.lora_dropout if layer.training else 0.0
        return lorafa_linear(x, weight, lora_A, lora_B, layer.scaling, bias, dropout_p)


# The forward arguments of LoRAFALinearFunction, named once for its backward.
LORAFA_INPUTS = ("x", "weight", "bias", "lora_A", "lora_B", "scaling", "dropout_p", "seed")


class LoRAFALinearFunction(torch.autograd.Function):
    """``x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` with A frozen, saving ``h`` instead of x; inputs already checked."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        x2d = x.reshape(-1, x.shape[-1])
        y2d, h = _forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        h = h.detach()  # a plain tensor: the CPU path's kept dropout mask ([M, K]) is not carried along
        ctx.save_for_backward(weight, lora_A, lora_B, h, seed)
        ctx.state = (scaling, dropout_p, x.shape, x.dtype, bias is not None)
        return y2d.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    @outside_autocast
    def backward(ctx, dy):
        weight, lora_A, lora_B, h, seed = ctx.saved_tensors
        scaling, dropout_p, x_shape, x_dtype, has_bias = ctx.state
        need = needs(ctx, LORAFA_INPUTS)
        if need["lora_A"] or need["weight"]:
            raise RuntimeError("LoRA-FA keeps no input: lora_A and the base weight must be frozen")
        dy2d = dy.reshape(-1, dy.shape[-1])
        x_stand_in = dy2d.new_empty((), dtype=x_dtype).expand(dy2d.shape[0], x_shape[-1])
        dx, _, dB = _backward_grads(dy2d, x_stand_in, weight, lora_A, lora_B, h, scaling, dropout_p, seed,
                                    need["x"], False, need["lora_B"])
        grads = {"lora_B": dB} if need["lora_B"] else {}
        if need["x"]:
            grads["x"] = dx.view(x_shape)
        if need["bias"] and has_bias:
            grads["bias"] = dy2d.sum(0)
        return gradients(LORAFA_INPUTS, **grads)


def lorafa_linear(x, weight, lora_A, lora_B, scaling: float, bias=None, dropout_p: float = 0.0):
    """LoRA's fused linear for a frozen ``lora_A`` (and frozen weight): the backward keeps ``h``, not x.

    Same arguments and result as ``ops.lora.lora_linear`` (``dropout_p`` is
    applied as given: pass 0 outside training); ValueError when lora_A or the
    weight requires a gradient (this op cannot compute theirs).
    """
    if lora_A.requires_grad or weight.requires_grad:
        raise ValueError("lora_A and weight must be frozen for LoRA-FA (requires_grad=False); "
                         "use fastpeft.ops.lora_linear to train them")
    if not _arguments_ok(x, weight, lora_A, lora_B, bias):
        _validate(x, weight, lora_A, lora_B, bias)
    scaling = check_scaling("scaling", scaling)
    dropout_p = check_probability("dropout_p", dropout_p)
    if not (torch.is_grad_enabled() and (x.requires_grad or lora_B.requires_grad
                                         or (bias is not None and bias.requires_grad))):
        return lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training=True)
    return LoRAFALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, draw_seed(dropout_p))

def use_lorafa(layer: nn.Module) -> bool:
    """Make a plain dense LoRA layer a LoRA-FA one (its A frozen); False, unchanged, for any other variant."""
    if layer.variant.name not in ("lora", LoraFA.name) or not layer.variant.supports(layer.base_kind):
        return False
    layer.lora_A.weight.requires_grad_(False)
    if layer.base_kind == "dense":
        layer.variant = VARIANT
    return True


VARIANT = LoraFA()
