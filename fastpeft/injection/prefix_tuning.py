"""Prefix tuning / P-tuning v2 in a transformers model, in place: ``apply_prefix_tuning``.

What HF PEFT does (``PrefixTuningConfig``), without its KV-cache tricks
(``docs/architecture.md``, "Modules"):

- a ``PrefixEncoder`` (PEFT's parameters and names) is registered on the model
  as ``PROMPT_MODULE_NAME``; every other parameter is frozen, except those of
  PEFT layers applied before (LoRA stays trainable);
- the model's attention implementation becomes ``"fastpeft_prefix"``: each
  attention layer reads its prefix keys/values from the encoder and runs
  ``fastpeft.ops.prefix_attention`` (``_prefix_attention_function``). The
  KV cache of ``generate`` holds only the real tokens; gradient checkpointing
  (PEFT refuses it) and ``torch.compile(fullgraph=True)`` work. With
  ``prefix_projection`` each layer computes its rows of the projection on each
  call (``P·(token_dim·enc + enc·2·token_dim)`` multiply-adds): negligible in
  training; for serving, load the saved prefix with ``inference_mode=True``;
- positions: PEFT puts the prefix in the cache, so the model numbers the real
  tokens from ``P`` on (and PEFT adds ``P`` to ``position_ids`` a caller
  passes). ``shift_positions=True`` (default) reproduces that exactly with one
  forward pre-hook per model (``FAMILIES``): Llama family, the rotary
  embedding gets ``position_ids + P``; GPT-2, the position embedding ``wpe``
  gets ``position_ids + P``; BERT/RoBERTa, the embeddings module gets
  ``cache_length + P`` (or ``position_ids + P``), so RoBERTa's padding tokens
  keep the padding index and its ``inputs_embeds`` path stays unshifted, as
  with PEFT. ``shift_positions=False`` leaves the positions the model would
  give without a prefix (RoPE/absolute embeddings as trained, and no
  ``P + S <= max_position_embeddings`` limit), at the price of PEFT parity.

Generation uses transformers' ``DynamicCache`` (the default); other caches
are refused (a ``StaticCache``'s empty slots would break the bottom-right
causal alignment), as is switching the attention implementation away later
(the prefix would be ignored): a forward pre-hook on the model checks both.

Needs transformers >= 5.0. Supported: the Llama family (Llama, Mistral without a sliding window, Qwen2;
GQA/MQA and an explicit ``head_dim``), GPT-2, BERT and RoBERTa, bare or with
their heads (``*ForCausalLM``, ``*ForSequenceClassification``, ...). Every
argument is checked before the model is changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

from torch import nn

from .._validation import check_positive_int
from ..nn.prefix_encoder import PrefixEncoder
from ..nn.prompt_learning import PROMPT_MODULE_NAME, check_no_prompt_learning
from .._peft_task_type import infer_task_type
from .prompt_learning import attach_prompt_layer, modules_to_save_plan
from ._prefix_attention_function import ATTN_IMPLEMENTATION, bind_attention, register_attention_function


# ----------------------------------------------------------------------------------------------------------------
# Position shift hooks (forward pre-hooks with kwargs: they return the changed (args, kwargs)). Module-level
# functions bound with functools.partial, never closures, so a prefix-tuned model pickles (torch.save).
# ----------------------------------------------------------------------------------------------------------------

def _shift_rotary_positions(shift: int) -> Callable:
    """``rotary_emb(x, position_ids)``: ``position_ids + shift``."""
    return partial(_rotary_positions_hook, shift=shift)


def _rotary_positions_hook(module, args, kwargs, *, shift: int):
    if "position_ids" in kwargs:
        kwargs["position_ids"] = kwargs["position_ids"] + shift
    else:
        args = (args[0], args[1] + shift, *args[2:])
    return args, kwargs


def _shift_embedding_input(shift: int) -> Callable:
    """A position ``nn.Embedding`` (GPT-2's ``wpe``): ``ids + shift``."""
    return partial(_embedding_input_hook, shift=shift)


def _embedding_input_hook(module, args, kwargs, *, shift: int):
    if "input" in kwargs:
        kwargs["input"] = kwargs["input"] + shift
    else:
        args = (args[0] + shift, *args[1:])
    return args, kwargs


def _shift_bert_embeddings(shift: int) -> Callable:
    """``BertEmbeddings`` / ``RobertaEmbeddings``: ``position_ids + shift``, else ``cache_length + shift``.

    BertModel/RobertaModel call their embeddings with keywords only.
    """
    return partial(_bert_embeddings_hook, shift=shift)


def _bert_embeddings_hook(module, args, kwargs, *, shift: int):
    if args:
        raise TypeError(f"{type(module).__name__} was called with positional arguments; prefix tuning's "
                        "position shift expects the keyword call BertModel/RobertaModel make")
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + shift
    else:
        kwargs["cache_length"] = kwargs.get("cache_length", 0) + shift
    return args, kwargs


class _PrefixForwardCheck:
    """Model forward pre-hook: the prefix attention is still in use, and the cache is one it handles.

    The attention function reads the prefix, so another attention implementation would silently ignore it.
    Its causal mask is bottom-right aligned over the keys it gets: right for transformers' ``DynamicCache``
    (the default), wrong for caches with empty slots (``StaticCache``) or windows.

    A module-level class (a model holding it pickles); unpickling registers the attention function with
    transformers again, so a model loaded with ``torch.load`` in a fresh process runs.
    """

    def __init__(self, dynamic_cache: type):
        self.dynamic_cache = dynamic_cache

    def __setstate__(self, state: dict) -> None:
        register_attention_function()
        self.__dict__.update(state)

    def __call__(self, model, args, kwargs):
        _check_prefix_forward(model, args, kwargs, dynamic_cache=self.dynamic_cache)


def _check_prefix_forward(model, args, kwargs, *, dynamic_cache: type):
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise RuntimeError(f"prefix tuning needs attn_implementation {ATTN_IMPLEMENTATION!r}, but the model now uses "
                           f"{model.config._attn_implementation!r}: the prefix would be ignored; call "
                           f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r})")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and type(cache) is not dynamic_cache:
        raise ValueError(f"prefix tuning supports transformers' DynamicCache (generate's default), got "
                         f"{type(cache).__name__}")
    return None


