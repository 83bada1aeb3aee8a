"""DoRA (HF PEFT's ``use_dora=True``) as a LoRA variant: a trainable magnitude per output row.

``y = c ⊙ (x Wᵀ + s·(drop(x) Aᵀ) Bᵀ) + b`` with ``c = m / ‖W + s·BA‖`` (the
norm detached; PEFT's dropout and bias handling: ``fastpeft.ops.dora``).
``m`` is ``lora_magnitude_vector`` ``[out]`` on the layer (PEFT's checkpoint
key), initialised to the row norms of ``W + s·BA``. ``‖W_i‖²`` is cached on
the layer while the frozen weight is unchanged (same storage, same version
counter, same dtype); any in-place change of W invalidates it.
Merging, as PEFT: ``W' = c ⊙ (W + s·BA)`` with the norm of the unmerged
weight, kept for ``unmerge`` (``W = W' / c − s·BA``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.dora import dora_linear, dora_weight_norm, norm_dtype, weight_row_norm_sq
from .base import LoraVariant


class DoRA(LoraVariant):
    name = "dora"
    peft_config = {"use_dora": True}
    checkpoint_keys = ("lora_magnitude_vector",)

    @torch.no_grad()
    def init(self, layer) -> None:
        lora_A = layer.lora_A.weight
        weight = layer.frozen_weight_out_in(norm_dtype(lora_A.dtype))
        norm = dora_weight_norm(weight, lora_A.to(weight.dtype), layer.lora_B.weight.to(weight.dtype), layer.scaling)
        existing = layer.__dict__.get("_parameters", {}).get("lora_magnitude_vector")
        if existing is None:
            layer.lora_magnitude_vector = nn.Parameter(norm.to(lora_A.dtype))
        else:
            existing.copy_(norm)

    def forward_dense(self, layer, x, weight, bias, lora_A, lora_B):
        magnitude = layer._parameters["lora_magnitude_vector"]
        if magnitude.dtype is not weight.dtype:
            magnitude = magnitude.to(weight.dtype)
        return dora_linear(x, weight, lora_A, lora_B, magnitude, layer.scaling, bias, layer.lora_dropout,
                           layer.training, weight_norm_sq=cached_weight_norm_sq(layer, weight.dtype))

    @torch.no_grad()
    def merged(self, layer, weight):
        acc = norm_dtype(weight.dtype)
        updated = weight.to(acc) + layer.delta_weight_out_in(acc)
        norm = torch.linalg.vector_norm(updated, dim=1)
        layer._dora_merged_norm = norm
        return ((layer.lora_magnitude_vector.to(acc) / norm).unsqueeze(1) * updated).to(weight.dtype)

    @torch.no_grad()
    def unmerged(self, layer, weight):
        acc = norm_dtype(weight.dtype)
        norm = layer.__dict__.pop("_dora_merged_norm")
        scale = (layer.lora_magnitude_vector.to(acc) / norm).unsqueeze(1)
        return (weight.to(acc) / scale - layer.delta_weight_out_in(acc)).to(weight.dtype)


def cached_weight_norm_sq(layer, dtype: torch.dtype) -> torch.Tensor:
    """``‖W_i‖²`` of a LoRA layer's frozen weight for compute dtype ``dtype``, recomputed only when W changed."""
    return cached_row_norm_sq(layer, layer.frozen_weight_parameter(), layer.frozen_weight_out_in, dtype)


def cached_row_norm_sq(owner, raw: torch.Tensor, weight_out_in, dtype: torch.dtype) -> torch.Tensor:
    """``‖W_i‖²`` cached on ``owner`` under the identity of ``raw`` (the tensor holding W: storage, version
    counter, dtype, device); ``weight_out_in(dtype)`` gives W as ``[out, in]`` when it must be computed."""
    key = (raw.data_ptr(), raw._version, raw.dtype, raw.device, norm_dtype(dtype))
    cached = owner.__dict__.get("_dora_weight_norm_sq")
    if cached is not None and cached[0] == key:
        return cached[1]
    value = weight_row_norm_sq(weight_out_in(raw.dtype)).to(norm_dtype(dtype))
    owner.__dict__["_dora_weight_norm_sq"] = (key, value)
    return value


VARIANT = DoRA()
