"""Thin ``nn.Module`` wrappers around the fastpeft ops (see ``docs/architecture.md``).

Modules hold parameters, initialisation, merge/unmerge and repr; the maths is
done by ``fastpeft.ops``. Every module with trainable PEFT parameters follows
the protocol of ``fastpeft.nn.base.PeftLayer``. One file per op, as in
``fastpeft.ops``, plus the adapter configurations (AdapterHub's field names)
and the prompt-learning layers (``prompt_learning``: their shared protocol).
"""
from .adapter import BottleneckAdapter
from .adapter_config import ADAPTER_PRESETS, BnConfig
from .adapter_fusion import FUSION_PRESETS, AdapterFusion, AdapterFusionConfig
from .base import PEFT_LAYER_KINDS, PeftLayer, peft_layers
from .lora import LoraLayer, LoRALinear
from .nf4 import NF4Linear
from .prefix_encoder import PrefixEncoder
from .prompt_encoder import PromptEmbedding, PromptEncoder
from .prompt_learning import PromptLearningLayer, prompt_learning_layer
from .qlora import QLoRALinear

__all__ = ["ADAPTER_PRESETS", "AdapterFusion", "AdapterFusionConfig", "BnConfig", "BottleneckAdapter",
           "FUSION_PRESETS", "LoRALinear", "LoraLayer", "NF4Linear", "PEFT_LAYER_KINDS", "PeftLayer", "PrefixEncoder",
           "PromptEmbedding", "PromptEncoder", "PromptLearningLayer", "QLoRALinear", "peft_layers",
           "prompt_learning_layer"]
