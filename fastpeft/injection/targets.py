"""Which modules of a model a method targets, and swapping them: shared by every injector.

Target matching follows HF PEFT so that one ``target_modules`` value means the
same thing here and there: a list/tuple/set of names matches a module whose
full name equals an entry or ends with ``"." + entry``; a single string is a
regular expression that must match the full module name (``re.fullmatch``).

``replace_modules`` is the generic piece (find targets, swap each for what a
factory returns); each method's injector (``lora.py``, ``qlora.py``, ...)
builds on it.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Union

from torch import nn

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


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
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
        set_submodule(model, name, new)
    return names
