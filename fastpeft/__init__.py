"""fastpeft: fused kernels for parameter-efficient fine-tuning.

Layers (``docs/architecture.md``): ``fastpeft.kernels`` (Triton) and ``csrc``
(C++/CUDA) hold the kernels, ``fastpeft.ops`` the autograd ops,
``fastpeft.nn`` thin modules; ``fastpeft.injection`` swaps modules of an
existing model in one call; ``fastpeft.integrations.peft`` moves adapters to
and from the HF PEFT format and makes fastpeft a backend of HF PEFT.
"""
from . import nn, ops
from .injection import (apply_lora, apply_qlora, lora_parameters, merge_lora, replace_modules, unload_lora,
                        unmerge_lora)
from .integrations.peft.format import load_lora, save_lora
from .quant import NF4Weight

__version__ = "0.1.0"

__all__ = [
    "NF4Weight",
    "__version__",
    "apply_lora",
    "apply_qlora",
    "load_lora",
    "lora_parameters",
    "merge_lora",
    "nn",
    "ops",
    "replace_modules",
    "save_lora",
    "unload_lora",
    "unmerge_lora",
]
