"""``QLoRALinear``: a frozen NF4 base layer (``NF4Linear``) plus a trainable LoRA update.

``y = x · dequant(W)ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with PEFT's
parameter layout (``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``) and
``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); the arithmetic is
``fastpeft.ops.qlora_linear``.

Merging: adding ``s · B A`` to an NF4 weight and re-quantizing would lose most
of the (small) update, so the NF4 bytes are never changed. ``merge()`` (the
LoRA-layer protocol, used by ``fastpeft.merge_lora``) keeps a dense merged
weight ``dequant(W) + s · B A`` next to them and runs a plain linear on it
until ``unmerge()`` drops it again: exact both ways, at the memory cost of
one dense weight. ``to_dense_linear()`` returns a new ``nn.Linear`` holding
the merged weight (for serving without fastpeft).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..variants import LoraVariant
from .lora import InitLoraWeights, LoraLayer, cast_to, check_lora_dtype, compute_dtype, validate_lora_hyperparameters
from .nf4 import NF4Linear


class QLoRALinear(LoraLayer):
    """An ``NF4Linear`` base (frozen) plus a trainable LoRA update. See the module docstring."""

    base_kind = "nf4"

    def __init__(self, base_layer: NF4Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: InitLoraWeights = True,
                 lora_dtype: Optional[torch.dtype] = None, variant: Union[str, LoraVariant] = "lora"):
        super().__init__()
        if not isinstance(base_layer, NF4Linear):
            raise TypeError(f"base_layer must be an NF4Linear, got {type(base_layer).__name__} "
                            "(use QLoRALinear.from_linear / from_bnb to convert)")
        validate_lora_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights)
        check_lora_dtype(lora_dtype)
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self._merged_weight: Optional[torch.Tensor] = None
        self._init_lora(base_layer.in_features, base_layer.out_features, r, lora_alpha, lora_dropout, use_rslora,
                        init_lora_weights, base_layer.weight.device, lora_dtype or base_layer.weight_dtype, variant)

    @classmethod
    def from_linear(cls, base: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: InitLoraWeights = True, blocksize: int = 64,
                    double_quant: bool = False, lora_dtype: Optional[torch.dtype] = None,
                    variant: Union[str, LoraVariant] = "lora") -> "QLoRALinear":
        """Quantize ``base`` to NF4 and add LoRA (PEFT init: kaiming-uniform A, zero B)."""
        return cls(NF4Linear.from_linear(base, blocksize=blocksize, double_quant=double_quant), r=r,
                   lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                   init_lora_weights=init_lora_weights, lora_dtype=lora_dtype, variant=variant)

    @classmethod
    def from_bnb(cls, linear4bit: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: InitLoraWeights = True,
                 lora_dtype: Optional[torch.dtype] = None,
                 variant: Union[str, LoraVariant] = "lora") -> "QLoRALinear":
        """Add LoRA to a quantized bitsandbytes ``Linear4bit`` (its bytes are used as they are)."""
        return cls(NF4Linear.from_bnb(linear4bit), r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                   use_rslora=use_rslora, init_lora_weights=init_lora_weights, lora_dtype=lora_dtype,
                   variant=variant)

    def frozen_weight_parameter(self) -> torch.Tensor:
        return self.base_layer.weight

    def frozen_weight_out_in(self, dtype: torch.dtype) -> torch.Tensor:
        return self.base_layer.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged:
            dtype = compute_dtype(x)
            return F.linear(cast_to(x, dtype), self._merged_weight.to(dtype), cast_to(self.base_layer.bias, dtype))
        lora_A, lora_B = self.lora_weights_for(x)
        base = self._modules["base_layer"]
        return self.variant.forward_nf4(self, x, base.nf4_weight, base.bias_for(x), lora_A, lora_B)

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scaling · B A`` as ``[out, in]`` (computed in at least fp32)."""
        return self.delta_weight_out_in(dtype)

    @torch.no_grad()
    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``dequant(W_nf4) + scaling · B A`` in ``dtype`` (default: the original weight's), summed in fp32."""
        dtype = dtype or self.base_layer.weight_dtype
        compute = torch.promote_types(dtype, torch.float32)
        return self.variant.merged(self, self.base_layer.dequantize(compute)).to(dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Run a dense merged weight from now on (the NF4 bytes stay as they are; see module docstring)."""
        if self._merged:
            return
        self._merged_weight = self.merged_weight()
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Drop the merged weight: back to NF4 plus LoRA, exactly as before ``merge``."""
        self._merged_weight = None
        self._merged = False

    @torch.no_grad()
    def to_dense_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A new dense ``nn.Linear`` with ``W = dequant(W_nf4) + scaling · B A`` (and the bias).

        Dtype: ``dtype`` or the original weight's. This module is left as it is.
        """
        dtype = dtype or self.base_layer.weight_dtype
        weight = self.merged_weight(dtype)
        bias = self.base_layer.bias
        dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                          device=weight.device, dtype=dtype)
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias.to(dtype))
        return dense
