"""Put PEFT layers into an existing model, in place (the drop-in path).

``targets`` holds what every method shares (PEFT's target matching and the
swap itself); each method has one file: ``lora`` (``apply_lora`` and the
model-level LoRA helpers, which also serve QLoRA layers), ``qlora``
(``apply_qlora``), ``adapter`` (bottleneck adapters, AdapterFusion and
AdapterDrop in BERT/RoBERTa, GPT-2 and Llama-family blocks; its parts are
``adapter_location``, ``adapter_blocks``, ``adapter_architectures`` and
``adapter_placement``),
``prefix_tuning`` (``apply_prefix_tuning``), ``prompt_tuning``
(``apply_prompt_tuning``: prompt tuning and P-tuning); ``prompt_learning``
holds the attach step both prompt methods share.
"""
from .adapter import (adapter_fusion_regularization_loss, adapter_layers, adapter_parameters, apply_adapter,
                      apply_adapter_fusion, set_active_adapter, set_adapter_drop)
from .adapter_architectures import ARCHITECTURES
from .adapter_location import AdapterLayer
from .lora import (apply_lora, check_lora_targets, lora_modules, lora_parameters, mark_only_lora_trainable,
                   merge_and_unload, merge_lora, unload_lora, unmerge_lora)
from .adalora import apply_adalora, update_and_allocate
from .lora_drop import LoraDropPlan, lora_drop
from .prefix_tuning import apply_prefix_tuning, prefix_tuning_layer
from .prompt_learning import prompt_parameters
from .prompt_tuning import apply_prompt_tuning, prompt_tuning_layer
from .qlora import apply_qlora
from .trainable_parameters import print_trainable_parameters, trainable_parameter_counts
from .targets import TargetModules, find_target_modules, matches_target, replace_modules

__all__ = [
    "ARCHITECTURES",
    "AdapterLayer",
    "LoraDropPlan",
    "TargetModules",
    "adapter_fusion_regularization_loss",
    "adapter_layers",
    "adapter_parameters",
    "apply_adapter",
    "apply_adalora",
    "apply_adapter_fusion",
    "apply_lora",
    "apply_prefix_tuning",
    "apply_prompt_tuning",
    "apply_qlora",
    "check_lora_targets",
    "find_target_modules",
    "lora_drop",
    "lora_modules",
    "lora_parameters",
    "mark_only_lora_trainable",
    "matches_target",
    "merge_and_unload",
    "merge_lora",
    "prefix_tuning_layer",
    "print_trainable_parameters",
    "prompt_parameters",
    "prompt_tuning_layer",
    "replace_modules",
    "set_active_adapter",
    "set_adapter_drop",
    "trainable_parameter_counts",
    "unload_lora",
    "unmerge_lora",
    "update_and_allocate",
]
