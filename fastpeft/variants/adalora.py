"""AdaLoRA (HF PEFT's ``AdaLoraConfig``, ``tuners/adalora``) as a LoRA variant: the layer maths.

``ΔW = B (A ⊙ E) · α / (ranknum + 1e-5)``: ``lora_A [r, K]``, ``lora_B [N, r]``
and the singular-value vector ``lora_E [r, 1]`` are trained; ``ranknum`` (r)
is fixed, as in PEFT (its ``scaling`` is ``lora_alpha``, not ``α/r``). The
layer's ``scaling`` is set to ``α / (r + 1e-5)`` here, so the forward is the
shared LoRA op (``ops.lora.lora_linear``: CPU and Triton) on ``A ⊙ E``; the
product is a small ``[r, K]`` torch op whose autograd gives
``dE = Σ_k dA_eff ⊙ A``. Masked ranks (E zeroed by the rank allocator,
``fastpeft.injection.adalora``) run as zero rows. PEFT's init: E zeros, A and
B normal(0, 0.02). PEFT stores AdaLoRA under its own checkpoint layout
(``peft_type`` ADALORA), not LoRA's: ``peft_config`` is left empty so a LoRA
config never selects this variant.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.lora import lora_linear
from .base import LoraVariant

RANKNUM_EPS = 1e-5  # PEFT's ``ranknum + 1e-5``
INIT_STD = 0.02


class AdaLora(LoraVariant):
    name = "adalora"
    checkpoint_keys = ("lora_E",)

    @torch.no_grad()
    def init(self, layer) -> None:
        nn.init.normal_(layer.lora_A.weight, mean=0.0, std=INIT_STD)
        nn.init.normal_(layer.lora_B.weight, mean=0.0, std=INIT_STD)
        layer.scaling = adalora_scaling(layer.lora_alpha, layer.r)
        existing = layer.__dict__.get("_parameters", {}).get("lora_E")
        if existing is None:
            layer.lora_E = nn.Parameter(layer.lora_A.weight.new_zeros(layer.r, 1))
        else:
            existing.zero_()

    def checkpoint_tensors(self, layer) -> dict:
        raise ValueError("AdaLoRA layers save in PEFT's ADALORA layout (pruned ranks, rank_pattern), which "
                         "save_lora does not write yet; merge_lora gives a plain model")

    def forward_dense(self, layer, x, weight, bias, lora_A, lora_B):
        lora_E = layer._parameters["lora_E"]
        effective_A = lora_A * (lora_E if lora_E.dtype is lora_A.dtype else lora_E.to(lora_A.dtype))
        return lora_linear(x, weight, effective_A, lora_B, layer.scaling, bias, layer.lora_dropout, layer.training)

    @torch.no_grad()
    def delta(self, layer, dtype: torch.dtype) -> torch.Tensor:
        compute = torch.promote_types(dtype, torch.float32)
        a = layer.lora_A.weight.to(compute) * layer.lora_E.to(compute)
        return (layer.lora_B.weight.to(compute) @ a * layer.scaling).to(dtype)

    def merged(self, layer, weight):
        return weight + self.delta(layer, weight.dtype)

    def unmerged(self, layer, weight):
        return weight - self.delta(layer, weight.dtype)


def adalora_scaling(lora_alpha: float, r: int) -> float:
    """PEFT's ``scaling / (ranknum + 1e-5)`` with ``scaling = lora_alpha`` (r when alpha is not positive)."""
    return (lora_alpha if lora_alpha > 0 else float(r)) / (float(r) + RANKNUM_EPS)


VARIANT = AdaLora()
