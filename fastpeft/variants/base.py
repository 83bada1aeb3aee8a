"""The LoRA variant seam: what a variant of LoRA declares, in one class (``docs/architecture.md``).

Every LoRA-kind layer (``fastpeft.nn.lora.LoraLayer``: ``LoRALinear`` on a
dense base, ``QLoRALinear`` on an NF4 base) holds the shared ``lora_A`` /
``lora_B`` pair and one ``LoraVariant``; plain LoRA is the variant "lora".
A variant declares:

- ``name`` and ``peft_config``: its name and the HF PEFT ``LoraConfig``
  fields that select it (DoRA: ``{"use_dora": True}``), written by
  ``save_lora`` and matched by ``load_lora`` / the PEFT backend;
- ``checkpoint_keys``: its per-layer tensors beside ``lora_A.weight`` /
  ``lora_B.weight`` in PEFT's file (DoRA: ``"lora_magnitude_vector"``), each
  the layer attribute of that name; ``init`` creates them after the pair is
  initialised, ``check_checkpoint`` rejects tensors that do not fit;
- ``forward_dense`` / ``forward_nf4``: the unmerged forward on each base,
  calling its op (built on the shared LoRA implementations: ``cpu.lora``'s
  ``add_lora_term`` / ``lora_backward_with_base``, ``kernels.lora``'s
  ``lora_forward_with_base`` / ``lora_backward_with_base``). A base whose
  method the variant leaves as ``None`` is unsupported (``supports``), and
  every entry point raises ValueError for it before changing anything;
- ``merged`` / ``unmerged``: the weight with the update folded in, and back.

The registry (``fastpeft.variants``) finds each variant module of the
package, so adding one is one new file (plus its op and tests).
"""
from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch
from torch import nn


class LoraVariant:
    """One LoRA variant (see the module docstring). Instances are stateless singletons; state lives on layers."""

    name: ClassVar[str] = ""
    peft_config: ClassVar[dict] = {}
    checkpoint_keys: ClassVar[tuple[str, ...]] = ()
    # The unmerged forward on each base kind; None: this variant does not support that base.
    forward_dense: ClassVar[Optional[Callable]] = None
    forward_nf4: ClassVar[Optional[Callable]] = None

    def supports(self, base_kind: str) -> bool:
        """True when the variant has a forward for ``base_kind`` ("dense" or "nf4")."""
        return getattr(type(self), f"forward_{base_kind}", None) is not None

    def init(self, layer: nn.Module) -> None:
        """Create the variant's parameters on ``layer`` (its LoRA pair is initialised already)."""

    def parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        """The variant's own trainable parameters on ``layer`` (its ``checkpoint_keys``), in order."""
        return [getattr(layer, key) for key in self.checkpoint_keys]

    def check_checkpoint(self, name: str, layer_shapes: dict, tensors: dict) -> None:
        """ValueError unless ``tensors`` ({key: tensor}) holds exactly this variant's keys with the shapes
        ``layer_shapes`` ({key: shape}) of the layer they load into."""
        if set(tensors) != set(self.checkpoint_keys):
            raise ValueError(f"{name}: the {self.name} variant needs the tensors {list(self.checkpoint_keys)}, "
                             f"the file has {sorted(tensors)}")
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(layer_shapes[key]):
                raise ValueError(f"{name}.{key} has shape {tuple(tensor.shape)}, the layer needs "
                                 f"{tuple(layer_shapes[key])}")

    def checkpoint_tensors(self, layer: nn.Module) -> dict:
        """``{key: tensor}`` of the variant's per-layer tensors as PEFT saves them (detached, on the CPU)."""
        return {key: getattr(layer, key).detach().cpu().contiguous() for key in self.checkpoint_keys}

    def checkpoint_shapes(self, layer: nn.Module) -> dict:
        return {key: tuple(getattr(layer, key).shape) for key in self.checkpoint_keys}

    @torch.no_grad()
    def load_checkpoint(self, layer: nn.Module, tensors: dict) -> None:
        """Copy checked tensors (``check_checkpoint``) into ``layer``'s variant parameters."""
        for key, tensor in tensors.items():
            getattr(layer, key).copy_(tensor)

    def merged(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` ``[out, in]`` (fp32 or wider) with the update folded in; may remember what ``unmerged``
        needs on the layer."""
        raise NotImplementedError

    def unmerged(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of ``merged`` for the weight it returned."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<LoRA variant {self.name!r}>"
