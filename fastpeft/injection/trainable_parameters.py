"""``print_trainable_parameters``: PEFT's one-line count of what trains, for any model fastpeft prepared.

Counted as ``PeftModel.get_nb_trainable_parameters`` counts: every parameter
once (tied ones once), and a 4-bit base weight as the ``out × in`` values it
stores (PEFT doubles bitsandbytes' packed bytes; fastpeft's ``NF4Linear``
holds its packed bytes in a buffer, counted here the same way), so a QLoRA
model prints PEFT's figure.
"""
from __future__ import annotations

from torch import nn

from ..nn.nf4 import NF4Linear


def trainable_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable parameters, all parameters)`` of ``model``, as PEFT counts them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for param in model.parameters():
        numel = param.numel()
        if type(param).__name__ == "Params4bit":  # bitsandbytes: packed bytes, two 4-bit values each
            numel *= 2 * param.element_size()
        total += numel
        if param.requires_grad:
            trainable += numel
    total += sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: N || all params: M || trainable%: P`` in PEFT's wording and format."""
    trainable, total = trainable_parameter_counts(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / total:.4f}")
