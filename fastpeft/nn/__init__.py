"""Thin ``nn.Module`` wrappers around the fastpeft ops (DESIGN.md §2).

Modules hold parameters, initialisation, merge/unmerge and repr; the maths is
done by ``fastpeft.ops``.
"""
from .lora import LoRALinear

__all__ = ["LoRALinear"]
