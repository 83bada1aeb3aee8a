"""Which modules of a model a method targets, and swapping them: shared by every injector.

Target matching follows HF PEFT (``peft.tuners.tuners_utils.check_target_module_exists``)
so that one set of arguments means the same thing here and there:

- ``target_modules``: a list/tuple/set of names matches a module whose full
  name equals an entry or ends with ``"." + entry``; a single string is a
  regular expression that must match the *full* module name (``re.fullmatch``:
  ``"q_proj"`` matches only a top-level module called ``q_proj``, use
  ``r".*\\.q_proj"`` or ``["q_proj"]`` for every layer's); ``"all-linear"``
  selects every ``nn.Linear`` / transformers ``Conv1D`` except the output head
  (``model.get_output_embeddings()``, as PEFT decides it).
- ``exclude_modules``: the same kinds of values; a matching module is left out.
- ``layers_to_transform`` (an int or a list of ints) keeps only modules in those
  layer indices: the first number after ``<layers_pattern>.`` in the name (any
  ``<segment>.<number>.`` when ``layers_pattern`` is None). As in PEFT it needs
  a list ``target_modules``, and ``layers_pattern`` needs ``layers_to_transform``.
- ``modules_to_save``: modules under these names are never targets (they get
  trainable copies instead, see ``fastpeft.injection.modules_to_save``).

Modules inside fastpeft's own PEFT layers (a ``LoRALinear``'s ``base_layer``,
``lora_A``, ``lora_B``, ...) are never targets: selecting one is a TypeError.

``replace_modules`` is the generic swap: every target is found first, then
replaced; when a replacement fails the model is put back as it was (modules
and ``requires_grad`` flags), so a rejected call leaves no half-converted model.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Optional, Sequence, Union

from torch import nn

from ..nn.base import PeftLayer
from .regex_safety import check_regex

TargetModules = Union[str, Iterable[str]]
ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class TargetSelection:
    """PEFT's targeting arguments, validated (see the module docstring)."""

    target_modules: Union[str, tuple[str, ...]]
    exclude_modules: Union[None, str, tuple[str, ...]] = None
    layers_to_transform: Optional[tuple[int, ...]] = None
    layers_pattern: Optional[tuple[str, ...]] = None
    modules_to_save: Optional[tuple[str, ...]] = None

    @classmethod
    def of(cls, target_modules, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
           modules_to_save=None) -> "TargetSelection":
        targets = _normalize_names("target_modules", target_modules)
        layers = _normalize_layers(layers_to_transform)
        patterns = None if layers_pattern is None else _normalize_names("layers_pattern", layers_pattern, regex=False)
        if isinstance(patterns, str):
            patterns = (patterns,)
        if layers is not None and isinstance(targets, str):
            raise ValueError("layers_to_transform cannot be used when target_modules is a str (as in PEFT); "
                             "give target_modules as a list of names")
        if patterns is not None and layers is None:
            raise ValueError("layers_pattern needs layers_to_transform (as in PEFT)")
        exclude = None if exclude_modules is None else _normalize_names("exclude_modules", exclude_modules)
        save = None
        if modules_to_save is not None:
            save = _normalize_names("modules_to_save", modules_to_save, regex=False)
            save = (save,) if isinstance(save, str) else save
        for what, pieces in (("layers_pattern", patterns), ("modules_to_save", save)):
            for piece in pieces or ():  # each is spliced into a regex (layer_index, is_under_modules_to_save)
                check_regex(f"{what} entry", piece)
        return cls(targets, exclude, layers, patterns, save)

    def selects(self, name: str) -> bool:
        """PEFT's decision for the module called ``name`` (all-linear resolved by the caller)."""
        if self.exclude_modules is not None and _matches(name, self.exclude_modules):
            return False
        if self.modules_to_save is not None and is_under_modules_to_save(name, self.modules_to_save):
            return False
        if _matches(name, self.target_modules) is None:
            return False
        if self.layers_to_transform is None or isinstance(self.target_modules, str) or name in self.target_modules:
            return True
        index = layer_index(name, self.layers_pattern)
        return index is not None and index in self.layers_to_transform


