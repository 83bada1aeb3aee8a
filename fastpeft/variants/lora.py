"""Plain LoRA as a variant: ``x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` on a dense (``lora_linear``) or NF4
(``qlora_linear``) base; merging adds ``s·BA``."""
from __future__ import annotations

import torch

from ..ops.lora import lora_linear
from ..ops.qlora import qlora_linear
from .base import LoraVariant


class PlainLora(LoraVariant):
    name = "lora"

    def forward_dense(self, layer, x, weight, bias, lora_A, lora_B):
        return lora_linear(x, weight, lora_A, lora_B, layer.scaling, bias, layer.lora_dropout, layer.training)

    def forward_nf4(self, layer, x, w_nf4, bias, lora_A, lora_B):
        return qlora_linear(x, w_nf4, lora_A, lora_B, layer.scaling, bias, layer.lora_dropout, layer.training)

    @torch.no_grad()
    def merged(self, layer, weight):
        return weight + layer.delta_weight_out_in(weight.dtype)

    @torch.no_grad()
    def unmerged(self, layer, weight):
        return weight - layer.delta_weight_out_in(weight.dtype)


VARIANT = PlainLora()
