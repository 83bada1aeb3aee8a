"""DoRA (HF PEFT's ``use_dora=True``) as a LoRA variant: a trainable magnitude per output row.

``y = c ⊙ (x Wᵀ + s·(drop(x) Aᵀ) Bᵀ) + b`` with ``c = m / ‖W + s·BA‖`` (the
norm detached; PEFT's dropout and bias handling: ``fastpeft.ops.dora``).
``m`` is ``lora_magnitude_vector`` ``[out]`` on the layer (PEFT's checkpoint
key), initialised to the row norms of ``W + s·BA``. ``‖W_i‖²`` is cached on
the layer while the frozen weight is unchanged (same storage, same version
counter, same dtype); any in-place change of W invalidates it.
Merging, as PEFT: ``W' = c ⊙ (W + s·BA)`` with the norm of the unmerged
weight, kept for ``unmerge`` (``W = W' / c − s·BA``).

QDoRA (an NF4 base, ``QLoRALinear``) composes the NF4 ops: ``A Wᵀ`` for the
factored norm is ``nf4_linear`` on the rows of A, ``z`` is ``qlora_linear``
without bias on x (or on the dropped x, plus ``nf4_linear(x − x')`` for
PEFT's base recomputation), and autograd carries ``c ⊙ dy`` and
``dm = Σ_rows(dy ⊙ z) / ‖·‖`` through the product. W is dequantised only
inside the NF4 kernels, except once per weight version for the cached
``‖W_i‖²``. Its dropout mask is torch's (``F.dropout``), not the fused ops'
seeded one.
"""
from __future__ import annotations

import torch
from torch import nn

from torch.nn import functional as F

from ..ops.dora import dora_linear, dora_weight_norm, factored_weight_norm, norm_dtype, weight_row_norm_sq
from ..ops.nf4 import nf4_linear
from ..ops.qlora import qlora_linear
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
                           layer.training, weight_norm=cached_norm(layer, weight, lora_A, lora_B))

    def forward_nf4(self, layer, x, w_nf4, bias, lora_A, lora_B):
        dtype = lora_A.dtype
        magnitude = layer._parameters["lora_magnitude_vector"]
        with torch.no_grad():
            a_w = nf4_linear(lora_A.detach(), w_nf4)
            norm = factored_weight_norm(cached_weight_norm_sq(layer, dtype), a_w, lora_A, lora_B, layer.scaling)
        scale = (magnitude.to(norm.dtype) / norm).to(dtype)
        p = layer.lora_dropout if layer.training else 0.0
        x_dropped = x if p == 0.0 else F.dropout(x, p, True)
        z = qlora_linear(x_dropped, w_nf4, lora_A, lora_B, layer.scaling)
        y = z * scale if bias is None else torch.addcmul(bias, z, scale)
        return y if p == 0.0 else y + nf4_linear(x - x_dropped, w_nf4)

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


def cached_norm(layer, weight, lora_A, lora_B) -> torch.Tensor:
    """``‖W + s·BA‖`` of a dense-base layer (operands in the compute dtype), recomputed only when W, A or B
    changed: every step in training (the optimizer updates A and B in place), once in inference."""
    weight_norm_sq = cached_weight_norm_sq(layer, weight.dtype)  # the key of W
    pair = (layer.lora_A._parameters["weight"], layer.lora_B._parameters["weight"])
    key = tuple((t.data_ptr(), t._version) for t in pair) + (weight.dtype, layer.scaling)
    cached = layer.__dict__.get("_dora_norm")
    if cached is not None and cached[0] == key and cached[2] is weight_norm_sq:
        return cached[1]
    norm = dora_weight_norm(weight, lora_A, lora_B, layer.scaling, weight_norm_sq)
    layer.__dict__["_dora_norm"] = (key, norm, weight_norm_sq)
    return norm


def cached_weight_norm_sq(layer, dtype: torch.dtype) -> torch.Tensor:
    """``‖W_i‖²`` of a LoRA layer's frozen weight for compute dtype ``dtype``, recomputed only when W changed."""
    return cached_row_norm_sq(layer, layer.frozen_weight_parameter(), layer.frozen_weight_out_in, dtype)


def cached_row_norm_sq(owner, raw: torch.Tensor, weight_out_in, dtype: torch.dtype) -> torch.Tensor:
    """``‖W_i‖²`` cached on ``owner`` under the identity of ``raw`` (the tensor holding W: storage, version
    counter, dtype, device); ``weight_out_in(dtype)`` gives W as ``[out, in]`` in the norm's dtype (dequantised
    for an NF4 base) when it must be computed."""
    key = (raw.data_ptr(), raw._version, raw.dtype, raw.device, norm_dtype(dtype))
    cached = owner.__dict__.get("_dora_weight_norm_sq")
    if cached is not None and cached[0] == key:
        return cached[1]
    value = weight_row_norm_sq(weight_out_in(norm_dtype(dtype)))
    owner.__dict__["_dora_weight_norm_sq"] = (key, value)
    return value


VARIANT = DoRA()
