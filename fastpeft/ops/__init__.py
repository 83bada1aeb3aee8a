"""Functional ops and their autograd Functions (see ``docs/architecture.md``, "Ops").

One file per op (``<op>.py``: validation, autograd, custom ops, the functional
API) and the dispatch shared by all of them; the implementations live on the
floor below: Triton in ``fastpeft.kernels.<op>``, CPU in ``fastpeft.cpu.<op>``.
"""
from .adapter import BottleneckAdapterFunction, adapter_dropout_mask, bottleneck_adapter
from .dora import DoRALinearFunction, dora_linear
from .lora import LoRALinearFunction, lora_dropout_mask, lora_linear
from .nf4 import NF4LinearFunction, nf4_linear
from .prefix_attention import PrefixAttentionFunction, prefix_attention
from .qlora import QLoRALinearFunction, qlora_linear

__all__ = [
    "BottleneckAdapterFunction",
    "DoRALinearFunction",
    "LoRALinearFunction",
    "NF4LinearFunction",
    "PrefixAttentionFunction",
    "QLoRALinearFunction",
    "adapter_dropout_mask",
    "bottleneck_adapter",
    "dora_linear",
    "lora_dropout_mask",
    "lora_linear",
    "nf4_linear",
    "prefix_attention",
    "qlora_linear",
]
