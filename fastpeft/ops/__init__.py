"""Functional ops and their autograd Functions (see ``docs/architecture.md``, "Ops").

One file per op (``<op>.py``: validation, autograd, custom ops) and one CPU
implementation per op (``<op>_cpu.py``), with the Triton implementation in
``fastpeft.kernels.<op>``.
"""
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
