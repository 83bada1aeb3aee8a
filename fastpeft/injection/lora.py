"""Put LoRA layers into an existing model, in place, and the model-level LoRA helpers.

``apply_lora`` wraps targeted linears in ``LoRALinear``. The helpers below
(``lora_parameters``, ``merge_lora``, ``unmerge_lora``) work on every layer of
the "lora" kind of the PEFT-layer protocol (``fastpeft.nn.base``): LoRA and
QLoRA layers alike.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..nn.base import peft_layers
from ..nn.lora import InitLoraWeights, LoRALinear, is_lora_target, validate_lora_hyperparameters
from .targets import TargetModules, find_target_modules, replace_modules

def apply_lora(model: nn.Module, target_modules: TargetModules, r: int = 8, lora_alpha: float = 8,
               lora_dropout: float = 0.0, use_rslora: bool = False,
               init_lora_weights: InitLoraWeights = True, lora_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Wrap every targeted ``nn.Linear``/``Conv1D`` of ``model`` in a ``LoRALinear``, in place.

    Every parameter except the new LoRA ones is frozen (PEFT's ``bias="none"``).
    ``lora_dtype`` (default: each base weight's dtype) is the LoRA parameters'
    dtype, e.g. ``torch.float32`` adapters on a bf16 model. Returns ``model``.
    Raises ValueError for a target that matches nothing and TypeError for a
    matched module that is not Linear/Conv1D (or already LoRA); the model is
    left untouched when anything is rejected.
    """
    validate_lora_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights)
    names = find_target_modules(model, target_modules)
    check_lora_targets(model, names)

    def make(name: str, module: nn.Module) -> nn.Module:
        return LoRALinear.from_linear(module, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                      use_rslora=use_rslora, init_lora_weights=init_lora_weights,
                                      lora_dtype=lora_dtype)

    replace_modules(model, target_modules, make)
    mark_only_lora_trainable(model)
    return model


def check_lora_targets(model: nn.Module, names: Iterable[str]) -> None:
    """TypeError naming the first of ``names`` that ``LoRALinear`` cannot wrap."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise TypeError(f"target_modules: {name!r} already is a LoRALinear")
        if not is_lora_target(module):
            raise TypeError(
                f"target_modules: {name!r} is a {type(module).__name__}; LoRA wraps only nn.Linear and Conv1D"
            )


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter of ``model`` except the LoRA ones (which become trainable)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every LoRA-kind layer of ``model`` (``LoRALinear``, ``QLoRALinear``)."""
    return peft_layers(model, "lora")


def lora_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters (``lora_A.weight``, ``lora_B.weight`` of each LoRA-kind layer)."""
    return [p for _, m in lora_modules(model) for p in m.peft_parameters()]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (inference without LoRA overhead)."""
    for _, m in lora_modules(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``."""
    for _, m in lora_modules(model):
        m.unmerge()
    return model
