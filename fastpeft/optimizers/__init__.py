"""Optimizers for LoRA training (``docs/architecture.md`` §9): LoRA+ and LoRA-FA, with HF PEFT's rules.

``create_loraplus_optimizer`` builds PEFT's LoRA+ parameter groups (B at
``lr · loraplus_lr_ratio``); ``create_lorafa_optimizer`` freezes every A and
returns PEFT's LoRA-FA optimizer (B's gradient projected through ``(A Aᵀ)⁻¹``),
switching plain dense LoRA layers to the ``lorafa`` variant, whose op keeps
``h = drop(x) Aᵀ`` instead of x for the backward.
"""
from .lorafa import LoraFAOptimizer, create_lorafa_optimizer
from .loraplus import create_loraplus_optimizer

__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer", "create_loraplus_optimizer"]
