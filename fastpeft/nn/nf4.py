"""``NF4Linear``: a frozen linear layer whose weight is 4-bit NormalFloat (bitsandbytes' layout).

The quantized weight lives in buffers named as bitsandbytes names them
(``weight`` packed uint8, ``weight_absmax``, ``weight_code`` and, with double
quantization, ``weight_nested_absmax`` / ``weight_nested_code`` /
``weight_nested_offset``), so ``.to()`` and ``state_dict`` carry it; the
arithmetic is ``fastpeft.ops.nf4_linear``. ``fastpeft.nn.qlora.QLoRALinear``
adds LoRA on top of it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops._autocast import any_autocast_enabled, autocast_dtype
from ..ops.nf4 import nf4_linear
from ..quant.nf4 import NF4Weight
from .base import module_parameter



def _version(t: torch.Tensor) -> int:
    """The tensor's in-place write counter (``copy_`` etc. bump it); inference tensors have none."""
    return -1 if t.is_inference() else t._version


# The quantization buffers, in the order ``_buffers_and_key`` returns them.
_NF4_BUFFERS = ("weight", "weight_absmax", "weight_code", "weight_nested_absmax", "weight_nested_code",
                "weight_nested_offset")


def _rebuild_after_load(module: "NF4Linear", incompatible_keys) -> None:
    module._rebuild_nf4_weight()


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
        self.register_load_state_dict_post_hook(_rebuild_after_load)  # a module-level function: picklable

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
        """The quantization buffers and a key that changes when any is replaced or written in place.

        Read from ``_buffers`` directly: this runs on every forward, and
        attribute access to an absent buffer (no double quantization) would
        raise and catch an AttributeError each time.
        """
        found = self._buffers.get
        buffers = tuple(found(name) for name in _NF4_BUFFERS)
        return buffers[:5], tuple(None if t is None else (t.data_ptr(), t.device, t.dtype, _version(t))
                                  for t in buffers)

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
        buffer replaced by assignment or written in place (``copy_``: its
        version counter moves) is noticed and the view rebuilt, so the fp32
        block scales decoded from double quantization are never stale.
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
        """The bias in the compute dtype for x: autocast's for ``linear`` when active, else x's
        (a differentiable cast when they differ)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        dtype = (any_autocast_enabled() and autocast_dtype(x)) or x.dtype
        bias = module_parameter(self, "bias")
        if bias is None or bias.dtype is dtype:
            return bias
        return bias.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.nf4_weight, self.bias_for(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, dtype={self.weight_dtype}")