def _normalize_names(what: str, value, regex: bool = True) -> Union[str, tuple[str, ...]]:
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{what} is an empty string")
        if regex:
            check_regex(what, value)
        return value
    if isinstance(value, (bytes, dict)) or not isinstance(value, Iterable):
        raise TypeError(f"{what} must be a str (full-match regex) or a list of module names, "
                        f"got {type(value).__name__}")
    names = tuple(value)
    if not names:
        raise ValueError(f"{what} is empty; name at least one module")
    for t in names:
        if not isinstance(t, str) or not t:
            raise TypeError(f"{what} entries must be non-empty str, got {t!r}")
    return names


def _normalize_layers(layers) -> Optional[tuple[int, ...]]:
    if layers is None:
        return None
    if isinstance(layers, bool):
        raise TypeError("layers_to_transform must be an int or a list of ints, got bool")
    if isinstance(layers, int):
        layers = (layers,)
    if isinstance(layers, (str, bytes, dict)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers_to_transform must be an int or a list of ints, got {type(layers).__name__}")
    layers = tuple(layers)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise TypeError(f"layers_to_transform entries must be non-negative ints, got {i!r}")
    return layers or None  # PEFT: an empty list means "every layer"


def _matches(name: str, targets: Union[str, tuple[str, ...]]):
    """The entry of ``targets`` that ``name`` matches (the regex itself for a str), or None."""
    if isinstance(targets, str):
        return targets if re.fullmatch(targets, name) else None
    for t in targets:
        if name == t or name.endswith("." + t):
            return t
    return None


def layer_index(name: str, layers_pattern: Optional[tuple[str, ...]]) -> Optional[int]:
    """The layer number in a module name, PEFT's way: the first ``<pattern>.<digits>.`` (any segment if None)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return None if match is None else int(match["idx"])


def is_under_modules_to_save(name: str, modules_to_save: Iterable[str]) -> bool:
    """PEFT's test: ``name`` is, or is inside, a module named by ``modules_to_save``."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def matches_target(name: str, target_modules: TargetModules) -> bool:
    """Whether the module called ``name`` is selected by ``target_modules`` alone (PEFT's rule)."""
    return _matches(name, _normalize_names("target_modules", target_modules)) is not None


def is_linear_layer(module: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses, e.g. bitsandbytes ``Linear4bit``) or transformers ``Conv1D``."""
    from ..nn.lora import is_conv1d

    return isinstance(module, nn.Linear) or is_conv1d(module)


def all_linear_names(model: nn.Module) -> list[str]:
    """PEFT's ``"all-linear"``: every Linear/Conv1D except the output head and fastpeft layers' insides."""
    head = None
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        try:
            head = get_head()
        except (AttributeError, NotImplementedError):
            head = None
    inside = inside_peft_layers(model)
    return [name for name, module in model.named_modules()
            if name and module is not head and name not in inside and is_linear_layer(module)]


def inside_peft_layers(model: nn.Module) -> dict[str, str]:
    """``{name: owning PEFT layer name}`` for every module strictly inside a fastpeft PEFT layer."""
    inside = {}
    for owner, module in model.named_modules():
        if isinstance(module, PeftLayer):
            for sub, _ in module.named_modules():
                if sub:
                    inside.setdefault(f"{owner}.{sub}" if owner else sub, owner)
    return inside


def find_target_modules(model: nn.Module, target_modules: TargetModules, *, exclude_modules=None,
                        layers_to_transform=None, layers_pattern=None, modules_to_save=None) -> list[str]:
    """Names of the modules of ``model`` selected by PEFT's targeting arguments, in ``named_modules`` order.

    Raises ValueError when nothing at all is selected or a list entry of
    ``target_modules`` matches no module (a str is a full-match regex: the
    message says so), and TypeError when a selected module lies inside a
    fastpeft PEFT layer (``base_layer``, ``lora_A``, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    selection = TargetSelection.of(target_modules if not all_linear else ["<all-linear>"], exclude_modules,
                                   layers_to_transform, layers_pattern, modules_to_save)
    if all_linear:
        candidates = all_linear_names(model)
        selection = dataclasses.replace(selection, target_modules=tuple(candidates) or ("<none>",))
    else:
        candidates = [name for name, _ in model.named_modules() if name]
    inside = inside_peft_layers(model)
    names, used = [], set()
    for name in candidates:
        entry = _matches(name, selection.target_modules)
        if entry is not None:
            used.add(entry)
        if entry is None or not selection.selects(name):
            continue
        if name in inside:
            raise TypeError(f"target_modules selects {name!r}, which is inside fastpeft's "
                            f"{type(model.get_submodule(inside[name])).__name__} {inside[name]!r}; target the "
                            "layer itself (or pick names/regexes that do not reach into PEFT layers)")
        names.append(name)
    _check_everything_matched(model, target_modules, selection, all_linear, used, names)
    return names


def _check_everything_matched(model, target_modules, selection, all_linear, used, names) -> None:
    if all_linear:
        if not names:
            raise ValueError("target_modules='all-linear': the model has no Linear/Conv1D module to target "
                             "(besides the output head and what the other arguments exclude)")
        return
    if isinstance(selection.target_modules, str):
        if not used:
            raise ValueError(f"target_modules={target_modules!r} matches no module: a str is a regular expression "
                             "that must match the full module name (re.fullmatch, as in PEFT), e.g. "
                             rf"'.*\.{target_modules}'; or pass a list such as [{target_modules!r}] to match "
                             "names by suffix")
    else:
        unused = [t for t in selection.target_modules if t not in used]
        if unused:
            raise ValueError(f"target_modules: no module of the model matches {unused}")
    if not names:
        raise ValueError("target_modules matches modules, but exclude_modules / layers_to_transform / "
                         "modules_to_save leave none of them")


def selected_modules(model: nn.Module, selection: TargetSelection) -> list[str]:
    """Names selected by ``selection`` (``"all-linear"`` resolved), without the unmatched-entry errors:
    for loaders that compare the selection with a saved file. Modules inside PEFT layers are skipped."""
    inside = inside_peft_layers(model)
    if isinstance(selection.target_modules, str) and selection.target_modules.lower() == ALL_LINEAR:
        candidates = all_linear_names(model)
        selection = dataclasses.replace(selection, target_modules=tuple(candidates) or ("<none>",))
    else:
        candidates = [name for name, _ in model.named_modules() if name]
    return [n for n in candidates if n not in inside and selection.selects(n)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_modules(model: nn.Module, target_modules: TargetModules,
                    make_replacement: Callable[[str, nn.Module], nn.Module], **selection) -> list[str]:
    """Replace every module selected by ``target_modules`` (and ``selection``, the keyword arguments of
    ``find_target_modules``) with ``make_replacement(name, module)``; returns the replaced names.

    All targets are found before anything is replaced, so the new modules (which
    usually contain the old one) are never matched again. A target nested in
    another target is replaced first (deepest first), then its ancestor sees the
    new child. ``make_replacement`` may raise to reject a module: its error
    propagates after every module already swapped is put back and every
    ``requires_grad`` flag restored, so the model is as before the call.
    """
    if not callable(make_replacement):
        raise TypeError(f"make_replacement must be callable, got {type(make_replacement).__name__}")
    names = find_target_modules(model, target_modules, **selection)
    swap_modules(model, names, make_replacement)
    return names


def swap_modules(model: nn.Module, names: Sequence[str],
                 make_replacement: Callable[[str, nn.Module], nn.Module]) -> None:
    """``replace_modules`` for targets already found (``names``): deepest first, all or nothing."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for name in sorted(names, key=lambda n: n.count("."), reverse=True):
            old = model.get_submodule(name)
            new = make_replacement(name, old)
            if not isinstance(new, nn.Module):
                raise TypeError(f"make_replacement returned {type(new).__name__} for {name!r}, not an nn.Module")
            set_submodule(model, name, new)
            swapped.append((name, old))
    except BaseException:
        for name, old in reversed(swapped):
            set_submodule(model, name, old)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
