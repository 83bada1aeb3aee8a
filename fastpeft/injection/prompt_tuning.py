"""Prompt tuning and P-tuning in a transformers model, in place: virtual tokens prepended to the input embeddings.

``apply_prompt_tuning`` registers a ``PromptEmbedding`` (prompt tuning) or a
``PromptEncoder`` (P-tuning, ``encoder="mlp"|"lstm"``) as the submodule
``PROMPT_MODULE_NAME`` of the model, freezes every other parameter and adds a
forward pre-hook (with kwargs) to the model that does what HF PEFT 0.21's
``PeftModelFor{CausalLM,SequenceClassification,FeatureExtraction}.forward`` do
for these methods, so PEFT's checkpoints give PEFT's outputs:

- the input (``input_ids``, positional or not, or ``inputs_embeds``) becomes
  ``inputs_embeds = [prompts; embed(input_ids)]``, ``[B, P + L, dim]``: outputs
  carry the ``P`` virtual positions (a causal LM's logits are ``[B, P + L, V]``);
- a 2-D ``attention_mask`` gets ``P`` leading ones;
- causal LMs: ``labels`` get ``P`` leading -100 (ignored by the loss);
- sequence classification: ``token_type_ids`` get ``P`` leading zeros; causal
  LMs and plain encoders: PEFT drops ``token_type_ids`` (with a warning), so do we;
- ``position_ids`` are dropped with a warning (PEFT does; the model then numbers
  the ``P + L`` positions from 0, or from the cache length when decoding).

Generation: a forward whose cache already holds tokens is a decode step; its
virtual tokens are in the cache, so nothing is prepended and only the attention
mask gets its ``P`` leading ones (a mask passed to the model always covers the
real tokens only). ``model.generate`` therefore prepends the
prompt once (at prefill) and decode steps still attend to it, which is what
PEFT's ``generate`` means to do. (PEFT 0.21.2 on transformers 5.24 looks for
the cache under its old name ``past_key_values`` and prepends the prompt again on
every step; the tests check against PEFT's forward instead.)

Supported: decoder-only causal LMs (``GenerationMixin``), ``*ForSequenceClassification``
and bare backbones (``BertModel``, ``LlamaModel``) whose input embedding is an
``nn.Embedding``. Everything is checked before the model is touched.
Classifiers that pool the last non-padding token (``LlamaForSequenceClassification``,
``GPT2ForSequenceClassification``) see ``inputs_embeds``, not ids, so they pool
the last position, as under PEFT: pad such inputs on the left.
"""
from __future__ import annotations

import inspect
import math
import warnings
from functools import partial
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .._validation import check_positive_int, check_probability
from ..nn.prompt_encoder import (P_TUNING_ENCODERS, PROMPT_TUNING_INITS, PromptEmbedding, PromptEncoder,
                                 normalize_choice)
from ..nn.prompt_learning import PROMPT_MODULE_NAME, PromptLearningLayer, check_no_prompt_learning
from .._peft_task_type import CAUSAL_LM, FEATURE_EXTRACTION, SEQ_CLS, infer_task_type
from .prompt_learning import attach_prompt_layer, modules_to_save_plan

IGNORE_INDEX = -100


