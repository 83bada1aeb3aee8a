"""Prompt tuning and P-tuning layers: the ``P`` virtual-token embeddings prepended to a model's input.

Both follow HF PEFT 0.21 (``peft.tuners.prompt_tuning`` / ``peft.tuners.p_tuning``)
so that checkpoints, configs and random initialisations carry over:

- ``PromptEmbedding`` (PEFT's ``PROMPT_TUNING``): the prompt *is* the trainable
  ``embedding [P, token_dim]`` (``nn.Embedding``'s N(0, 1) init, or rows of the
  word embedding, see ``fastpeft.injection.prompt_tuning``).
- ``PromptEncoder`` (PEFT's ``P_TUNING``): the prompt is a reparameterisation of
  a trainable ``embedding``: ``mlp_head`` = Linear-ReLU-Linear-ReLU-Linear, or a
  bidirectional ``lstm_head`` followed by ``mlp_head`` = Linear-ReLU-Linear.
  ``encoder_dropout`` is the LSTM's dropout between its layers (the MLP has none,
  as in PEFT); the MLP always has two hidden layers (PEFT ignores
  ``encoder_num_layers`` there, with a warning).

Submodule names, parameter shapes and the order in which they are created (so
the order of random draws) are PEFT's: the same ``torch.manual_seed`` gives the
same weights, and PEFT's ``prompt_encoder.default.*`` tensors copy over by name.
The parameters are float32 whatever the model's dtype (as PEFT keeps them);
``prompts()`` is cast to the input's dtype where it is prepended.

With ``inference_mode=True`` only the embedding exists and it is used directly,
frozen: the form PEFT builds when it loads a checkpoint, whose saved
``prompt_embeddings`` are the reparameterisation's output
(``PromptLearningLayer.load_prompt_embeddings``).

The protocol (``peft_type``, ``prompt_embeddings()``, ``peft_config()``) is
``fastpeft.nn.prompt_learning``'s; ``docs/architecture.md``, "Modules".
"""
from __future__ import annotations

import warnings
from typing import ClassVar, Optional

import torch
from torch import nn

from .._validation import check_positive_int, check_probability
from .prompt_learning import PromptLearningLayer

PROMPT_TUNING_INITS = ("random", "sample_vocab", "text")
P_TUNING_ENCODERS = ("mlp", "lstm")
# PEFT's default (and only honoured) number of MLP layers of the P-tuning encoder.
MLP_ENCODER_NUM_LAYERS = 2


