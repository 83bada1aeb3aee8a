"""PEFT's ``modules_to_save`` in a model: which modules it names, and wrapping them in ``ModulesToSave``.

The wrapper itself (a frozen original beside the trainable copy, PEFT's
parameter names) is ``fastpeft.nn.modules_to_save``.
"""
from __future__ import annotations

from torch import nn

from ..nn.modules_to_save import ModulesToSave
from .targets import is_under_modules_to_save, set_submodule


def modules_to_save_names(model: nn.Module, modules_to_save, allow_wrapped: bool = False,
                          skip_missing: bool = False) -> list[str]:
    """The outermost modules of ``model`` that PEFT's ``modules_to_save`` names (ValueError for an unmatched
    entry unless ``skip_missing``; TypeError for one already wrapped unless ``allow_wrapped``).

    ``skip_missing`` is PEFT's rule for a saved config: PEFT's SEQ_CLS task adds
    ``["classifier", "score", "pre_classifier"]`` and wraps only the names the model has."""
    if isinstance(modules_to_save, str) or not all(isinstance(m, str) and m for m in modules_to_save):
        raise TypeError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    names = [n for n, _ in model.named_modules() if n and is_under_modules_to_save(n, modules_to_save)]
    unmatched = [m for m in modules_to_save if not any(is_under_modules_to_save(n, [m]) for n in names)]
    if unmatched and not skip_missing:
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
