"""The attention function transformers calls in a prefix-tuned model, and its mask function.

transformers (5.x) looks each attention layer's function up by
``config._attn_implementation`` in ``AttentionInterface`` and builds the
model's mask with the function of the same name in ``AttentionMaskInterface``
(``masking_utils``). Both are registered here under ``ATTN_IMPLEMENTATION``:

- the mask function returns the 2D padding mask ``[B, Skv]`` (bool, True =
  attend), like flash attention's: no ``[B, 1, Sq, Skv]`` bias is ever built;
  causality comes from the attention module's ``is_causal``;
- the attention function reads the layer's prefix keys/values from the
  ``PrefixEncoder`` the layer was bound to (``bind_attention``) and calls
  ``fastpeft.ops.prefix_attention`` (prefix never masked, causal bottom-right
  aligned, so a decode step against the cache is right).

The prefix is a parameter the layer reads on every call, never part of the KV
cache: the cache holds only the real tokens, gradient checkpointing recomputes
the read, and the batch size can change from call to call (one prefix is
shared by the batch). Packed sequences (position ids that restart within a row
and no mask) are attended as one sequence per row, which is what PEFT's cache
does too.

Under ``torch.autocast`` q, k, v and the prefix are cast to the autocast
dtype first, as SDPA is (Llama's RoPE returns fp32 q/k next to a bf16 v).

Attention dropout (training with ``attention_dropout > 0``, e.g. BERT's and
GPT-2's defaults) is not in the fused op: those calls concatenate the prefix
and run ``torch.nn.functional.scaled_dot_product_attention`` with dropout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.prefix_encoder import PrefixEncoder
from ..ops.prefix_attention import prefix_attention

ATTN_IMPLEMENTATION = "fastpeft_prefix"
_ENCODER_ATTR = "_fastpeft_prefix_encoder"
_LAYER_ATTR = "_fastpeft_prefix_layer"


def bind_attention(attention: nn.Module, encoder: PrefixEncoder, layer: int) -> None:
    """Make ``attention`` read layer ``layer``'s prefix from ``encoder``.

    Stored in the module's ``__dict__`` (not as a submodule), so the encoder is
    registered once, on the model, and the attention's ``state_dict`` is unchanged.
    """
    object.__setattr__(attention, _ENCODER_ATTR, encoder)
    object.__setattr__(attention, _LAYER_ATTR, layer)


def bound_encoder(attention: nn.Module) -> Optional[PrefixEncoder]:
    return attention.__dict__.get(_ENCODER_ATTR)


def _padding_mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                           mask_function=None, attention_mask: Optional[Tensor] = None, **kwargs) -> Optional[Tensor]:
    """The ``[B, kv_length]`` bool padding mask of the keys (None without a mask)."""
    if attention_mask is None:
        return None
    if kv_offset + kv_length > attention_mask.shape[-1]:
        raise ValueError(f"attention mask covers {attention_mask.shape[-1]} keys, the attention gets "
                         f"{kv_offset + kv_length}: prefix tuning supports DynamicCache only")
    return attention_mask.to(torch.bool)[:, kv_offset:kv_offset + kv_length]


def _attention_with_dropout(query: Tensor, key: Tensor, value: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                            key_padding_mask: Optional[Tensor], causal: bool, scale: float, dropout: float) -> Tensor:
    """Training with attention dropout: the prefix concatenated, then SDPA (same masking rules as the op)."""
    batch, _, q_len, _ = query.shape
    n_prefix, kv_len = prefix_k.shape[2], key.shape[2]
    key = torch.cat((prefix_k.expand(batch, -1, -1, -1), key), dim=2)
    value = torch.cat((prefix_v.expand(batch, -1, -1, -1), value), dim=2)
    keep = torch.ones(batch, 1, q_len, n_prefix + kv_len, dtype=torch.bool, device=query.device)
    if causal:
        rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        cols = torch.arange(kv_len, device=query.device)[None, :]
        keep[..., n_prefix:] &= cols <= rows
    if key_padding_mask is not None:
        keep[..., n_prefix:] &= key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=keep, dropout_p=dropout, scale=scale,
                                          enable_gqa=query.shape[1] != key.shape[1])


def prefix_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                             is_causal: Optional[bool] = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Skv, D]``.

    Returns ``([B, Sq, Hq, D], None)`` (no attention weights), like SDPA's.
    """
    encoder = bound_encoder(module)
    if encoder is None:
        raise ValueError(f"attention implementation {ATTN_IMPLEMENTATION!r} is set but this {type(module).__name__} "
                         "has no prefix bound (use fastpeft.apply_prefix_tuning on the whole model)")
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(f"prefix tuning takes a 2D attention mask [batch, keys]; got a {attention_mask.ndim}D mask "
                         "(custom 4D masks are not supported)")
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # as SDPA under autocast: one lower-precision dtype (RoPE leaves q/k in fp32 while v is bf16)
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    prefix_k, prefix_v = encoder.layer_key_value(module.__dict__[_LAYER_ATTR], query.dtype)
    causal = bool(module.is_causal if is_causal is None else is_causal)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if dropout > 0.0 and module.training:
        out = _attention_with_dropout(query, key, value, prefix_k, prefix_v, attention_mask, causal, scale, dropout)
    else:
        out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=causal, key_padding_mask=attention_mask,
                               scale=scale)
    return out.transpose(1, 2), None


def register_attention_function() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask_function)
