"""Thin ``nn.Module`` wrappers around the fastpeft ops (DESIGN.md §2).

Modules hold parameters, initialisation, merge/unmerge and repr; the maths is
done by ``fastpeft.ops``.
"""
from .lora import LoRALinear
from .nf4 import NF4Linear, QLoRALinear

__all__ = ["LoRALinear", "NF4Linear", "QLoRALinear"]
