"""LoRA+ (arXiv 2402.12354) on fastpeft LoRA models: HF PEFT's ``create_loraplus_optimizer`` parameter groups.

PEFT's rule, by parameter name, over the trainable parameters: a parameter of
a LoRA embedding layer goes to the embedding group (``loraplus_lr_embedding``;
fastpeft has no LoRA embedding layer, so the group is empty, as PEFT's is on a
model without one); a name containing ``lora_B`` or a 1-D parameter goes to
B's group at ``lr · loraplus_lr_ratio``, with ``loraplus_weight_decay`` when
the parameter is outside a LayerNorm and not a bias, else without decay;
everything else (the A matrices) to A's group at ``lr``. The four groups are
built in PEFT's order, so the optimizer's groups match PEFT's one to one.
"""
from __future__ import annotations

import torch
from torch import nn

from ..injection.lora import lora_modules
from ._checks import check_rate


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type, lr: float, loraplus_lr_ratio: float, *,
                              loraplus_lr_embedding: float = 1e-6, loraplus_weight_decay: float = 0.0,
                              **kwargs) -> torch.optim.Optimizer:
    """``optimizer_cls`` over PEFT's LoRA+ groups of ``model``'s trainable parameters (see the module docstring).

    ``kwargs`` go to ``optimizer_cls`` (``betas``, ``eps``, ...); the groups set
    ``lr`` and ``weight_decay`` themselves. TypeError for an ``optimizer_cls``
    that is not a ``torch.optim.Optimizer`` class, ValueError for a rate that is
    not a positive finite number or a model without LoRA layers.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    lr = check_rate("lr", lr)
    loraplus_lr_ratio = check_rate("loraplus_lr_ratio", loraplus_lr_ratio)
    loraplus_lr_embedding = check_rate("loraplus_lr_embedding", loraplus_lr_embedding)
    loraplus_weight_decay = check_rate("loraplus_weight_decay", loraplus_weight_decay, allow_zero=True)
    if not lora_modules(model):
        raise ValueError("model: LoRA+ needs a model with LoRA layers (fastpeft.apply_lora)")
    groups = loraplus_parameter_groups(model)
    b_lr = lr * loraplus_lr_ratio
    kwargs["lr"] = lr
    return optimizer_cls([
        {"params": groups["A"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": groups["B"], "weight_decay": loraplus_weight_decay, "lr": b_lr},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": b_lr},
    ], **kwargs)


def loraplus_parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """PEFT's four LoRA+ groups of the trainable parameters, in ``named_parameters`` order."""
    no_decay = layernorm_parameter_names(model)
    groups = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            decays = name not in no_decay and "bias" not in name
            groups["B" if decays else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    return groups


def layernorm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters held inside an ``nn.LayerNorm`` (transformers' ``ALL_LAYERNORM_LAYERS``)."""
    return {f"{module_name}.{name}" if module_name else name
            for module_name, module in model.named_modules() if isinstance(module, nn.LayerNorm)
            for name, _ in module.named_parameters()}
