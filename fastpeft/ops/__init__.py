"""Functional ops and their autograd Functions (DESIGN.md §2)."""
from .lora import LoRALinearFunction, lora_dropout_mask, lora_linear

__all__ = ["LoRALinearFunction", "lora_dropout_mask", "lora_linear"]
