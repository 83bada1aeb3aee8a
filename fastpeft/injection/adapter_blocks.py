"""The modules swapped into a transformer block so that it has adapter locations.

- ``PostLNOutputWithAdapters``: a BERT-style ``SelfOutput``/``Output``
  (``LN(dropout(dense(h)) + x)``) that is itself an ``AdapterLayer``;
- ``PreLNBlockWithAdapters``: a pre-LN block (GPT-2, Llama family) holding the
  block's own children plus ``attention_adapters``/``output_adapters``.
Both keep the original children under their original names, so base-model
parameter names do not change; no transformers class is patched.
"""
from __future__ import annotations

import inspect
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .adapter_architectures import PreLNNames
from .adapter_location import AdapterLayer, LayerDropGate


class PostLNOutputWithAdapters(AdapterLayer):
    """A BERT-style ``SelfOutput``/``Output`` (``LN(dropout(dense(h)) + x)``) with an adapter location."""

    CHILDREN = frozenset({"dense", "dropout", "LayerNorm"})

    def __init__(self, original: nn.Module, location_key: str, layer_idx: int, drop_gate: LayerDropGate):
        super().__init__(location_key, layer_idx, drop_gate)
        self.dense = original.dense
        self.dropout = original.dropout
        self.LayerNorm = original.LayerNorm

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        h = self.dropout(self.dense(hidden_states))
        return self.adapter_layer_forward(h, input_tensor, self.LayerNorm)


class PreLNBlockWithAdapters(nn.Module):
    """A pre-LN transformer block ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with two adapter locations.

    Holds the block's own children under their names (``names``: attention,
    mlp, and the two norms) and ``attention_adapters``/``output_adapters``. The
    block's call arguments are bound to the original class's ``forward``
    signature and passed on to the attention module as keywords, as the
    original forward does.
    """

    # transformers' gradient_checkpointing_enable() sets these on every module that has the attribute.
    gradient_checkpointing = False

    def __init__(self, original: nn.Module, names: PreLNNames, layer_idx: int, drop_gate: LayerDropGate):
        super().__init__()
        for key, value in vars(original).items():
            if (not key.startswith("_") or key == "_gradient_checkpointing_func") and key != "training":
                setattr(self, key, value)  # plain attributes the model may read (attention_type, layer_idx, ...)
        self._names = names
        self._signature = inspect.signature(type(original).forward)
        for child in (names.attn, names.mlp, names.norm1, names.norm2):
            setattr(self, child, getattr(original, child))
        self.attention_adapters = AdapterLayer("mh_adapter", layer_idx, drop_gate)
        self.output_adapters = AdapterLayer("output_adapter", layer_idx, drop_gate)

    def _attention_kwargs(self, hidden_states, args, kwargs) -> dict:
        bound = self._signature.bind(self, hidden_states, *args, **kwargs).arguments
        params = self._signature.parameters
        out = {}
        for i, (key, value) in enumerate(bound.items()):
            if i < 2:
                continue  # self, hidden_states
            if params[key].kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            elif params[key].kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"{type(self).__name__}: unexpected extra positional arguments")
            else:
                out[key] = value
        for key in ("encoder_hidden_states", "encoder_attention_mask"):
            if out.pop(key, None) is not None:
                raise ValueError(f"{key}: cross-attention blocks are not supported with adapters")
        return out

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        """The block's forward; under gradient checkpointing (set by the model) it is recomputed in backward."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # As transformers' checkpointed layers: no cache is written while checkpointing (the replay would write twice).
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
                if kwargs.get(key) is not None:
                    kwargs[key] = None
            run = getattr(self, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
            return run(partial(self._block_forward, **kwargs), hidden_states, *args)
        return self._block_forward(hidden_states, *args, **kwargs)

    def _block_forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        n = self._names
        attn_kwargs = self._attention_kwargs(hidden_states, args, kwargs)
        residual = hidden_states
        h = getattr(self, n.norm1)(hidden_states)
        if n.attn_hidden_as_keyword:
            h = getattr(self, n.attn)(hidden_states=h, **attn_kwargs)[0]
        else:
            h = getattr(self, n.attn)(h, **attn_kwargs)[0]
        h = self.attention_adapters(h, residual, None)
        residual = h
        h = getattr(self, n.mlp)(getattr(self, n.norm2)(h))
        return self.output_adapters(h, residual, None)
