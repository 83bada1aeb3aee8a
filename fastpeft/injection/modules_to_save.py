"""PEFT's ``modules_to_save``: whole modules trained (and saved) next to the adapter, e.g. a new head.

``ModulesToSave`` replaces such a module with a wrapper holding the frozen
original (``original_module``) and a trainable copy
(``modules_to_save.default``) that forward runs: the parameter names of PEFT's
``ModulesToSaveWrapper``, so state dicts line up with a PEFT model. In a
saved adapter (``fastpeft.save_lora``) the copy's tensors are written as PEFT
writes them, ``base_model.model.<module>.<parameter>`` (the adapter part of
the name stripped), and ``modules_to_save`` is listed in the config.
"""
from __future__ import annotations

import copy

from torch import nn

from .targets import is_under_modules_to_save, set_submodule

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


def modules_to_save_names(model: nn.Module, modules_to_save, allow_wrapped: bool = False) -> list[str]:
    """The outermost modules of ``model`` that PEFT's ``modules_to_save`` names (ValueError for an unmatched
    entry; TypeError for one already wrapped unless ``allow_wrapped``)."""
    if isinstance(modules_to_save, str) or not all(isinstance(m, str) and m for m in modules_to_save):
        raise TypeError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    names = [n for n, _ in model.named_modules() if n and is_under_modules_to_save(n, modules_to_save)]
    unmatched = [m for m in modules_to_save if not any(is_under_modules_to_save(n, [m]) for n in names)]
    if unmatched:
        raise ValueError(f"modules_to_save: no module of the model matches {unmatched}")
    outermost = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    for name in outermost:
        if isinstance(model.get_submodule(name), ModulesToSave) and not allow_wrapped:
            raise TypeError(f"modules_to_save: {name!r} already is a ModulesToSave wrapper")
    return outermost


def wrap_modules_to_save(model: nn.Module, names) -> None:
    """Wrap each named module in ``ModulesToSave`` (names from ``modules_to_save_names``)."""
    for name in names:
        set_submodule(model, name, ModulesToSave(model.get_submodule(name)))


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    """``(name, wrapper)`` of every ``ModulesToSave`` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]

