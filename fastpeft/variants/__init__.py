"""LoRA variants: one module per variant, found here by listing the package (``docs/architecture.md``).

``variant(name)`` returns a registered ``LoraVariant`` (plain LoRA is
"lora"), ``variant_for_peft_config(config)`` the one a PEFT ``LoraConfig``
(dict) selects. Adding a variant adds a module here; no list to edit.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Union

from .base import LoraVariant

_NOT_VARIANTS = {"base"}


def _discover() -> dict[str, LoraVariant]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in _NOT_VARIANTS:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found[module.VARIANT.name] = module.VARIANT
    return found


VARIANTS: dict[str, LoraVariant] = _discover()
PLAIN = VARIANTS["lora"]


def variant(name_or_variant: Union[str, LoraVariant]) -> LoraVariant:
    """The registered variant of that name (a ``LoraVariant`` is returned as it is)."""
    if isinstance(name_or_variant, LoraVariant):
        return name_or_variant
    if not isinstance(name_or_variant, str):
        raise TypeError(f"variant must be a str or LoraVariant, got {type(name_or_variant).__name__}")
    try:
        return VARIANTS[name_or_variant]
    except KeyError:
        raise ValueError(f"variant: unknown LoRA variant {name_or_variant!r}; known: {sorted(VARIANTS)}") from None


def variant_for_peft_config(config: dict) -> LoraVariant:
    """The variant whose ``peft_config`` fields ``config`` sets (plain LoRA when none); ValueError for two."""
    chosen = [v for v in VARIANTS.values()
              if v.peft_config and all(config.get(k) == value for k, value in v.peft_config.items())]
    if len(chosen) > 1:
        raise ValueError(f"the config selects several LoRA variants: {[v.name for v in chosen]}")
    return chosen[0] if chosen else PLAIN


def peft_config_fields() -> dict:
    """Every PEFT config field a variant reads, with its value when no variant is selected."""
    return {key: False for v in VARIANTS.values() for key in v.peft_config}


def variant_of_layers(layers) -> LoraVariant:
    """The one variant of every ``(name, layer)`` in ``layers`` (a PEFT config holds one); ValueError otherwise."""
    found = {layer.variant.name for _, layer in layers}
    if len(found) != 1:
        raise ValueError(f"LoRA layers differ in variant ({sorted(found)}); a PEFT config holds one")
    return VARIANTS[found.pop()]


def checkpoint_key_pattern() -> str:
    """Regex alternatives of every variant's per-layer checkpoint key (``lora_magnitude_vector``, ...)."""
    return "|".join(sorted(key for v in VARIANTS.values() for key in v.checkpoint_keys))


def check_use_dora(use_dora) -> LoraVariant:
    """The variant PEFT's ``use_dora`` flag selects (TypeError for a non-bool)."""
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be a bool, got {type(use_dora).__name__}")
    return variant_for_peft_config({"use_dora": use_dora})


__all__ = ["LoraVariant", "PLAIN", "VARIANTS", "check_use_dora", "checkpoint_key_pattern", "peft_config_fields",
           "variant", "variant_for_peft_config", "variant_of_layers"]
