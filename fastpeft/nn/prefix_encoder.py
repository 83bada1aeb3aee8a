"""Prefix tuning / P-tuning v2: the trainable prefix keys and values of every attention layer.

``PrefixEncoder`` holds HF PEFT's parameters under PEFT's names, so a PEFT
checkpoint maps onto it one to one:

- plain: ``embedding = Embedding(P, 2·L·token_dim)``;
- ``prefix_projection``: ``embedding = Embedding(P, token_dim)`` then
  ``transform = Sequential(Linear(token_dim, encoder_hidden_size), Tanh(),
  Linear(encoder_hidden_size, 2·L·token_dim))``;
- ``inference_mode``: only ``embedding = Embedding(P, 2·L·token_dim)``, which
  holds the (projected) prefix PEFT saves as ``prompt_embeddings`` (PEFT builds
  the same when it loads a checkpoint).

``token_dim = num_kv_heads · head_dim`` (the key/value heads: GQA models store
fewer heads than they have queries). Row ``p`` of the ``[P, 2·L·token_dim]``
prefix is viewed ``[2L, Hkv, head_dim]`` as PEFT does: index ``2i`` holds the
keys of layer ``i``, ``2i + 1`` its values. ``layer_key_value(i, dtype)``
returns them as ``[1, Hkv, P, head_dim]`` views (one prefix shared by the
batch), which is what ``fastpeft.ops.prefix_attention`` takes; with the
projection only layer ``i``'s rows of the last Linear are computed, so a layer
never pays for the whole model's prefix. The parameters stay in their own
dtype (float32 by default, as PEFT keeps them) and the prefix is cast to the
attention's dtype, as PEFT casts its cache.

Placing the encoder into a model (attention function, positions) is
``fastpeft.injection.prefix_tuning``; protocol: ``fastpeft.nn.prompt_learning``
(``docs/architecture.md``, "Modules").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_positive_int
from .prompt_learning import PromptLearningLayer


class PrefixEncoder(PromptLearningLayer):
    """PEFT's ``PrefixEncoder`` parameters for ``num_layers`` attention layers (see module docstring)."""

    peft_kind = "prefix"
    peft_type = "PREFIX_TUNING"

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 prefix_projection: bool = False, encoder_hidden_size: int | None = None, *,
                 inference_mode: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        check_positive_int("num_virtual_tokens", num_virtual_tokens)
        check_positive_int("num_layers", num_layers)
        check_positive_int("num_kv_heads", num_kv_heads)
        check_positive_int("head_dim", head_dim)
        if not isinstance(prefix_projection, bool):
            raise TypeError(f"prefix_projection must be a bool, got {type(prefix_projection).__name__}")
        if not isinstance(inference_mode, bool):
            raise TypeError(f"inference_mode must be a bool, got {type(inference_mode).__name__}")
        token_dim = num_kv_heads * head_dim
        if prefix_projection:
            if encoder_hidden_size is None:
                raise ValueError("encoder_hidden_size is required with prefix_projection=True (the hidden size of "
                                 "the Linear -> Tanh -> Linear projection)")
            check_positive_int("encoder_hidden_size", encoder_hidden_size)
        elif encoder_hidden_size is not None:
            check_positive_int("encoder_hidden_size", encoder_hidden_size)

        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.token_dim = token_dim
        # PEFT's config records the KV heads here (the heads of GPT-2/BERT, fewer for GQA models).
        self.num_attention_heads = num_kv_heads
        self.prefix_projection = prefix_projection
        # PEFT writes token_dim when no projection size is given (its _prepare_prompt_learning_config).
        self.encoder_hidden_size = token_dim if encoder_hidden_size is None else encoder_hidden_size
        self.inference_mode = inference_mode

        factory = {"device": device, "dtype": dtype}
        prefix_dim = 2 * num_layers * token_dim
        if prefix_projection and not inference_mode:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **factory)
            self.transform = nn.Sequential(nn.Linear(token_dim, self.encoder_hidden_size, **factory), nn.Tanh(),
                                           nn.Linear(self.encoder_hidden_size, prefix_dim, **factory))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, prefix_dim, **factory)
        if inference_mode:
            self.requires_grad_(False)

    @property
    def projected(self) -> bool:
        """True when the prefix is computed by the trained projection (not in inference mode)."""
        return self.prefix_projection and not self.inference_mode

    def forward(self) -> Tensor:
        """The whole prefix ``[P, 2·L·token_dim]`` (PEFT's prefix-encoder output for one sample)."""
        if self.projected:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def layer_key_value(self, layer: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Prefix keys and values of attention layer ``layer``: two ``[1, Hkv, P, head_dim]`` tensors in ``dtype``."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a prefix of {self.num_layers} layers")
        d = self.token_dim
        rows = slice(2 * layer * d, (2 * layer + 2) * d)
        if self.projected:
            hidden = self.transform[1](self.transform[0](self.embedding.weight))
            last = self.transform[2]
            kv = F.linear(hidden, last.weight[rows], None if last.bias is None else last.bias[rows])
        else:
            kv = self.embedding.weight[:, rows]
        if dtype is not None:
            kv = kv.to(dtype)
        # [P, 2·Hkv·hd] -> [P, 2, Hkv, hd] -> [2, 1, Hkv, P, hd]
        kv = kv.unflatten(-1, (2, self.num_kv_heads, self.head_dim)).permute(1, 2, 0, 3).unsqueeze(1)
        return kv[0], kv[1]

    def prompt_embeddings(self) -> Tensor:
        """``[P, 2·L·token_dim]``: what PEFT saves (the projection's output when one is trained), detached."""
        with torch.no_grad():
            return self.forward().detach().clone()

    def method_config(self) -> dict:
        """The prefix-tuning fields of PEFT's ``adapter_config.json`` for this layer."""
        return {
            "encoder_hidden_size": self.encoder_hidden_size,
            "prefix_projection": self.prefix_projection,
        }

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"prefix_projection={self.prefix_projection}, inference_mode={self.inference_mode}")
