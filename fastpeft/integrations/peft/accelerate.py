"""``accelerate`` / ``restore``: make an existing HF PEFT model run fastpeft's fused ops, in place, and back.

A model that ``get_peft_model`` or ``PeftModel.from_pretrained`` built holds
PEFT's ``lora.Linear`` layers. ``FastLoraLinear`` (``backend``) is that same
class with a forward that runs ``fastpeft.ops.lora_linear`` /
``dora_linear`` when it can and PEFT's forward otherwise; it adds no state.
So ``accelerate`` changes each layer's class to ``FastLoraLinear`` and
nothing else: parameters, buffers, adapters and PEFT's API
(``save_pretrained``, ``merge_and_unload``, ``set_adapter``,
``disable_adapter``) are PEFT's own, and ``restore`` puts the original class
back. Every PEFT layer is checked before any changes; a layer fastpeft cannot
serve (LoRA on a quantised, embedding or convolution base, another PEFT
method) is refused with its name and the reason. Prompt learning adds no PEFT
layer to swap: a model whose only method is prompt learning is refused too.
"""
from __future__ import annotations

from torch import nn

_ORIGINAL_CLASS = "_fastpeft_original_class"


def accelerate(model: nn.Module) -> nn.Module:
    """Swap fastpeft's fused LoRA/DoRA forward into every PEFT LoRA layer of ``model`` (in place); returns it.

    ValueError (nothing changed) when a PEFT layer cannot be served, naming the
    layer and the reason, or when ``model`` has no PEFT LoRA layer at all.
    """
    from .backend import FastLoraLinear

    plan = _plan(model)
    for _, layer in plan:
        if type(layer) is not FastLoraLinear:
            layer.__dict__[_ORIGINAL_CLASS] = type(layer)
            layer.__class__ = FastLoraLinear
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: every layer it swapped gets its original PEFT class back; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        original = module.__dict__.pop(_ORIGINAL_CLASS, None)
        if original is not None:
            module.__dict__.pop("_dora_weight_norm_sq", None)  # FastLoraLinear's DoRA cache
            module.__class__ = original
    return model


def _plan(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The PEFT LoRA layers to swap, after checking every PEFT layer of ``model``."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .backend import FastLoraLinear, FusedLoraTarget

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers, refused = [], []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        reason = None
        if type(module) not in (PeftLoraLinear, FastLoraLinear):
            reason = (f"{type(module).__module__}.{type(module).__qualname__} is not PEFT's LoRA on a "
                      "Linear/Conv1D (fastpeft accelerates lora.Linear only)")
        elif not isinstance(module.get_base_layer(), FusedLoraTarget):
            base = module.get_base_layer()
            reason = (f"its base {type(base).__name__} is not a plain nn.Linear/Conv1D with a floating weight "
                      "(quantised or custom bases keep PEFT's layer)")
        if reason:
            refused.append(f"{name}: {reason}")
        else:
            layers.append((name, module))
    if refused:
        raise ValueError("fastpeft.accelerate cannot serve these PEFT layers (nothing was changed):\n  "
                         + "\n  ".join(refused[:10]))
    if not layers:
        method = getattr(getattr(model, "active_peft_config", None), "peft_type", None)
        detail = f" (its method is {method}: prompt learning adds no layer to swap)" if method else ""
        raise ValueError(f"model has no PEFT LoRA layer to accelerate{detail}")
    return layers
