"""fastpeft: fused kernels for parameter-efficient fine-tuning.

Layers (``docs/architecture.md``): ``fastpeft.kernels`` (Triton) and ``csrc``
(C++/CUDA) hold the kernels, ``fastpeft.ops`` the autograd ops,
``fastpeft.nn`` thin modules; ``fastpeft.injection`` swaps modules of an
existing model in one call (LoRA, QLoRA, bottleneck adapters, prefix tuning,
prompt tuning, P-tuning); ``fastpeft.integrations.peft`` moves adapters to and
from the HF PEFT format (``load_peft``/``save_peft``) and makes fastpeft a
backend of HF PEFT; ``fastpeft.integrations.adapterhub``
reads and writes AdapterHub's checkpoints.
"""
from . import nn, ops
from .injection import (adapter_fusion_regularization_loss, adapter_parameters, apply_adalora, apply_adapter,
                        apply_adapter_fusion,
                        apply_lora, apply_prefix_tuning, apply_prompt_tuning, apply_qlora, lora_drop, lora_parameters,
                        merge_and_unload, merge_lora, print_trainable_parameters, prompt_parameters, replace_modules,
                        set_active_adapter, set_adapter_drop, unload_lora, unmerge_lora, update_and_allocate)
from .integrations.adapterhub import load_adapter, load_adapter_fusion, save_adapter, save_adapter_fusion
from .integrations.peft.accelerate import accelerate, restore
from .integrations.peft.checkpoints import load_peft, save_peft
from .integrations.peft.lora_format import load_lora, load_qlora, save_lora
from .optimizers import create_lorafa_optimizer, create_loraplus_optimizer
from .quant import NF4Weight

__version__ = "0.1.0"

__all__ = [
    "accelerate",
    "NF4Weight",
    "__version__",
    "adapter_fusion_regularization_loss",
    "adapter_parameters",
    "apply_adalora",
    "apply_adapter",
    "apply_adapter_fusion",
    "apply_lora",
    "apply_prefix_tuning",
    "apply_prompt_tuning",
    "apply_qlora",
    "create_lorafa_optimizer",
    "create_loraplus_optimizer",
    "load_adapter",
    "load_adapter_fusion",
    "load_lora",
    "load_peft",
    "lora_drop",
    "load_qlora",
    "lora_parameters",
    "merge_and_unload",
    "merge_lora",
    "nn",
    "ops",
    "print_trainable_parameters",
    "prompt_parameters",
    "replace_modules",
    "restore",
    "save_adapter",
    "save_adapter_fusion",
    "save_lora",
    "save_peft",
    "set_active_adapter",
    "set_adapter_drop",
    "unload_lora",
    "unmerge_lora",
    "update_and_allocate",
]
