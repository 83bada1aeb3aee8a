"""LoRA-drop: keep LoRA on the layers whose LoRA output matters, one shared pair per layer type for the rest.

The method (Zhou et al., "LoRA-drop: Efficient LoRA Parameter Pruning based
on Output Evaluation", COLING 2025), in our words: after LoRA has trained
briefly, run a data sample through the model and measure, for each LoRA layer
i, the squared norm of its LoRA output ``‖s·(x Aᵢᵀ) Bᵢᵀ‖²`` per token,
averaged over every token of the sample (eval mode: no dropout). Normalise
these importances to sum 1, sort the layers by importance, and keep the most
important ones until their cumulative importance reaches ``threshold``. Every
other layer gives up its own pair: the dropped layers of one type (the last
part of the module name, e.g. ``q_proj``, and the same shape) share one LoRA
pair, the pair of the most important among them, so the model trains fewer
parameters. A shared pair is one parameter set: each layer's gradient adds
into it.

``save_lora`` writes the shared pair under every layer's name, so the
checkpoint is plain PEFT LoRA (PEFT and ``load_lora`` load it, each layer
then holding its own copy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .lora import lora_modules


@dataclass
class LoraDropPlan:
    """What ``lora_drop`` measured and did: normalised importance per layer name, the kept layers (most
    important first) and, per shared pair, the layer that owns it and the layers that share it."""

    importance: dict[str, float]
    kept: list[str]
    shared: dict[str, list[str]] = field(default_factory=dict)


def lora_drop(model: nn.Module, batches, threshold: float = 0.9) -> LoraDropPlan:
    """Measure each LoRA layer's output importance on ``batches`` and share one pair among the unimportant.

    ``batches``: a non-empty iterable of model inputs (a tensor, passed as
    ``model(batch)``, or a dict, passed as ``model(**batch)``). ``threshold``
    in (0, 1]: the cumulative importance the kept layers reach. Returns the
    ``LoraDropPlan`` after applying it. ValueError, before anything changes,
    for a model without plain LoRA layers (other variants), an empty sample,
    a bad threshold or a sample on which every LoRA output is zero.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a real number in (0, 1], got {type(threshold).__name__}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    layers = lora_modules(model)
    if not layers:
        raise ValueError("model: LoRA-drop needs a model with LoRA layers (fastpeft.apply_lora)")
    odd = [name for name, layer in layers if layer.variant.name != "lora" or layer._merged]
    if odd:
        raise ValueError(f"model: LoRA-drop shares plain, unmerged LoRA pairs; these layers are not: {odd[:3]}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches: LoRA-drop needs a non-empty data sample")
    importance = normalised(lora_output_importance(model, layers, batches))
    kept = kept_layers(importance, threshold)
    shared = share_pairs(dict(layers), importance, kept)
    return LoraDropPlan(importance, kept, shared)


@torch.no_grad()
def lora_output_importance(model: nn.Module, layers, batches) -> dict[str, float]:
    """``{name: mean over the sample's tokens of ‖s·(x Aᵀ) Bᵀ‖²}`` (model in eval mode while it runs)."""
    sums = {name: 0.0 for name, _ in layers}
    counts = dict.fromkeys(sums, 0)

    def hook_for(name):
        def hook(layer, args, _output):
            x = args[0].reshape(-1, layer.in_features)
            dtype = torch.promote_types(x.dtype, torch.float32)
            h = x.to(dtype) @ layer.lora_A.weight.to(dtype).t()
            out = (h @ layer.lora_B.weight.to(dtype).t()) * layer.scaling
            sums[name] += out.square().sum().item()
            counts[name] += x.shape[0]
        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers]
    was_training = model.training
    try:
        model.eval()
        for batch in batches:
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def normalised(importance: dict[str, float]) -> dict[str, float]:
    """The importances divided by their sum; ValueError when the sum is zero or not finite."""
    total = sum(importance.values())
    if not math.isfinite(total) or total <= 0.0:
        raise ValueError(f"batches: the LoRA outputs' total squared norm on the sample is {total}; "
                         "LoRA-drop needs LoRA trained briefly (B non-zero) and finite outputs")
    return {name: value / total for name, value in importance.items()}


def kept_layers(importance: dict[str, float], threshold: float) -> list[str]:
    """The most important layers, in decreasing importance, until their sum first reaches ``threshold``."""
    kept, total = [], 0.0
    for name in sorted(importance, key=importance.get, reverse=True):
        if total >= threshold:
            break
        kept.append(name)
        total += importance[name]
    return kept


def layer_type(name: str, layer: nn.Module) -> tuple:
    """The sharing group of a layer: its module name's last part and its shape."""
    return name.rsplit(".", 1)[-1], layer.in_features, layer.out_features, layer.r


def share_pairs(layers: dict, importance: dict[str, float], kept: list[str]) -> dict[str, list[str]]:
    """Give each group of dropped layers the pair of its most important member; ``{owner: [sharers]}``."""
    groups: dict[tuple, list[str]] = {}
    for name in sorted(layers, key=importance.get, reverse=True):
        if name not in kept:
            groups.setdefault(layer_type(name, layers[name]), []).append(name)
    shared = {}
    for owner, *sharers in groups.values():
        for name in sharers:
            layers[name].lora_A = layers[owner].lora_A
            layers[name].lora_B = layers[owner].lora_B
        shared[owner] = sharers
    return shared
