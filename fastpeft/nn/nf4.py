"""``NF4Linear`` (frozen 4-bit NormalFloat linear) and ``QLoRALinear`` (NF4 base + LoRA).

``NF4Linear`` keeps the quantized weight as buffers in bitsandbytes' layout
(``weight`` packed uint8, ``weight_absmax``, ``weight_code`` and, with double
quantization, ``weight_nested_absmax`` / ``weight_nested_code`` /
``weight_nested_offset``), so ``.to()``
and ``state_dict`` carry it; the arithmetic is ``fastpeft.ops.nf4_linear``.

``QLoRALinear`` wraps an ``NF4Linear`` as ``base_layer`` with PEFT's parameter
layout (``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``, bias-free
``nn.Linear`` holders that are never called) and computes
``y = x · dequant(W)ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with
``fastpeft.ops.qlora_linear``. ``scaling = lora_alpha / r`` (``/ sqrt(r)``
with rsLoRA).

Merging: adding ``s · B A`` to an NF4 weight and re-quantizing would lose most
of the (small) update, so it is never done in place. ``QLoRALinear.merge()``
returns a new dense ``nn.Linear`` holding ``dequant(W) + s · B A``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.nf4 import nf4_linear
from ..ops.qlora import qlora_linear
from ..quant.nf4 import NF4Weight
from .lora import InitLoraWeights, init_lora_pair, lora_scaling, validate_lora_hyperparameters



class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is NF4-quantized; ``bias`` (optional) is a parameter.

    Build it with ``from_linear`` (quantizes), ``from_bnb`` (wraps a
    bitsandbytes ``Linear4bit`` as is) or ``NF4Linear(NF4Weight, bias)``.
    Inputs may be fp32/fp16/bf16 (fp64 on the CPU path); the weight is
    dequantized to the input's dtype inside the kernel.
    """

    def __init__(self, weight: NF4Weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be a fastpeft.quant.NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        if self.in_features % weight.blocksize:
            raise ValueError(f"in_features={self.in_features} is not divisible by blocksize={weight.blocksize}; "
                             "the NF4 kernels need every quantization block inside one row")
        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype
        self.register_buffer("weight", weight.packed)
        self.register_buffer("weight_absmax", weight.absmax)
        self.register_buffer("weight_code", weight.code)
        if weight.double_quant:
            self.register_buffer("weight_nested_absmax", weight.nested_absmax)
            self.register_buffer("weight_nested_code", weight.nested_code)
            self.register_buffer("weight_nested_offset", torch.tensor(weight.offset, dtype=torch.float32,
                                                                      device=weight.device))
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (self.out_features,):
                raise ValueError(f"bias must be a tensor of shape ({self.out_features},)")
            bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.bias = bias
        self._cache: tuple = (None, None)
        self._rebuild_nf4_weight()
        self.register_load_state_dict_post_hook(lambda module, _: module._rebuild_nf4_weight())

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False) -> "NF4Linear":
        """Quantize ``linear.weight`` (bytes equal to bitsandbytes'); the bias is copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        weight = NF4Weight.from_float(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(weight, linear.bias)

    @classmethod
    def from_bnb(cls, linear4bit: nn.Module) -> "NF4Linear":
        """Wrap a quantized bitsandbytes ``Linear4bit`` (nf4) without re-quantizing."""
        if not hasattr(linear4bit, "weight") or not isinstance(linear4bit, nn.Module):
            raise TypeError(f"linear4bit must be a bitsandbytes Linear4bit, got {type(linear4bit).__name__}")
        weight = NF4Weight.from_bnb(linear4bit)
        return cls(weight, getattr(linear4bit, "bias", None))

    def _buffers_and_key(self):
        buffers = (self.weight, self.weight_absmax, self.weight_code,
                   getattr(self, "weight_nested_absmax", None), getattr(self, "weight_nested_code", None))
        return buffers, tuple(None if t is None else (t.data_ptr(), t.device, t.dtype) for t in buffers)

    def _rebuild_nf4_weight(self) -> None:
        (packed, absmax, code, nested_absmax, nested_code), key = self._buffers_and_key()
        weight = NF4Weight(packed, (self.out_features, self.in_features), self.weight_dtype, self.blocksize,
                           absmax, nested_absmax=nested_absmax, nested_code=nested_code,
                           offset=float(self.weight_nested_offset) if nested_absmax is not None else None,
                           code=code)
        self._cache = (key, weight)

    @property
    def nf4_weight(self) -> NF4Weight:
        """The buffers as an ``NF4Weight``.

        Built eagerly (construction, ``.to()``, ``load_state_dict``) and reused,
        so that ``torch.compile`` sees a ready object; outside compilation a
        buffer replaced by assignment is noticed and the view rebuilt.
        """
        if not torch.compiler.is_compiling() and self._cache[0] != self._buffers_and_key()[1]:
            self._rebuild_nf4_weight()
        return self._cache[1]

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) must move the quantization state, never cast it.
        before = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._rebuild_nf4_weight()
        return self

    @property
    def double_quant(self) -> bool:
        return hasattr(self, "weight_nested_absmax")

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight (default dtype: the original weight's)."""
        return self.nf4_weight.dequantize(dtype)

    def bias_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The bias in x's dtype (a differentiable cast when they differ)."""
        if self.bias is None or self.bias.dtype == x.dtype:
            return self.bias
        return self.bias.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.nf4_weight, self.bias_for(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, dtype={self.weight_dtype}")


class QLoRALinear(nn.Module):
    """An ``NF4Linear`` base (frozen) plus a trainable LoRA update. See the module docstring."""

    def __init__(self, base_layer: NF4Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: InitLoraWeights = True,
                 lora_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(base_layer, NF4Linear):
            raise TypeError(f"base_layer must be an NF4Linear, got {type(base_layer).__name__} "
                            "(use QLoRALinear.from_linear / from_bnb to convert)")
        validate_lora_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights)
        if lora_dtype is not None and not (isinstance(lora_dtype, torch.dtype) and lora_dtype.is_floating_point):
            raise TypeError(f"lora_dtype must be a floating torch.dtype or None, got {lora_dtype!r}")
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, lora_alpha, self.use_rslora)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        factory = {"device": base_layer.weight.device, "dtype": lora_dtype or base_layer.weight_dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters(init_lora_weights)

    @classmethod
    def from_linear(cls, base: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: InitLoraWeights = True, blocksize: int = 64,
                    double_quant: bool = False, lora_dtype: Optional[torch.dtype] = None) -> "QLoRALinear":
        """Quantize ``base`` to NF4 and add LoRA (PEFT init: kaiming-uniform A, zero B)."""
        return cls(NF4Linear.from_linear(base, blocksize=blocksize, double_quant=double_quant), r=r,
                   lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                   init_lora_weights=init_lora_weights, lora_dtype=lora_dtype)

    @classmethod
    def from_bnb(cls, linear4bit: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: InitLoraWeights = True,
                 lora_dtype: Optional[torch.dtype] = None) -> "QLoRALinear":
        """Add LoRA to a quantized bitsandbytes ``Linear4bit`` (its bytes are used as they are)."""
        return cls(NF4Linear.from_bnb(linear4bit), r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                   use_rslora=use_rslora, init_lora_weights=init_lora_weights, lora_dtype=lora_dtype)

    def reset_lora_parameters(self, init_lora_weights: InitLoraWeights = True) -> None:
        """PEFT's init (see ``init_lora_pair``); ``False`` leaves nn.Linear's random init (for tests)."""
        init_lora_pair(self.lora_A.weight, self.lora_B.weight, init_lora_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.lora_A.weight, self.lora_B.weight
        if lora_A.dtype != x.dtype:
            lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        return qlora_linear(x, self.base_layer.nf4_weight, lora_A, lora_B, self.scaling,
                            bias=self.base_layer.bias_for(x), dropout_p=self.lora_dropout, training=self.training)

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scaling · B A`` (computed in at least fp32)."""
        compute = torch.promote_types(dtype, torch.float32)
        return ((self.lora_B.weight.to(compute) @ self.lora_A.weight.to(compute)) * self.scaling).to(dtype)

    @torch.no_grad()
    def merge(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A new dense ``nn.Linear`` with ``W = dequant(W_nf4) + scaling · B A`` (and the bias).

        Dtype: ``dtype`` or the original weight's. This module is left as it is:
        merging into the NF4 weight would re-quantize and lose the update.
        """
        dtype = dtype or self.base_layer.weight_dtype
        compute = torch.promote_types(dtype, torch.float32)
        weight = self.base_layer.dequantize(compute) + self.delta_weight(compute)
        bias = self.base_layer.bias
        dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                          device=weight.device, dtype=dtype)
        dense.weight.copy_(weight.to(dtype))
        if bias is not None:
            dense.bias.copy_(bias.to(dtype))
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}")
