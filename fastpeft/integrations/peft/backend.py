"""fastpeft as a backend of HF PEFT, through ``LoraConfig._register_custom_module``.

PEFT (0.21) lets a ``LoraConfig`` map a layer type to a custom LoRA layer
class; ``get_peft_model`` / ``PeftModel.from_pretrained`` then build that
class as ``cls(target, adapter_name, config=config, r=..., lora_alpha=...,
...)`` for every targeted layer whose base is an instance of the mapped type
(checked before PEFT's own dispatchers).

``FastLoraLinear`` is PEFT's own ``lora.Linear`` with one change: its forward
runs ``fastpeft.ops.lora_linear`` (fused kernels) in the common case, a single
active vanilla adapter that is not merged, and falls back to PEFT's forward
for everything else (several active adapters, ``adapter_names`` mixed
batches, variants other than DoRA, ``lora_bias``, disabled or merged adapters,
an input whose dtype differs from the base weight outside ``torch.autocast``;
under autocast the fused op casts like torch's ``linear``). Parameter names,
merge/unmerge, saving and loading are PEFT's, so adapters saved this way are
ordinary PEFT adapters. A DoRA adapter (``use_dora=True``) runs
``fastpeft.ops.dora_linear`` on PEFT's own magnitude parameter
(``lora_magnitude_vector``), with ``‖W_i‖²`` cached while the base weight is
unchanged (``fastpeft.variants.dora``).

Dtypes: PEFT keeps adapters in fp32 on half-precision models and runs the
LoRA branch in fp32; the fused op instead casts A and B to the input's dtype
(its GEMMs accumulate in fp32 and keep ``x Aᵀ`` in fp32). Gradients reach the
fp32 parameters unchanged in dtype.

The mapping key is ``FusedLoraTarget``, not ``nn.Linear``: PEFT checks
``isinstance(base, key)``, and quantized layers (bitsandbytes ``Linear4bit``,
...) subclass ``nn.Linear`` with a different forward; they must keep PEFT's
own quantized LoRA layers. ``FusedLoraTarget`` matches only layers that
compute a plain ``nn.Linear`` or transformers ``Conv1D`` forward with a
floating-point weight.

The registration is not saved with the config (PEFT's ``to_dict`` only writes
dataclass fields), so to load an adapter onto the fused layers use
``load_fastpeft_adapter`` (or pass a registered config to
``PeftModel.from_pretrained``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...nn.lora import conv1d_class
from ...ops import dora_linear, lora_linear
from ...variants.dora import cached_row_norm_sq
from ...ops._autocast import autocast_dtype


class _FusedLoraTargetMeta(type):
    def __instancecheck__(cls, module) -> bool:
        if not isinstance(module, nn.Module):
            return False
        conv1d = conv1d_class()
        if conv1d is not None and type(module) is conv1d:
            plain = True
        else:
            plain = isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
        weight = getattr(module, "weight", None)
        return plain and type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point()


class FusedLoraTarget(metaclass=_FusedLoraTargetMeta):
    """Type key for PEFT's custom-module mapping: a plain ``nn.Linear`` or ``Conv1D``.

    ``isinstance(m, FusedLoraTarget)`` is True for ``nn.Linear`` (and subclasses
    that keep its forward) and transformers ``Conv1D`` with a floating weight;
    False for quantized linears and other subclasses. Never instantiated.
    """

    def __new__(cls, *args, **kwargs):
        raise TypeError("FusedLoraTarget is a type key for isinstance checks, not a layer")


class FastLoraLinear(PeftLoraLinear):
    """PEFT's ``lora.Linear`` whose forward runs fastpeft's fused LoRA op when it can."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, is_target_conv_1d_layer: bool = False, **kwargs) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        conv1d_cls = conv1d_class()
        conv1d = conv1d_cls is not None and isinstance(base, conv1d_cls)
        if config.fan_in_fan_out != conv1d:  # before PEFT's init: DoRA's magnitude is computed there
            config = dataclasses.replace(config, fan_in_fan_out=conv1d)
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha,
                         is_target_conv_1d_layer=conv1d, **kwargs)
        # One config serves both layouts; PEFT's default dispatcher fixes this per layer too.
        self.fan_in_fan_out = conv1d

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[str]:
        """The adapter the fused op can run alone, or None when PEFT's forward is needed."""
        if self.disable_adapters or self.merged or args or any(v is not None for v in kwargs.values()):
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        adapter = active[0]
        variant = self.lora_variant.get(adapter)
        if (variant is not None and not isinstance(variant, DoraLinearVariant)) or self.lora_bias.get(adapter, False):
            return None
        if not isinstance(x, torch.Tensor):
            return None
        if x.dtype != self.get_base_layer().weight.dtype and autocast_dtype(x) is None:
            return None  # outside autocast, mixed dtypes keep PEFT's behaviour
        return adapter

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._fused_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if lora_A.dtype != x.dtype:
            lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        if adapter in self.lora_variant:
            magnitude = self.lora_magnitude_vector[adapter].weight
            weight_norm_sq = cached_row_norm_sq(self, base.weight, self._base_weight_out_in, x.dtype)
            return dora_linear(x, weight, lora_A, lora_B, magnitude.to(x.dtype), self.scaling[adapter],
                               bias=base.bias, dropout_p=p, training=dropout.training, weight_norm_sq=weight_norm_sq)
        return lora_linear(x, weight, lora_A, lora_B, self.scaling[adapter], bias=base.bias,
                           dropout_p=p, training=dropout.training)

    def _base_weight_out_in(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.get_base_layer().weight.detach()
        return (weight.t() if self.fan_in_fan_out else weight).to(dtype)

    def __repr__(self) -> str:
        return "fastpeft." + super().__repr__()


def register_fastpeft(config: LoraConfig) -> LoraConfig:
    """Make ``config`` build ``FastLoraLinear`` for plain Linear/Conv1D targets; returns ``config``."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({FusedLoraTarget: FastLoraLinear})
    return config


def fastpeft_lora_config(**kwargs: Any) -> LoraConfig:
    """``LoraConfig(**kwargs)`` that makes ``get_peft_model`` use fastpeft's fused LoRA op."""
    return register_fastpeft(LoraConfig(**kwargs))


def load_fastpeft_adapter(model: nn.Module, model_id: str | os.PathLike, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, model_id, **kwargs)`` with fastpeft's fused layers.

    The saved config must be a LoRA config; ``kwargs`` go to ``from_pretrained``
    (``adapter_name``, ``is_trainable``, ...), except ``config``, which is read
    from ``model_id`` here.
    """
    if "config" in kwargs:
        raise TypeError("config is read from model_id; pass a registered config to PeftModel.from_pretrained "
                        "yourself if you need a different one")
    config = LoraConfig.from_pretrained(model_id)
    return PeftModel.from_pretrained(model, model_id, config=register_fastpeft(config), **kwargs)