def apply_prompt_tuning(model: nn.Module, num_virtual_tokens: int, init: str = "random",
                        init_text: Optional[str] = None, tokenizer: Any = None, *, encoder: Optional[str] = None,
                        encoder_hidden_size: Optional[int] = None, encoder_num_layers: int = 2,
                        encoder_dropout: float = 0.0, inference_mode: bool = False,
                        modules_to_save: Optional[Sequence[str]] = None) -> nn.Module:
    """Prompt tuning (``encoder=None``) or P-tuning (``encoder="mlp"|"lstm"``) on ``model``; returns ``model``.

    - ``init`` (prompt tuning): ``"random"`` (N(0, 1), PEFT's ``RANDOM``),
      ``"sample_vocab"`` (rows of the word embedding at token ids drawn
      uniformly with ``torch.randint``) or ``"text"`` (the embeddings of
      ``tokenizer(init_text)["input_ids"]``, repeated or cut to ``P``). PEFT's
      upper-case names are accepted. P-tuning starts from ``"random"`` only.
    - ``tokenizer``: a transformers tokenizer (``init="text"``); its
      ``name_or_path`` is recorded as ``tokenizer_name_or_path``. With
      ``inference_mode=True`` nothing is initialised and a path string may be
      passed instead, only to be recorded.
    - ``encoder_hidden_size`` (default: the model's hidden size),
      ``encoder_num_layers`` (LSTM layers; the MLP always has two hidden
      layers), ``encoder_dropout`` (between LSTM layers): PEFT's P-tuning fields.
    - ``inference_mode=True``: the frozen embedding is the prompt, no encoder
      (the form that loads a PEFT checkpoint's ``prompt_embeddings``).

    - ``modules_to_save``: modules trained and saved with the prompt; None is
      PEFT's default (a sequence classifier's head, ``classifier``/``score``).

    The model's parameters are frozen (except those of PEFT layers already in
    it, e.g. LoRA); the layer's and the ``modules_to_save`` copies' are
    trainable (``fastpeft.prompt_parameters(model)``).
    """
    layer = prompt_tuning_layer(model, num_virtual_tokens, init, init_text, tokenizer, encoder=encoder,
                                encoder_hidden_size=encoder_hidden_size, encoder_num_layers=encoder_num_layers,
                                encoder_dropout=encoder_dropout, inference_mode=inference_mode)
    saved = modules_to_save_plan(model, layer.task_type, modules_to_save)
    # Everything is checked: change the model.
    attach_prompt_layer(model, layer, saved)
    arg_names = _positional_arg_names(model)
    model.register_forward_pre_hook(partial(_prepend_prompts, arg_names=arg_names, task_type=layer.task_type),
                                    with_kwargs=True)
    return model