# ----------------------------------------------------------------------------------------------------------------
# Model families
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrefixFamily:
    """Where a family keeps its attention layers and what numbers its positions."""

    name: str
    model_types: tuple[str, ...]
    attention_modules: Callable[[nn.Module], list]   # backbone -> one self-attention module per layer
    position_module: Callable[[nn.Module], nn.Module]  # backbone -> the module whose input the shift changes
    position_hook: Callable[[int], Callable]


FAMILIES = (
    PrefixFamily("llama", ("llama", "mistral", "qwen2"), lambda b: [layer.self_attn for layer in b.layers],
                 lambda b: b.rotary_emb, _shift_rotary_positions),
    PrefixFamily("gpt2", ("gpt2",), lambda b: [block.attn for block in b.h],
                 lambda b: b.wpe, _shift_embedding_input),
    PrefixFamily("bert", ("bert", "roberta"), lambda b: [layer.attention.self for layer in b.encoder.layer],
                 lambda b: b.embeddings, _shift_bert_embeddings),
)
SUPPORTED_MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)


def _family(model: nn.Module) -> PrefixFamily:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    what = type(model).__name__ if config is None else f"{type(model).__name__} (model_type {model_type!r})"
    raise TypeError(f"model: prefix tuning supports transformers models of type {list(SUPPORTED_MODEL_TYPES)} "
                    f"(Llama family, GPT-2, BERT, RoBERTa and their heads); got {what}")


def _backbone(model: nn.Module) -> nn.Module:
    """The bare transformer inside a head model (``model.model``, ``.transformer``, ``.bert``, ...)."""
    base = getattr(model, "base_model", model)
    return model if base is None else base


def _kv_geometry(model: nn.Module, attentions: list) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)`` the way PEFT derives them from the config, checked against the modules."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for attention in attentions:
        module_dim = getattr(attention, "head_dim", getattr(attention, "attention_head_size", head_dim))
        if module_dim != head_dim:
            raise ValueError(f"model: attention head_dim {module_dim} differs from the config's {head_dim}")
    return kv_heads, head_dim


MIN_TRANSFORMERS = "5.0"


