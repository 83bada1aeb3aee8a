"""Turn an existing model into a QLoRA model, in place: targeted linears become ``QLoRALinear``.

Each targeted ``nn.Linear`` is quantized to NF4 (bytes equal to bitsandbytes')
and gets a LoRA update; a targeted bitsandbytes ``Linear4bit`` (nf4) is wrapped
without re-quantizing. Target matching is PEFT's, through
``fastpeft.injection.targets.replace_modules``. Every other parameter is frozen, so
only ``lora_A.weight`` / ``lora_B.weight`` train (PEFT's ``bias="none"``).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..nn.lora import InitLoraWeights, check_lora_dtype, validate_lora_hyperparameters
from ..nn.qlora import QLoRALinear
from ..quant.nf4 import NF4Weight, check_blocksize, check_double_quant
from ..variants import check_use_dora
from .lora import mark_only_lora_trainable
from .modules_to_save import modules_to_save_names, wrap_modules_to_save
from .targets import TargetModules, find_target_modules, swap_modules


def _is_bnb_linear4bit(module: nn.Module) -> bool:
    # A model holding bitsandbytes layers has imported it; importing it here would only print its banner.
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _check_bnb_target(name: str, module: nn.Module) -> None:
    try:
        weight = NF4Weight.from_bnb(module)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"target_modules: {name!r} ({type(module).__name__}): {exc}") from None
    if len(weight.shape) != 2 or weight.shape[1] % weight.blocksize:
        raise ValueError(f"target_modules: {name!r} ({type(module).__name__}) has shape {tuple(weight.shape)} "
                         f"with blocksize {weight.blocksize}; the NF4 kernels need in_features divisible by it")


def _check_targets(model: nn.Module, names, blocksize: int) -> None:
    """Every check a target can fail, for all targets, before any is converted."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, QLoRALinear):
            raise TypeError(f"target_modules: {name!r} already is a QLoRALinear")
        if _is_bnb_linear4bit(module):
            _check_bnb_target(name, module)
            continue
        if type(module) is not nn.Linear:
            raise TypeError(f"target_modules: {name!r} is a {type(module).__name__}; "
                            "QLoRA wraps only nn.Linear and bitsandbytes Linear4bit")
        if module.in_features % blocksize:
            raise ValueError(f"target_modules: {name!r} has in_features={module.in_features}, not divisible by "
                             f"blocksize={blocksize}; pick a blocksize that divides it or leave the layer out")


def apply_qlora(model: nn.Module, target_modules: TargetModules, r: int = 8, lora_alpha: float = 8,
                lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights: InitLoraWeights = True,
                blocksize: int = 64, double_quant: bool = False, lora_dtype: Optional[torch.dtype] = None, *,
                exclude_modules: Optional[TargetModules] = None,
                layers_to_transform: Union[None, int, Sequence[int]] = None,
                layers_pattern: Union[None, str, Sequence[str]] = None,
                modules_to_save: Optional[Sequence[str]] = None, use_dora: bool = False) -> nn.Module:
    """Replace every targeted linear of ``model`` with a ``QLoRALinear``, freeze the rest; returns ``model``.

    Targeting is PEFT's, exactly as in ``fastpeft.apply_lora`` (a str
    ``target_modules`` is a full-match regex; ``"all-linear"``,
    ``exclude_modules``, ``layers_to_transform``/``layers_pattern``,
    ``modules_to_save``). ``blocksize``/``double_quant`` set the NF4
    quantization of ``nn.Linear`` targets (bitsandbytes ``Linear4bit`` nf4
    targets keep their own). Raises ValueError for a target matching nothing,
    an ``in_features`` not divisible by the blocksize or an fp4 ``Linear4bit``,
    TypeError for a target of another type; every target is checked before
    any is converted, so the model is untouched when anything is rejected.
    ``use_dora=True`` makes every layer QDoRA (DoRA on the NF4 base,
    ``fastpeft.variants.dora``).
    """
    validate_lora_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)
    variant = check_use_dora(use_dora)
    if not variant.supports("nf4"):
        raise ValueError(f"use_dora={use_dora}: the {variant.name} variant does not support an NF4 base")
    check_lora_dtype(lora_dtype)
    check_blocksize(blocksize)
    check_double_quant(double_quant)
    selection = dict(exclude_modules=exclude_modules, layers_to_transform=layers_to_transform,
                     layers_pattern=layers_pattern, modules_to_save=modules_to_save)
    names = find_target_modules(model, target_modules, **selection)
    _check_targets(model, names, blocksize)
    saved = modules_to_save_names(model, modules_to_save) if modules_to_save is not None else []
    lora = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                init_lora_weights=init_lora_weights, lora_dtype=lora_dtype, variant=variant)

    def make(name: str, module: nn.Module) -> nn.Module:
        if _is_bnb_linear4bit(module):
            return QLoRALinear.from_bnb(module, **lora)
        return QLoRALinear.from_linear(module, blocksize=blocksize, double_quant=double_quant, **lora)

    swap_modules(model, names, make)
    wrap_modules_to_save(model, saved)
    mark_only_lora_trainable(model)
    return model


def qlora_modules(model: nn.Module) -> list[tuple[str, QLoRALinear]]:
    """``(name, module)`` of every ``QLoRALinear`` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
