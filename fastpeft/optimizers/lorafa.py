"""LoRA-FA's optimizer (arXiv 2308.03303) with HF PEFT's update rule (``peft.optimizers.create_lorafa_optimizer``).

Every A is frozen; B's gradient is projected, ``g_B ← (1/s²) · g_B (A Aᵀ + δI)⁺``
(δ = 1e-8, ``s`` the layer's scaling), then B takes transformers' AdamW-hf step
(bias-corrected step size, ``eps`` added after the square root, decoupled weight
decay ``B ← B − lr·wd·B`` after the step). Other trainable parameters
(``modules_to_save``, a DoRA magnitude) take the same AdamW-hf step without the
projection. PEFT forms the projection under bf16 autocast when the machine
has bf16; fastpeft forms it in the parameters' dtype (PEFT's rule in fp32 is
the test oracle).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..injection.lora import lora_modules
from ..variants.lorafa import use_lorafa
from ._checks import check_rate

PROJECTION_DELTA = 1e-8  # PEFT's ridge before the pseudo-inverse of A Aᵀ


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW-hf whose LoRA B parameters step on the LoRA-FA projected gradient (module docstring).

    Each group holds ``params`` and, aligned with them, ``lora_A`` (B's frozen
    A, or None for a parameter without projection) and ``scaling``.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True):
        check_rate("lr", lr, allow_zero=True)
        check_rate("eps", eps, allow_zero=True)
        check_rate("weight_decay", weight_decay, allow_zero=True)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": correct_bias})
        for group in self.param_groups:
            n = len(group["params"])
            group.setdefault("lora_A", [None] * n)
            group.setdefault("scaling", [None] * n)
            if len(group["lora_A"]) != n or len(group["scaling"]) != n:
                raise ValueError("param group: lora_A and scaling must be aligned with params")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p, lora_A, scaling in zip(group["params"], group["lora_A"], group["scaling"]):
                if p.grad is None:
                    continue
                grad = p.grad if lora_A is None else projected_grad(p.grad, lora_A, scaling)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def projected_grad(grad_B: torch.Tensor, lora_A: torch.Tensor, scaling: float) -> torch.Tensor:
    """PEFT's LoRA-FA gradient of B: ``(1/s²) · g_B (A Aᵀ + δI)⁺``."""
    gram = lora_A @ lora_A.T
    gram.diagonal().add_(PROJECTION_DELTA)
    return ((1 / scaling**2) * (grad_B @ torch.linalg.pinv(gram))).to(grad_B.dtype)


def create_lorafa_optimizer(model: nn.Module, lr: float, *, weight_decay: float = 0.0) -> LoraFAOptimizer:
    """Freeze every LoRA A of ``model`` and return a ``LoraFAOptimizer`` over its trainable parameters.

    Plain dense LoRA layers become the ``lorafa`` variant (the op keeps
    ``h = drop(x) Aᵀ``, not x, for the backward); other variants keep their
    forward with A frozen. ValueError for a model without LoRA layers or a
    bad ``lr`` / ``weight_decay``, before anything changes.
    """
    lr = check_rate("lr", lr)
    weight_decay = check_rate("weight_decay", weight_decay, allow_zero=True)
    layers = lora_modules(model)
    if not layers:
        raise ValueError("model: LoRA-FA needs a model with LoRA layers (fastpeft.apply_lora)")
    pair_of = {}
    for _, layer in layers:
        if not use_lorafa(layer):
            layer.lora_A.weight.requires_grad_(False)
        pair_of[id(layer.lora_B.weight)] = (layer.lora_A.weight, layer.scaling)
    params = [p for p in model.parameters() if p.requires_grad]
    group = {"params": params, "lora_A": [pair_of.get(id(p), (None, None))[0] for p in params],
             "scaling": [pair_of.get(id(p), (None, None))[1] for p in params]}
    return LoraFAOptimizer([group], lr=lr, weight_decay=weight_decay)