def normalize_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """``value`` lower-cased if it is one of ``choices`` (PEFT's upper-case spellings accepted), else an error."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(choices)}, got {type(value).__name__} {value!r}")
    lowered = value.lower()
    if lowered not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return lowered


class PromptEmbedding(PromptLearningLayer):
    """Prompt tuning: ``P`` trainable virtual-token embeddings (PEFT's ``PromptEmbedding``).

    ``model_fields`` are the base model's fields of PEFT's config (``token_dim``,
    ``num_attention_heads``, ``num_layers``); ``init``, ``init_text`` and
    ``tokenizer_name_or_path`` are recorded for ``peft_config()``. The
    embedding starts as ``nn.Embedding``'s N(0, 1); ``init_from(weights)``
    overwrites it (``sample_vocab`` / ``text`` inits).
    """

    peft_kind: ClassVar[str] = "prompt"
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    # PEFT's task type of the model the layer was applied to (CAUSAL_LM, SEQ_CLS, FEATURE_EXTRACTION); set by
    # fastpeft.injection.prompt_tuning.apply_prompt_tuning, None for a free-standing layer.
    task_type: Optional[str] = None

    def __init__(self, num_virtual_tokens: int, token_dim: int, *, num_attention_heads: Optional[int] = None,
                 num_layers: Optional[int] = None, init: str = "random", init_text: Optional[str] = None,
                 tokenizer_name_or_path: Optional[str] = None, inference_mode: bool = False,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.num_virtual_tokens = check_positive_int("num_virtual_tokens", num_virtual_tokens)
        self.token_dim = check_positive_int("token_dim", token_dim)
        self.init = normalize_choice("init", init, PROMPT_TUNING_INITS)
        self.init_text = init_text
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.num_attention_heads = num_attention_heads
        self.num_layers = num_layers
        self.inference_mode = bool(inference_mode)
        self.embedding = nn.Embedding(self.num_virtual_tokens, self.token_dim, device=device, dtype=torch.float32)
        if self.inference_mode:
            self.embedding.weight.requires_grad_(False)

    def init_from(self, weights: torch.Tensor) -> None:
        """Start from ``weights [P, token_dim]`` (rows of the word embedding), kept in float32 as PEFT does."""
        if tuple(weights.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(f"init weights: shape {tuple(weights.shape)} != {tuple(self.embedding.weight.shape)}")
        with torch.no_grad():
            self.embedding.weight.copy_(weights.detach().to(torch.float32))

    def prompts(self) -> torch.Tensor:
        """``[P, token_dim]``: the virtual tokens prepended to every sequence (with autograd)."""
        return self.embedding.weight

    def prompt_embeddings(self) -> torch.Tensor:
        return self.embedding.weight.detach()

    def method_config(self) -> dict:
        return {
            "prompt_tuning_init": self.init.upper(),
            "prompt_tuning_init_text": self.init_text,
            "tokenizer_name_or_path": self.tokenizer_name_or_path,
            "tokenizer_kwargs": None,
        }

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}, init={self.init!r}, " \
               f"inference_mode={self.inference_mode}"


class PromptEncoder(PromptLearningLayer):
    """P-tuning: virtual tokens made by an MLP or LSTM encoder from a trainable embedding (PEFT's PromptEncoder).

    ``encoder_hidden_size`` defaults to ``token_dim`` (as PEFT fills it in).
    See the module docstring for the architecture and ``inference_mode``.
    """

    peft_kind: ClassVar[str] = "prompt"
    peft_type: ClassVar[str] = "P_TUNING"
    # PEFT's task type of the model the layer was applied to (CAUSAL_LM, SEQ_CLS, FEATURE_EXTRACTION); set by
    # fastpeft.injection.prompt_tuning.apply_prompt_tuning, None for a free-standing layer.
    task_type: Optional[str] = None

    def __init__(self, num_virtual_tokens: int, token_dim: int, *, encoder: str = "mlp",
                 encoder_hidden_size: Optional[int] = None, encoder_num_layers: int = 2,
                 encoder_dropout: float = 0.0, num_attention_heads: Optional[int] = None,
                 num_layers: Optional[int] = None, inference_mode: bool = False,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.num_virtual_tokens = check_positive_int("num_virtual_tokens", num_virtual_tokens)
        self.token_dim = check_positive_int("token_dim", token_dim)
        self.encoder = normalize_choice("encoder", encoder, P_TUNING_ENCODERS)
        hidden = self.token_dim if encoder_hidden_size is None else encoder_hidden_size
        self.encoder_hidden_size = check_positive_int("encoder_hidden_size", hidden)
        self.encoder_num_layers = check_positive_int("encoder_num_layers", encoder_num_layers)
        self.encoder_dropout = check_probability("encoder_dropout", encoder_dropout)
        self.num_attention_heads = num_attention_heads
        self.num_layers = num_layers
        self.inference_mode = bool(inference_mode)

        dim, hidden = self.token_dim, self.encoder_hidden_size
        # Creation order = PEFT's (embedding, then lstm_head, then mlp_head): same seed, same weights.
        self.embedding = nn.Embedding(self.num_virtual_tokens, dim, device=device, dtype=torch.float32)
        self.lstm_head: Optional[nn.LSTM] = None
        self.mlp_head: Optional[nn.Sequential] = None
        if self.inference_mode:
            self.embedding.weight.requires_grad_(False)
            return
        kw = dict(device=device, dtype=torch.float32)
        if self.encoder == "lstm":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=self.encoder_num_layers,
                                     dropout=self.encoder_dropout, bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim, **kw))
        else:
            if self.encoder_num_layers != MLP_ENCODER_NUM_LAYERS:
                warnings.warn(f"P-tuning encoder 'mlp': encoder_num_layers={self.encoder_num_layers} is ignored; "
                              f"the MLP has exactly {MLP_ENCODER_NUM_LAYERS} hidden layers (as in HF PEFT)",
                              stacklevel=3)
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden, **kw), nn.ReLU(),
                                          nn.Linear(hidden, hidden, **kw), nn.ReLU(),
                                          nn.Linear(hidden, dim, **kw))

    def prompts(self) -> torch.Tensor:
        """``[P, token_dim]``: the virtual tokens prepended to every sequence (with autograd)."""
        weight = self.embedding.weight
        if self.inference_mode:
            return weight
        # One sequence through the encoder, shared by the whole batch (PEFT encodes one copy and repeats it).
        if self.lstm_head is not None:
            return self.mlp_head(self.lstm_head(weight.unsqueeze(0))[0])[0]
        return self.mlp_head(weight)

    def prompt_embeddings(self) -> torch.Tensor:
        """The encoder's output (what PEFT saves), computed without dropout whatever the layer's mode.

        Computed with autograd on whatever the caller's mode, as PEFT does: under ``no_grad`` torch's CPU LSTM
        takes another kernel whose result differs in the last bit.
        """
        was_training = self.training
        self.train(False)
        try:
            with torch.enable_grad():
                return self.prompts().detach()
        finally:
            self.train(was_training)

    def method_config(self) -> dict:
        return {
            "encoder_reparameterization_type": self.encoder.upper(),
            "encoder_hidden_size": self.encoder_hidden_size,
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        }

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}, " \
               f"encoder={self.encoder!r}, inference_mode={self.inference_mode}"


