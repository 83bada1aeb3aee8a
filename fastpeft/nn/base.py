"""The PEFT-layer protocol: what every layer carrying trainable PEFT parameters offers.

See ``docs/architecture.md`` ("Modules"). A ``PeftLayer`` subclass declares its
``peft_kind`` (``"lora"``, ``"adapter"``, ``"prefix"``, ...) and is registered
under it when a concrete class is defined (``PEFT_LAYER_KINDS``), so the model-level
helpers (``fastpeft.lora_parameters``, ``merge_lora``, ``save_lora``, ...)
find every layer of a kind without a hand-kept list of classes:

- ``peft_parameters()``: the trainable PEFT parameters of the layer;
- ``merge()`` / ``unmerge()`` / ``merged``: fold the update into the frozen
  base and back, for kinds that can (``mergeable``); others raise TypeError.
"""
from __future__ import annotations

from typing import ClassVar, Optional

from torch import nn

PEFT_LAYER_KINDS: dict[str, list[type]] = {}
_ABSENT = object()


class PeftLayer(nn.Module):
    """Base class of every module that holds trainable PEFT parameters (see module docstring)."""

    peft_kind: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    # A shared base of one kind (e.g. ``LoraLayer``) sets this so that only concrete layers are registered.
    abstract_peft_layer: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.peft_kind and not cls.__dict__.get("abstract_peft_layer", False):
            PEFT_LAYER_KINDS.setdefault(cls.peft_kind, []).append(cls)

    def peft_parameters(self) -> list[nn.Parameter]:
        """The layer's trainable PEFT parameters, in a fixed order."""
        raise NotImplementedError(f"{type(self).__name__} must implement peft_parameters()")

    @property
    def merged(self) -> bool:
        """True while the update is folded into the base (always False for kinds that cannot merge)."""
        return bool(getattr(self, "_merged", False))

    def merge(self) -> None:
        raise TypeError(f"{type(self).__name__} ({self.peft_kind}) cannot be merged into its base layer")

    def unmerge(self) -> None:
        raise TypeError(f"{type(self).__name__} ({self.peft_kind}) cannot be merged into its base layer")


def peft_layers(model: nn.Module, kind: Optional[str] = None) -> list[tuple[str, PeftLayer]]:
    """``(name, layer)`` of every ``PeftLayer`` of ``model`` (of ``kind`` if given), in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if kind is not None and kind not in PEFT_LAYER_KINDS:
        raise ValueError(f"kind: unknown PEFT layer kind {kind!r}; known: {sorted(PEFT_LAYER_KINDS)}")
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, PeftLayer) and (kind is None or module.peft_kind == kind)]


def module_parameter(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter, at a fraction of the cost on the per-call path.

    ``module.weight`` goes through ``nn.Module.__getattr__`` (a failed
    attribute lookup, then Python code: ~5x a dict lookup); the registered
    parameter is read from ``_parameters`` directly, anything else (a
    parametrization's property, a plain attribute) through ``getattr``.
    """
    value = module._parameters.get(name, _ABSENT)
    return getattr(module, name) if value is _ABSENT else value
