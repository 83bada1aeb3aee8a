"""Put LoRA layers into an existing model, in place (the drop-in path).

Target matching follows HF PEFT so that one ``target_modules`` value means the
same thing here and there: a list/tuple/set of names matches a module whose
full name equals an entry or ends with ``"." + entry``; a single string is a
regular expression that must match the full module name (``re.fullmatch``).

``replace_modules`` is the generic piece (find targets, swap each for what a
factory returns); ``apply_lora`` builds on it, and so can other injectors
(e.g. QLoRA).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from .nn.lora import InitLoraWeights, LoRALinear, is_lora_target, validate_lora_hyperparameters

TargetModules = Union[str, Iterable[str]]


def _normalize_targets(target_modules) -> Union[str, tuple[str, ...]]:
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules is not a valid regular expression: {exc}") from None
        return target_modules
    if isinstance(target_modules, (bytes, dict)) or not isinstance(target_modules, Iterable):
        raise TypeError(
            f"target_modules must be a str (regex) or a list of module names, got {type(target_modules).__name__}"
        )
    targets = tuple(target_modules)
    if not targets:
        raise ValueError("target_modules is empty; name at least one module")
    for t in targets:
        if not isinstance(t, str) or not t:
            raise TypeError(f"target_modules entries must be non-empty str, got {t!r}")
    return targets


def _matching_entry(name: str, targets: Union[str, tuple[str, ...]]):
    """The entry of ``targets`` that ``name`` matches (the regex itself for a str), or None."""
    if isinstance(targets, str):
        return targets if re.fullmatch(targets, name) else None
    for t in targets:
        if name == t or name.endswith("." + t):
            return t
    return None


def matches_target(name: str, target_modules: TargetModules) -> bool:
    """Whether the module called ``name`` is selected by ``target_modules`` (PEFT's rule)."""
    return _matching_entry(name, _normalize_targets(target_modules)) is not None


def find_target_modules(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """Names of the modules of ``model`` selected by ``target_modules``, in ``named_modules`` order.

    Raises ValueError naming every target (list entry, or the regex) that matches nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = _normalize_targets(target_modules)
    names, used = [], set()
    for name, _ in model.named_modules():
        if not name:
            continue
        entry = _matching_entry(name, targets)
        if entry is not None:
            names.append(name)
            used.add(entry)
    if isinstance(targets, str):
        unused = [] if used else [targets]
    else:
        unused = [t for t in targets if t not in used]
    if unused:
        raise ValueError(f"target_modules: no module of the model matches {unused}")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_modules(model: nn.Module, target_modules: TargetModules,
                    make_replacement: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace every module selected by ``target_modules`` with ``make_replacement(name, module)``.

    All targets are found before anything is replaced, so the new modules (which
    usually contain the old one) are never matched again. A target nested in
    another target is replaced first (deepest first), then its ancestor sees the
    new child. Returns the replaced names. Errors: see ``find_target_modules``;
    ``make_replacement`` may raise to reject a module (its error propagates).
    """
    if not callable(make_replacement):
        raise TypeError(f"make_replacement must be callable, got {type(make_replacement).__name__}")
    names = find_target_modules(model, target_modules)
    for name in sorted(names, key=lambda n: n.count("."), reverse=True):
        new = make_replacement(name, model.get_submodule(name))
        if not isinstance(new, nn.Module):
            raise TypeError(f"make_replacement returned {type(new).__name__} for {name!r}, not an nn.Module")
        _set_submodule(model, name, new)
    return names


def apply_lora(model: nn.Module, target_modules: TargetModules, r: int = 8, lora_alpha: float = 8,
               lora_dropout: float = 0.0, use_rslora: bool = False,
               init_lora_weights: InitLoraWeights = True, lora_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Wrap every targeted ``nn.Linear``/``Conv1D`` of ``model`` in a ``LoRALinear``, in place.

    Every parameter except the new LoRA ones is frozen (PEFT's ``bias="none"``).
    ``lora_dtype`` (default: each base weight's dtype) is the LoRA parameters'
    dtype, e.g. ``torch.float32`` adapters on a bf16 model. Returns ``model``.
    Raises ValueError for a target that matches nothing and TypeError for a
    matched module that is not Linear/Conv1D (or already LoRA); the model is
    left untouched when anything is rejected.
    """
    validate_lora_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights)
    names = find_target_modules(model, target_modules)
    check_lora_targets(model, names)

    def make(name: str, module: nn.Module) -> nn.Module:
        return LoRALinear.from_linear(module, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                      use_rslora=use_rslora, init_lora_weights=init_lora_weights,
                                      lora_dtype=lora_dtype)

    replace_modules(model, target_modules, make)
    mark_only_lora_trainable(model)
    return model


def check_lora_targets(model: nn.Module, names: Iterable[str]) -> None:
    """TypeError naming the first of ``names`` that ``LoRALinear`` cannot wrap."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise TypeError(f"target_modules: {name!r} already is a LoRALinear")
        if not is_lora_target(module):
            raise TypeError(
                f"target_modules: {name!r} is a {type(module).__name__}; LoRA wraps only nn.Linear and Conv1D"
            )


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter of ``model`` except the LoRA ones (which become trainable)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(name, module)`` of every ``LoRALinear`` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters (``lora_A.weight``, ``lora_B.weight`` of each layer)."""
    params = []
    for _, m in lora_modules(model):
        params += [m.lora_A.weight, m.lora_B.weight]
    return params


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (inference without LoRA overhead)."""
    for _, m in lora_modules(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``."""
    for _, m in lora_modules(model):
        m.unmerge()
    return model
