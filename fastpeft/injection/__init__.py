"""Put PEFT layers into an existing model, in place (the drop-in path).

``targets`` holds what every method shares (PEFT's target matching and the
swap itself); each method has one file: ``lora`` (``apply_lora`` and the
model-level LoRA helpers, which also serve QLoRA layers), ``qlora``
(``apply_qlora``).
"""
from .lora import (apply_lora, check_lora_targets, lora_modules, lora_parameters, mark_only_lora_trainable,
                   merge_lora, unload_lora, unmerge_lora)
from .qlora import apply_qlora
from .targets import TargetModules, find_target_modules, matches_target, replace_modules

__all__ = [
    "TargetModules",
    "apply_lora",
    "apply_qlora",
    "check_lora_targets",
    "find_target_modules",
    "lora_modules",
    "lora_parameters",
    "mark_only_lora_trainable",
    "matches_target",
    "merge_lora",
    "replace_modules",
    "unload_lora",
    "unmerge_lora",
]
