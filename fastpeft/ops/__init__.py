"""Functional ops and their autograd Functions (DESIGN.md §2)."""
from .lora import LoRALinearFunction, lora_dropout_mask, lora_linear
from .nf4 import NF4LinearFunction, nf4_linear
from .qlora import QLoRALinearFunction, qlora_linear

__all__ = [
    "LoRALinearFunction",
    "NF4LinearFunction",
    "QLoRALinearFunction",
    "lora_dropout_mask",
    "lora_linear",
    "nf4_linear",
    "qlora_linear",
]
