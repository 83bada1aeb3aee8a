"""Where bottleneck adapters sit in each supported model family: the table ``ARCHITECTURES`` and its lookups.

Placement follows AdapterHub ``adapters`` 1.3, so checkpoints and outputs carry
over. Post-LN encoders (BERT, RoBERTa) get their ``attention.output`` and
``output`` modules swapped; in pre-LN decoders (GPT-2; Llama, Mistral, Qwen2)
the whole block is swapped (``adapter_blocks``). The location paths are
AdapterHub's, so parameter names match its state dicts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn


@dataclass(frozen=True)
class PreLNNames:
    """The child names of a pre-LN block: attention, MLP, the norms before each, and how attention takes h."""

    attn: str
    mlp: str
    norm1: str
    norm2: str
    attn_hidden_as_keyword: bool


@dataclass(frozen=True)
class Architecture:
    """Where adapters sit in one model family (paths relative to the block, ``layers`` to the base model)."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    locations: dict  # location key -> module path inside the block (AdapterHub's)
    pre_ln: Optional[PreLNNames] = None  # None: post-LN, the location modules themselves are swapped


ARCHITECTURES = (
    Architecture("bert", ("bert", "roberta"), "encoder.layer",
                 {"mh_adapter": "attention.output", "output_adapter": "output"}),
    Architecture("gpt2", ("gpt2",), "h", {"mh_adapter": "attention_adapters", "output_adapter": "output_adapters"},
                 PreLNNames("attn", "mlp", "ln_1", "ln_2", attn_hidden_as_keyword=False)),
    Architecture("llama", ("llama", "mistral", "qwen2"), "layers",
                 {"mh_adapter": "attention_adapters", "output_adapter": "output_adapters"},
                 PreLNNames("self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
                            attn_hidden_as_keyword=True)),
)
SUPPORTED_MODEL_TYPES = tuple(t for a in ARCHITECTURES for t in a.model_types)


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers base model (``model.base_model``), or ``model`` itself."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def architecture_of(model: nn.Module) -> Architecture:
    """The table entry of ``model``; ValueError naming the supported model types otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise ValueError(f"model: adapters are not supported for model_type {model_type!r} ({type(model).__name__}); "
                     f"supported model types: {list(SUPPORTED_MODEL_TYPES)}")


def hidden_size_of(model: nn.Module) -> int:
    """``model.config.hidden_size``; ValueError unless it is a positive int."""
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"model: config.hidden_size is {size!r}; a positive int is needed")
    return size
