"""fastpeft: fused kernels for parameter-efficient fine-tuning.

Layers (``docs/architecture.md``): ``fastpeft.kernels`` (Triton) and ``csrc``
(C++/CUDA) hold the kernels, ``fastpeft.ops`` the autograd ops,
``fastpeft.nn`` thin modules; ``fastpeft.injection`` swaps modules of an
existing model in one call (LoRA, QLoRA, bottleneck adapters);
``fastpeft.integrations.peft`` moves LoRA adapters to and from the HF PEFT
format and makes fastpeft a backend of HF PEFT; ``fastpeft.integrations.adapterhub``
reads and writes AdapterHub's checkpoints.
"""
from . import nn, ops
from .injection import (adapter_fusion_regularization_loss, adapter_parameters, apply_adapter, apply_adapter_fusion,
                        apply_lora, apply_qlora, lora_parameters, merge_lora, replace_modules, set_active_adapter,
                        set_adapter_drop, unload_lora, unmerge_lora)
from .integrations.adapterhub import load_adapter, load_adapter_fusion, save_adapter, save_adapter_fusion
from .integrations.peft.format import load_lora, save_lora
from .quant import NF4Weight

__version__ = "0.1.0"

__all__ = [
    "NF4Weight",
    "__version__",
    "adapter_fusion_regularization_loss",
    "adapter_parameters",
    "apply_adapter",
    "apply_adapter_fusion",
    "apply_lora",
    "apply_qlora",
    "load_adapter",
    "load_adapter_fusion",
    "load_lora",
    "lora_parameters",
    "merge_lora",
    "nn",
    "ops",
    "replace_modules",
    "save_adapter",
    "save_adapter_fusion",
    "save_lora",
    "set_active_adapter",
    "set_adapter_drop",
    "unload_lora",
    "unmerge_lora",
]
