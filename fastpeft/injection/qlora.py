"""Turn an existing model into a QLoRA model, in place: targeted linears become ``QLoRALinear``.

Each targeted ``nn.Linear`` is quantized to NF4 (bytes equal to bitsandbytes')
and gets a LoRA update; a targeted bitsandbytes ``Linear4bit`` (nf4) is wrapped
without re-quantizing. Target matching is PEFT's, through
``fastpeft.injection.targets.replace_modules``. Every other parameter is frozen, so
only ``lora_A.weight`` / ``lora_B.weight`` train (PEFT's ``bias="none"``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn.lora import InitLoraWeights, validate_lora_hyperparameters
from ..nn.qlora import QLoRALinear
from ..quant.nf4 import check_blocksize
from .lora import mark_only_lora_trainable
from .targets import TargetModules, find_target_modules, replace_modules


def _is_bnb_linear4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def _check_targets(model: nn.Module, names, blocksize: int) -> None:
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, QLoRALinear):
            raise TypeError(f"target_modules: {name!r} already is a QLoRALinear")
        if _is_bnb_linear4bit(module):
            continue
        if type(module) is not nn.Linear:
            raise TypeError(f"target_modules: {name!r} is a {type(module).__name__}; "
                            "QLoRA wraps only nn.Linear and bitsandbytes Linear4bit")
        if module.in_features % blocksize:
            raise ValueError(f"target_modules: {name!r} has in_features={module.in_features}, not divisible by "
                             f"blocksize={blocksize}; pick a blocksize that divides it or leave the layer out")


def apply_qlora(model: nn.Module, target_modules: TargetModules, r: int = 8, lora_alpha: float = 8,
                lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights: InitLoraWeights = True,
                blocksize: int = 64, double_quant: bool = False,
                lora_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every targeted linear of ``model`` with a ``QLoRALinear``, freeze the rest; returns ``model``.

    ``blocksize``/``double_quant`` set the NF4 quantization of ``nn.Linear``
    targets (bitsandbytes ``Linear4bit`` targets keep their own). Raises
    ValueError for a target matching nothing or an ``in_features`` not
    divisible by ``blocksize``, TypeError for a target of another type; the
    model is untouched when anything is rejected.
    """
    validate_lora_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights)
    check_blocksize(blocksize)
    names = find_target_modules(model, target_modules)
    _check_targets(model, names, blocksize)
    lora = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                init_lora_weights=init_lora_weights, lora_dtype=lora_dtype)

    def make(name: str, module: nn.Module) -> nn.Module:
        if _is_bnb_linear4bit(module):
            return QLoRALinear.from_bnb(module, **lora)
        return QLoRALinear.from_linear(module, blocksize=blocksize, double_quant=double_quant, **lora)

    replace_modules(model, target_modules, make)
    mark_only_lora_trainable(model)
    return model


def qlora_modules(model: nn.Module) -> list[tuple[str, QLoRALinear]]:
    """``(name, module)`` of every ``QLoRALinear`` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