def prompt_tuning_layer(model: nn.Module, num_virtual_tokens: int, init: str = "random",
                        init_text: Optional[str] = None, tokenizer: Any = None, *, encoder: Optional[str] = None,
                        encoder_hidden_size: Optional[int] = None, encoder_num_layers: int = 2,
                        encoder_dropout: float = 0.0, inference_mode: bool = False) -> PromptLearningLayer:
    """The layer ``apply_prompt_tuning`` adds to ``model``, built and checked without changing ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_no_prompt_learning(model)
    num_virtual_tokens = check_positive_int("num_virtual_tokens", num_virtual_tokens)
    if not isinstance(inference_mode, bool):
        raise TypeError(f"inference_mode must be a bool, got {type(inference_mode).__name__}")
    init = normalize_choice("init", init, PROMPT_TUNING_INITS)
    if encoder is not None:
        encoder = normalize_choice("encoder", encoder, P_TUNING_ENCODERS)
        if init != "random":
            raise ValueError(f"init={init!r}: P-tuning (encoder={encoder!r}) starts from a random embedding; "
                             "init applies to prompt tuning (encoder=None) only")
        if encoder_hidden_size is not None:
            check_positive_int("encoder_hidden_size", encoder_hidden_size)
        check_positive_int("encoder_num_layers", encoder_num_layers)
        check_probability("encoder_dropout", encoder_dropout)
    elif encoder_hidden_size is not None or encoder_num_layers != 2 or encoder_dropout != 0.0:
        raise ValueError("encoder_hidden_size / encoder_num_layers / encoder_dropout configure the P-tuning "
                         "encoder: pass encoder='mlp' or 'lstm' with them")
    tokenizer_name = _check_text_init(init, init_text, tokenizer, inference_mode)

    task_type = model_task_type(model)
    word_embeddings = _word_embeddings(model)
    fields = model_config_fields(model, word_embeddings.embedding_dim)
    device = word_embeddings.weight.device

    if encoder is None:
        layer: PromptLearningLayer = PromptEmbedding(
            num_virtual_tokens, word_embeddings.embedding_dim, init=init, init_text=init_text,
            tokenizer_name_or_path=tokenizer_name, inference_mode=inference_mode, device=device, **fields)
        if not inference_mode and init != "random":
            token_ids = _init_token_ids(init, num_virtual_tokens, word_embeddings, init_text, tokenizer)
            with torch.no_grad():
                layer.init_from(word_embeddings(token_ids.to(device)))
    else:
        layer = PromptEncoder(num_virtual_tokens, word_embeddings.embedding_dim, encoder=encoder,
                              encoder_hidden_size=encoder_hidden_size, encoder_num_layers=encoder_num_layers,
                              encoder_dropout=encoder_dropout, inference_mode=inference_mode, device=device,
                              **fields)
    layer.task_type = task_type
    layer.train(model.training)
    return layer


# ----------------------------------------------------------------------------------------------------------------
# The forward pre-hook
# ----------------------------------------------------------------------------------------------------------------

def _prepend_prompts(model: nn.Module, args: tuple, kwargs: dict, *, arg_names: tuple[str, ...],
                     task_type: str) -> tuple[tuple, dict]:
    """Rewrite one forward call's arguments (see module docstring); returns ``((), kwargs)``."""
    layer = model.get_submodule(PROMPT_MODULE_NAME)
    kw = _bind_positional(args, kwargs, arg_names)
    num_virtual = layer.num_virtual_tokens

    if kw.get("position_ids") is not None:
        warnings.warn("prompt tuning: position_ids are ignored (as in HF PEFT); the model numbers the virtual and "
                      "real tokens itself", stacklevel=3)
        kw["position_ids"] = None
    kw.pop("cache_position", None)
    if kw.get("token_type_ids") is not None and task_type != SEQ_CLS:
        warnings.warn("prompt tuning: token_type_ids are ignored for this model type (as in HF PEFT)", stacklevel=3)
        kw["token_type_ids"] = None

    input_ids, inputs_embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("prompt tuning: pass input_ids or inputs_embeds, not both")
    if input_ids is None and inputs_embeds is None:
        raise ValueError("prompt tuning: the model needs input_ids or inputs_embeds")
    batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]

    if kw.get("attention_mask") is not None:
        kw["attention_mask"] = _with_leading(kw["attention_mask"], batch, num_virtual, 1, "attention_mask")

    if _cached_length(kw) > 0:
        # Decode step: the virtual tokens are in the cache already; only the mask must cover them.
        return (), kw

    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    # Cast after the expand, as PEFT does: the batch sum of the prompt's gradient then runs in the prompt's
    # float32, not in a bf16 model's dtype.
    prompts = layer.prompts().unsqueeze(0).expand(batch, -1, -1)
    prompts = prompts.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
    kw["inputs_embeds"] = torch.cat((prompts, inputs_embeds), dim=1)
    kw["input_ids"] = None
    if task_type == CAUSAL_LM and kw.get("labels") is not None:
        kw["labels"] = _with_leading(kw["labels"], batch, num_virtual, IGNORE_INDEX, "labels")
    if kw.get("token_type_ids") is not None:
        kw["token_type_ids"] = _with_leading(kw["token_type_ids"], batch, num_virtual, 0, "token_type_ids")
    return (), kw


def _bind_positional(args: tuple, kwargs: dict, arg_names: tuple[str, ...]) -> dict:
    if len(args) > len(arg_names):
        raise TypeError(f"forward takes at most {len(arg_names)} positional arguments ({len(args)} given)")
    kw = dict(kwargs)
    for name, value in zip(arg_names, args):
        if name in kw:
            raise TypeError(f"forward got multiple values for argument {name!r}")
        kw[name] = value
    return kw


