"""Put LoRA layers into an existing model, in place, and the model-level LoRA helpers.

``apply_lora`` wraps targeted linears in ``LoRALinear``. The helpers below
(``lora_parameters``, ``merge_lora``, ``unmerge_lora``) work on every layer of
the "lora" kind of the PEFT-layer protocol (``fastpeft.nn.base``): LoRA and
QLoRA layers alike.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..nn.base import peft_layers
from ..nn.lora import InitLoraWeights, LoRALinear, check_lora_dtype, is_lora_target, validate_lora_hyperparameters
from ..variants import LoraVariant, check_use_dora
from ..nn.modules_to_save import saved_modules
from .modules_to_save import modules_to_save_names, wrap_modules_to_save
from .targets import TargetModules, find_target_modules, set_submodule, swap_modules


def apply_lora(model: nn.Module, target_modules: TargetModules, r: int = 8, lora_alpha: float = 8,
               lora_dropout: float = 0.0, use_rslora: bool = False,
               init_lora_weights: InitLoraWeights = True, lora_dtype: Optional[torch.dtype] = None, *,
               exclude_modules: Optional[TargetModules] = None,
               layers_to_transform: Union[None, int, Sequence[int]] = None,
               layers_pattern: Union[None, str, Sequence[str]] = None,
               modules_to_save: Optional[Sequence[str]] = None, use_dora: bool = False) -> nn.Module:
    """Wrap every targeted ``nn.Linear``/``Conv1D`` of ``model`` in a ``LoRALinear``, in place; returns ``model``.

    Targeting follows HF PEFT (details: ``fastpeft.injection.targets``):

    - ``target_modules``: a list of names matches modules whose name equals an
      entry or ends with ``"." + entry`` (``["q_proj", "v_proj"]``); a single
      str is a regular expression that must match the FULL module name
      (``re.fullmatch``: ``r".*\\.(q|v)_proj"``, not ``"q_proj"``);
      ``"all-linear"`` is every Linear/Conv1D except the output head.
    - ``exclude_modules``: names or a full-match regex left out.
    - ``layers_to_transform`` (int or list of ints) with ``layers_pattern``
      (e.g. ``"layers"``): only those layer indices (needs a list target_modules).
    - ``modules_to_save``: modules (e.g. ``["lm_head"]``) replaced by a
      trainable copy (``ModulesToSave``), saved with the adapter.

    Every parameter except the new LoRA ones (and the ``modules_to_save``
    copies) is frozen (PEFT's ``bias="none"``). ``lora_dtype`` (default: each
    base weight's dtype) is the LoRA parameters' dtype, e.g. ``torch.float32``
    adapters on a bf16 model. ``use_dora=True`` makes every layer DoRA (PEFT's
    ``LoraConfig(use_dora=True)``: a trainable magnitude per output row,
    ``fastpeft.variants.dora``).

    Errors: ValueError for a target that matches nothing (a str says it is a
    full-match regex), TypeError for a selected module that is not
    Linear/Conv1D, already LoRA, or inside a fastpeft layer (``base_layer``,
    ``lora_A``, ...). Everything is checked before anything changes: the model
    is left untouched when anything is rejected.
    """
    validate_lora_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)
    check_lora_dtype(lora_dtype)
    variant = check_use_dora(use_dora)
    selection = dict(exclude_modules=exclude_modules, layers_to_transform=layers_to_transform,
                     layers_pattern=layers_pattern, modules_to_save=modules_to_save)
    names = find_target_modules(model, target_modules, **selection)
    check_lora_targets(model, names, variant)
    saved = modules_to_save_names(model, modules_to_save) if modules_to_save is not None else []

    def make(name: str, module: nn.Module) -> nn.Module:
        return LoRALinear.from_linear(module, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                      use_rslora=use_rslora, init_lora_weights=init_lora_weights,
                                      lora_dtype=lora_dtype, variant=variant)

    swap_modules(model, names, make)
    wrap_modules_to_save(model, saved)
    mark_only_lora_trainable(model)
    return model


def check_lora_targets(model: nn.Module, names: Iterable[str], variant: Optional[LoraVariant] = None) -> None:
    """TypeError naming the first of ``names`` that ``LoRALinear`` cannot wrap; ValueError (naming the
    variant's PEFT field, e.g. ``use_dora``) for a layer type the variant does not support."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise TypeError(f"target_modules: {name!r} already is a LoRALinear")
        if variant is not None and variant.peft_config and not is_lora_target(module):
            fields = ", ".join(f"{k}={v}" for k, v in variant.peft_config.items())
            raise ValueError(f"{fields}: {name!r} is a {type(module).__name__}; the {variant.name} variant "
                             "supports only nn.Linear and Conv1D layers")
        if not is_lora_target(module):
            raise TypeError(
                f"target_modules: {name!r} is a {type(module).__name__}; LoRA wraps only nn.Linear and Conv1D"
            )
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
            raise TypeError(
                f"target_modules: {name!r} ({type(module).__name__}) has no 2-D floating-point weight "
                f"(got {getattr(weight, 'dtype', type(weight).__name__)}); LoRA wraps float layers "
                "(bitsandbytes Linear4bit: use apply_qlora)"
            )


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter of ``model`` except the LoRA ones and ``modules_to_save`` copies (trainable)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    for _, wrapper in saved_modules(model):
        wrapper.trainable_copy.requires_grad_(True)
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every LoRA-kind layer of ``model`` (``LoRALinear``, ``QLoRALinear``)."""
    return peft_layers(model, "lora")


def lora_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters (``lora_A.weight``, ``lora_B.weight`` of each LoRA-kind layer)."""
    # each parameter once: layers may share a pair (LoRA-drop)
    return list(dict.fromkeys(p for _, m in lora_modules(model) for p in m.peft_parameters()))


def merge_lora(model: nn.Module, unload: bool = False) -> nn.Module:
    """Fold every LoRA update into its base weight (inference without LoRA overhead); returns ``model``.

    ``unload=False`` keeps the LoRA layers (merged; ``unmerge_lora`` undoes it).
    ``unload=True`` also puts plain layers back, so the model has its original
    architecture and ``save_pretrained`` / ``from_pretrained`` round-trip the
    merged weights: a ``LoRALinear`` becomes its own base ``nn.Linear`` /
    ``Conv1D`` holding ``W + s·BA``; a ``QLoRALinear`` becomes a dense
    ``nn.Linear`` with ``dequant(W) + s·BA`` in the original weight's dtype
    (``QLoRALinear.to_dense_linear``). The LoRA parameters are dropped, and
    each ``modules_to_save`` wrapper is replaced by its trained copy.
    """
    if not isinstance(unload, bool):
        raise TypeError(f"unload must be a bool, got {type(unload).__name__}")
    layers = lora_modules(model)
    if unload:
        _check_not_root(layers)
        _swap_back(model, [(name, layer, _merged_plain_layer(layer)) for name, layer in layers])
        _swap_back(model, [(name, wrapper, wrapper.unwrap()) for name, wrapper in saved_modules(model)])
        return model
    for _, m in layers:
        m.merge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """PEFT's name for ``merge_lora(model, unload=True)``: the merged model with its original architecture."""
    return merge_lora(model, unload=True)


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every LoRA layer without merging: each goes back to its base layer; returns ``model``.

    A ``LoRALinear`` gives back its base ``nn.Linear``/``Conv1D``, a
    ``QLoRALinear`` its frozen ``NF4Linear``, a ``modules_to_save`` wrapper its
    original module. PEFT's habit ``merge_adapter()`` then ``unload()`` keeps
    the merge: a merged ``LoRALinear`` gives back its base layer holding the
    merged weight; a merged layer whose base cannot hold the merge (QLoRA's
    NF4 bytes) is refused (ValueError, before anything changes) in favour of
    ``merge_lora(model, unload=True)``, which serves the update folded in.
    """
    layers = lora_modules(model)
    _check_not_root(layers)
    cannot_keep = [name for name, layer in layers if layer.merged and not isinstance(layer, LoRALinear)]
    if cannot_keep:
        raise ValueError(f"LoRA layers {cannot_keep[:5]} are merged and their base layer cannot hold the merge; "
                         "unload_lora would drop it: use fastpeft.merge_lora(model, unload=True) for the merged "
                         "model, or unmerge_lora(model) first for the original one")
    _swap_back(model, [(name, layer, layer.base_layer) for name, layer in layers])
    _swap_back(model, [(name, wrapper, wrapper.original_module) for name, wrapper in saved_modules(model)])
    return model


def _check_not_root(layers) -> None:
    if any(name == "" for name, _ in layers):
        raise ValueError("model itself is a LoRA layer and cannot replace itself; use its base_layer "
                         "(after merge()) or to_dense_linear()")


def _merged_plain_layer(layer: nn.Module) -> nn.Module:
    if isinstance(layer, LoRALinear):
        layer.merge()
        return layer.base_layer
    if hasattr(layer, "to_dense_linear"):
        return layer.to_dense_linear()
    raise TypeError(f"{type(layer).__name__} cannot be merged and unloaded")


def _swap_back(model: nn.Module, swaps) -> None:
    """Put each replacement at its layer's place (deepest first: a LoRA layer inside another's base)."""
    for name, _, replacement in sorted(swaps, key=lambda s: s[0].count("."), reverse=True):
        set_submodule(model, name, replacement)


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``."""
    for _, m in lora_modules(model):
        m.unmerge()
    return model
