"""A fastpeft LoRA model and its HF PEFT twin with the same weights, for the optimizer and variant tests.

``twins(build, targets, ...)`` returns ``(ours, theirs)``: ``build()`` twice,
fastpeft's ``apply_lora`` on one and PEFT's ``get_peft_model`` on the other,
every LoRA pair random (non-zero B) and copied into PEFT. ``our_name`` maps a
PEFT parameter name to fastpeft's.
"""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

import fastpeft


def our_name(peft_name: str) -> str:
    """``base_model.model.x.lora_A.default.weight`` -> ``x.lora_A.weight`` (modules_to_save names are equal)."""
    name = peft_name.removeprefix("base_model.model.")
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.default.", f".{part}.")
    return name


def twins(build, targets, r: int = 4, lora_alpha: float = 8, modules_to_save=None, seed: int = 3):
    ours = fastpeft.apply_lora(build(), targets, r=r, lora_alpha=lora_alpha, modules_to_save=modules_to_save)
    theirs = get_peft_model(build(), LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets,
                                                modules_to_save=modules_to_save))
    g = torch.Generator().manual_seed(seed)
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if p.requires_grad:
                ours_params[our_name(name)].copy_(p)
    return ours, theirs


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