def _with_leading(t: torch.Tensor, batch: int, count: int, value: int, name: str) -> torch.Tensor:
    """``t [B, L]`` with ``count`` leading columns of ``value`` (same dtype and device)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != batch:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"prompt tuning: {name} must be a [batch, seq] tensor with batch {batch}, got {shape} "
                         "(4-D masks, e.g. from static caches, are not supported)")
    lead = torch.full((batch, count), value, dtype=t.dtype, device=t.device)
    return torch.cat((lead, t), dim=1)


def _cached_length(kw: dict) -> int:
    """Number of tokens already in the call's KV cache (0 without one)."""
    cache = kw.get("cache", kw.get("past_key_values"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
        return int(cache[0][0].shape[-2])  # legacy tuple cache
    raise TypeError(f"prompt tuning: unsupported cache type {type(cache).__name__}")


def _positional_arg_names(model: nn.Module) -> tuple[str, ...]:
    params = inspect.signature(model.forward).parameters.values()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


# ----------------------------------------------------------------------------------------------------------------
# The model: task, word embeddings, PEFT's config fields
# ----------------------------------------------------------------------------------------------------------------

def model_task_type(model: nn.Module) -> str:
    """``infer_task_type(model)`` where prompt tuning supports it (CAUSAL_LM, SEQ_CLS, or FEATURE_EXTRACTION for
    a bare backbone); ValueError otherwise."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model: {type(model).__name__} is not a transformers model (no config); prompt tuning "
                         "supports causal LMs, *ForSequenceClassification and bare encoders/decoders")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: {type(model).__name__} is an encoder-decoder model; prompt tuning supports "
                         "decoder-only causal LMs, *ForSequenceClassification and bare backbones")
    task_type = infer_task_type(model)
    if task_type in (CAUSAL_LM, SEQ_CLS) or (task_type == FEATURE_EXTRACTION
                                            and getattr(model, "base_model", None) is model):
        return task_type
    raise ValueError(f"model: {type(model).__name__} is not supported by prompt tuning (supported: causal LMs, "
                     "*ForSequenceClassification, bare backbones such as BertModel)")


def _word_embeddings(model: nn.Module) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = None
    if callable(get):
        try:
            embeddings = get()
        except (NotImplementedError, AttributeError):
            embeddings = None
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(f"model: {type(model).__name__} has no nn.Embedding input embedding "
                         f"(get_input_embeddings() gave {type(embeddings).__name__}); prompt tuning needs one")
    return embeddings


def model_config_fields(model: nn.Module, embedding_dim: int) -> dict:
    """``num_attention_heads`` / ``num_layers`` as PEFT reads them from the model config (after checking its
    hidden size, PEFT's ``token_dim``, equals the input embedding's width)."""
    config = model.config
    values = config.to_dict()
    values = values.get("text_config", values)
    hidden = _first(values, ("hidden_size", "n_embd", "d_model"))
    if hidden is not None and hidden != embedding_dim:
        raise ValueError(f"model: hidden size {hidden} != input embedding width {embedding_dim}; prompt tuning "
                         "prepends embeddings of the hidden size (as PEFT does) and cannot serve this model")
    num_layers = getattr(config, "num_hidden_layers", None)
    if num_layers is None:
        num_layers = _first(values, ("num_hidden_layers", "num_layers", "n_layer"))
    heads = _first(values, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))
    return {"num_attention_heads": heads, "num_layers": num_layers}


def _first(values: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in values:
            return values[key]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Initialisation from the vocabulary
# ----------------------------------------------------------------------------------------------------------------

def _check_text_init(init: str, init_text, tokenizer, inference_mode: bool) -> Optional[str]:
    """Check ``init_text`` / ``tokenizer`` against ``init``; returns the ``tokenizer_name_or_path`` to record."""
    if init != "text":
        if init_text is not None or tokenizer is not None:
            raise ValueError(f"init_text / tokenizer are only used with init='text' (got init={init!r})")
        return None
    if not isinstance(init_text, str) or not init_text:
        raise ValueError(f"init='text' needs init_text, a non-empty str (got {init_text!r})")
    if tokenizer is None:
        if inference_mode:
            return None
        raise ValueError("init='text' needs tokenizer (a transformers tokenizer object)")
    if isinstance(tokenizer, str):
        if not inference_mode:
            raise TypeError("tokenizer must be a tokenizer object (fastpeft loads no tokenizers); a name or path "
                            "str is only accepted with inference_mode=True, where it is just recorded")
        return tokenizer
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    return getattr(tokenizer, "name_or_path", None) or None


def _init_token_ids(init: str, count: int, word_embeddings: nn.Embedding, init_text: Optional[str],
                    tokenizer) -> torch.Tensor:
    """The ``count`` token ids whose embeddings start the prompt (PEFT's SAMPLE_VOCAB / TEXT)."""
    vocab = word_embeddings.num_embeddings
    if init == "sample_vocab":
        return torch.randint(0, vocab, (count,), dtype=torch.long)
    ids = tokenizer(init_text)["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if not ids or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"init_text: tokenizer(init_text)['input_ids'] must be a non-empty list of ints, got {ids!r}")
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"init_text: token ids {ids} fall outside the model's vocabulary of {vocab}")
    ids = (ids * math.ceil(count / len(ids)))[:count]
    return torch.tensor(ids, dtype=torch.long)