def _check_transformers_version() -> None:
    """The attention/mask registries, ``cache`` and ``cache_length`` names used here are transformers 5's."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).release < Version(MIN_TRANSFORMERS).release:
        raise RuntimeError(f"apply_prefix_tuning needs transformers >= {MIN_TRANSFORMERS}, found "
                           f"{transformers.__version__}")


def _check_config(model: nn.Module, family: PrefixFamily) -> None:
    config = model.config
    if getattr(config, "sliding_window", None) is not None or getattr(config, "layer_types", None) and any(
            t != "full_attention" for t in config.layer_types):
        raise ValueError("model: sliding-window attention layers are not supported by prefix tuning (the prefix "
                         "attention mask has no window); for sequences shorter than the window set "
                         "config.sliding_window = None before applying it")
    if getattr(config, "add_cross_attention", False) or getattr(config, "is_encoder_decoder", False):
        raise ValueError("model: cross-attention (encoder-decoder) models are not supported by prefix tuning")
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        raise TypeError(f"model: {type(model).__name__} does not dispatch attention through transformers' "
                        "AttentionInterface, which prefix tuning needs")


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def apply_prefix_tuning(model: nn.Module, num_virtual_tokens: int, prefix_projection: bool = False,
                        encoder_hidden_size: int | None = None, *, inference_mode: bool = False,
                        shift_positions: bool = True, modules_to_save: Sequence[str] | None = None) -> nn.Module:
    """Prefix tuning (P-tuning v2) on ``model`` in place, as HF PEFT's ``PrefixTuningConfig``; returns ``model``.

    - ``num_virtual_tokens``: ``P``, the prefix length of every attention layer;
    - ``prefix_projection`` / ``encoder_hidden_size``: train the prefix through
      PEFT's ``Embedding(P, token_dim) -> Linear -> Tanh -> Linear`` (the
      hidden size is required then); otherwise the prefix is the parameter;
    - ``inference_mode``: build only ``embedding [P, 2·L·token_dim]`` (frozen),
      the form PEFT saves (``prompt_embeddings``) and loads;
    - ``shift_positions``: number the real tokens from ``P`` on, as PEFT does
      (default); False keeps the model's own positions (see module docstring);
    - ``modules_to_save``: modules trained and saved with the prefix; None is
      PEFT's default (a sequence classifier's head, ``classifier``/``score``).

    The model's parameters are frozen (except those of PEFT layers already in
    it, e.g. LoRA); the ``PrefixEncoder`` (``model.fastpeft_prompt``) and the
    ``modules_to_save`` copies train (``fastpeft.prompt_parameters(model)``).
    Raises TypeError for an unsupported model, ValueError for bad arguments or
    a model that already has a prompt-learning method, before anything is changed.
    """
    if not isinstance(shift_positions, bool):
        raise TypeError(f"shift_positions must be a bool, got {type(shift_positions).__name__}")
    encoder, family, attentions, position_module = _plan(model, num_virtual_tokens, prefix_projection,
                                                         encoder_hidden_size, inference_mode)
    saved = modules_to_save_plan(model, encoder.task_type, modules_to_save)

    # Everything checked: change the model.
    register_attention_function()
    attach_prompt_layer(model, encoder, saved)
    for layer, attention in enumerate(attentions):
        bind_attention(attention, encoder, layer)
    if shift_positions:
        position_module.register_forward_pre_hook(family.position_hook(num_virtual_tokens), with_kwargs=True)
    encoder.shift_positions = shift_positions  # how the model was set up (for save/load helpers and repr readers)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    from transformers import DynamicCache

    model.register_forward_pre_hook(_PrefixForwardCheck(DynamicCache), with_kwargs=True)
    return model


def prefix_tuning_layer(model: nn.Module, num_virtual_tokens: int, prefix_projection: bool = False,
                        encoder_hidden_size: int | None = None, *, inference_mode: bool = False) -> PrefixEncoder:
    """The ``PrefixEncoder`` ``apply_prefix_tuning`` adds to ``model``, built and checked without changing it."""
    return _plan(model, num_virtual_tokens, prefix_projection, encoder_hidden_size, inference_mode)[0]


def _plan(model: nn.Module, num_virtual_tokens: int, prefix_projection: bool, encoder_hidden_size: int | None,
          inference_mode: bool) -> tuple[PrefixEncoder, PrefixFamily, list, nn.Module]:
    """Every check of ``apply_prefix_tuning``; ``(encoder, family, attention modules, position module)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_positive_int("num_virtual_tokens", num_virtual_tokens)
    for name, flag in (("prefix_projection", prefix_projection), ("inference_mode", inference_mode)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if prefix_projection and encoder_hidden_size is None:
        raise ValueError("encoder_hidden_size is required with prefix_projection=True")
    if encoder_hidden_size is not None:
        check_positive_int("encoder_hidden_size", encoder_hidden_size)
    family = _family(model)
    _check_transformers_version()
    check_no_prompt_learning(model)
    _check_config(model, family)
    backbone = _backbone(model)
    try:
        attentions = family.attention_modules(backbone)
        position_module = family.position_module(backbone)
    except AttributeError as err:
        raise TypeError(f"model: {type(model).__name__} does not have the {family.name} layout prefix tuning "
                        f"expects ({err})") from None
    if len(attentions) != model.config.num_hidden_layers:
        raise ValueError(f"model: found {len(attentions)} attention layers, config says "
                         f"{model.config.num_hidden_layers}")
    kv_heads, head_dim = _kv_geometry(model, attentions)
    first = next(model.parameters(), None)
    encoder = PrefixEncoder(num_virtual_tokens, len(attentions), kv_heads, head_dim, prefix_projection,
                            encoder_hidden_size, inference_mode=inference_mode,
                            device=None if first is None else first.device)
    encoder.task_type = infer_task_type(model)
    encoder.train(model.training)
    return encoder, family, attentions, position_module


def prefix_encoder(model: nn.Module) -> PrefixEncoder:
    """The ``PrefixEncoder`` ``apply_prefix_tuning`` put on ``model`` (ValueError if there is none)."""
    encoder = getattr(model, PROMPT_MODULE_NAME, None)
    if not isinstance(encoder, PrefixEncoder):
        raise ValueError("model has no prefix tuning applied (fastpeft.apply_prefix_tuning)")
    return encoder
