"""HF PEFT's DoRA layer built beside a fastpeft DoRA layer on the same base, with the same A, B and m.

``pair(base)`` returns ``(ours, peft_layer)``; ``FixedMaskDropout`` makes PEFT
apply the dropout mask fastpeft's CPU path draws for a seed, so training-mode
outputs can be compared element by element.
"""
from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fastpeft.nn.lora import LoRALinear, is_conv1d
from fastpeft.ops import lora_dropout_mask
from fastpeft.ops._dropout_seed import draw_seed, seed_value


class Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class FixedMaskDropout(nn.Module):
    """``x · keep / (1-p)`` with a given mask (PEFT's dropout slot; not an Identity, so PEFT takes its dropout
    branch)."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.view(x.shape).to(x.dtype) / (1.0 - self.p)


def pair(base: nn.Module, r: int = 4, alpha: float = 8, dropout: float = 0.0, seed: int = 0):
    """fastpeft's DoRA ``LoRALinear`` and PEFT's DoRA ``lora.Linear`` on copies of ``base``, equal parameters
    (A, B random, so the update and m differ from the base's norms)."""
    torch.manual_seed(seed)
    ours = LoRALinear.from_linear(copy.deepcopy(base), r=r, lora_alpha=alpha, lora_dropout=dropout,
                                  init_lora_weights=False, variant="dora")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["layer"], use_dora=True,
                        fan_in_fan_out=is_conv1d(base), init_lora_weights=False)
    model = get_peft_model(Holder(copy.deepcopy(base)), config)
    theirs = model.base_model.model.layer
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    return ours, theirs


def peft_parameters(layer) -> dict:
    return {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight,
            "magnitude": layer.lora_magnitude_vector["default"].weight}


def our_parameters(layer) -> dict:
    return {"lora_A": layer.lora_A.weight, "lora_B": layer.lora_B.weight, "magnitude": layer.lora_magnitude_vector}


def seeded_mask(shape2d, p: float, rng_seed: int) -> torch.Tensor:
    """The keep-mask fastpeft's CPU path applies in a call made right after ``torch.manual_seed(rng_seed)``."""
    torch.manual_seed(rng_seed)
    return lora_dropout_mask(shape2d, p, seed_value(draw_seed(p)), "cpu")
