"""What every prompt-learning layer offers: virtual tokens, their saved form, their PEFT config.

Prefix tuning / P-tuning v2 (``fastpeft.nn.prefix_encoder``), prompt tuning
and P-tuning (``fastpeft.nn.prompt_encoder``) all train ``P`` virtual tokens
and store them the way HF PEFT does: one tensor ``prompt_embeddings [P, dim]``,
the output of the reparameterisation (projection, MLP or LSTM) when one is
trained. A model holds at most one such layer, registered as the submodule
``PROMPT_MODULE_NAME`` of the model it was applied to (``prompt_learning_layer``
finds it), so ``fastpeft.save_peft`` / ``fastpeft.load_peft`` serve every
method through this one protocol (``docs/architecture.md``, "Modules"):

- ``peft_type``: PEFT's name of the method (``"PREFIX_TUNING"``, ...);
- ``num_virtual_tokens``;
- ``prompt_embeddings()``: the ``[P, dim]`` tensor PEFT saves;
- ``load_prompt_embeddings(t)``: the inverse, for a layer built in
  ``inference_mode`` (no reparameterisation, as PEFT builds it on load);
- ``peft_config()``: the method's fields of PEFT's ``adapter_config.json``.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

from .base import PeftLayer, peft_layers

PROMPT_MODULE_NAME = "fastpeft_prompt"


class PromptLearningLayer(PeftLayer):
    """Base of the prompt-learning layers (see module docstring); not mergeable."""

    abstract_peft_layer = True
    peft_type: ClassVar[str] = ""

    num_virtual_tokens: int
    token_dim: int
    num_attention_heads: Optional[int]
    num_layers: Optional[int]
    inference_mode: bool
    embedding: nn.Embedding

    def peft_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def prompt_embeddings(self) -> torch.Tensor:
        """``[P, dim]``: what PEFT saves under ``prompt_embeddings`` (detached)."""
        raise NotImplementedError(f"{type(self).__name__} must implement prompt_embeddings()")

    def load_prompt_embeddings(self, embeddings: torch.Tensor) -> None:
        """Copy a saved ``prompt_embeddings [P, dim]`` in; the layer must be in ``inference_mode``."""
        if not self.inference_mode:
            raise ValueError(f"{type(self).__name__}: prompt_embeddings can only be loaded into a layer built with "
                             "inference_mode=True (the saved tensor is the reparameterisation's output)")
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        expected = tuple(self.embedding.weight.shape)
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"prompt_embeddings: checkpoint shape {tuple(embeddings.shape)} does not match this "
                             f"model's {expected} ([num_virtual_tokens, dim])")
        with torch.no_grad():
            self.embedding.weight.copy_(embeddings)

    def peft_config(self) -> dict:
        """This method's fields of PEFT's ``adapter_config.json`` (``peft_type`` included).

        The fields every prompt-learning config has come from the layer's
        attributes (``token_dim``, ``num_attention_heads``, ``num_layers``);
        ``method_config()`` adds the method's own.
        """
        return {"peft_type": self.peft_type, "num_virtual_tokens": self.num_virtual_tokens,
                "token_dim": self.token_dim, "num_transformer_submodules": 1,
                "num_attention_heads": self.num_attention_heads, "num_layers": self.num_layers,
                **self.method_config()}

    def method_config(self) -> dict:
        """The config fields of this method only (e.g. ``prefix_projection``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement method_config()")


def prompt_learning_layer(model: nn.Module) -> Optional[PromptLearningLayer]:
    """The model's prompt-learning layer, or None; ValueError if it somehow holds several."""
    layers = [layer for _, layer in peft_layers(model) if isinstance(layer, PromptLearningLayer)]
    if len(layers) > 1:
        raise ValueError(f"model holds {len(layers)} prompt-learning layers; fastpeft supports one per model")
    return layers[0] if layers else None


def check_no_prompt_learning(model: nn.Module) -> None:
    """ValueError if ``model`` already has a prompt-learning method applied (apply_* call this first)."""
    existing = prompt_learning_layer(model)
    if existing is not None:
        raise ValueError(f"model already has {existing.peft_type} applied ({type(existing).__name__} as "
                         f"{PROMPT_MODULE_NAME!r}); one prompt-learning method per model")
