"""PEFT's ``modules_to_save`` wrapper: a whole module trained (and saved) next to the adapter, e.g. a new head.

``ModulesToSave`` holds the frozen original (``original_module``) and a
trainable copy (``modules_to_save.default``) that forward runs: the parameter
names of PEFT's ``ModulesToSaveWrapper``, so state dicts line up with a PEFT
model. In a saved adapter the copy's tensors are written as PEFT writes them,
``base_model.model.<module>.<parameter>`` (the adapter part of the name
stripped), and ``modules_to_save`` is listed in the config. Which modules get
wrapped is ``fastpeft.injection.modules_to_save``.
"""
from __future__ import annotations

import copy

from torch import nn

ADAPTER_NAME = "default"


class ModulesToSave(nn.Module):
    """A frozen ``original_module`` plus the trainable copy ``modules_to_save.default`` that forward runs."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if isinstance(module, ModulesToSave):
            raise TypeError("module already is a ModulesToSave wrapper")
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({ADAPTER_NAME: copy.deepcopy(module)})
        self.original_module.requires_grad_(False)
        self.trainable_copy.requires_grad_(True)

    @property
    def trainable_copy(self) -> nn.Module:
        return self.modules_to_save[ADAPTER_NAME]

    def forward(self, *args, **kwargs):
        return self.trainable_copy(*args, **kwargs)

    def unwrap(self) -> nn.Module:
        """The trained copy, as a plain module (for serving)."""
        return self.trainable_copy


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    """``(name, wrapper)`` of every ``ModulesToSave`` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]

