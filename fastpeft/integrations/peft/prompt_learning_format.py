"""Prompt-learning I/O: prefix tuning / P-tuning v2, prompt tuning and P-tuning adapters in HF PEFT's format.

All three save one tensor, ``prompt_embeddings [P, dim]``: the trained
virtual tokens after their reparameterisation (projection, MLP or LSTM). PEFT
loads it into a plain, frozen embedding (``inference_mode``), and so does
``load_prompt_learning``: the loaded model gives the checkpoint's outputs.
A prompt-learning ``PeftModel`` wraps the transformers model directly, so its
``modules_to_save`` tensors are ``base_model.<module>.<tensor>`` (LoRA's are one
wrapper deeper). The layer protocol used here is ``fastpeft.nn.prompt_learning``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ..._validation import check_positive_int
from ...injection.modules_to_save import modules_to_save_names
from ...injection.prefix_tuning import apply_prefix_tuning, prefix_tuning_layer
from ...injection.prompt_tuning import apply_prompt_tuning, prompt_tuning_layer
from ...injection.targets import is_under_modules_to_save
from ...nn.modules_to_save import saved_modules
from ...nn.prompt_learning import PromptLearningLayer, prompt_learning_layer
from .peft_directory import CONFIG_NAME, WEIGHTS_NAME, read_tensors, write_adapter

PROMPT_LEARNING_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
PROMPT_WEIGHTS_KEY = "prompt_embeddings"
_PROMPT_KEY_PREFIX = "base_model."
# The prompt-learning methods' config fields that must agree with the model a checkpoint is loaded into.
_GEOMETRY_FIELDS = ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                    "num_transformer_submodules")


def load_prompt_learning(model: nn.Module, directory: str | os.PathLike, config: dict) -> nn.Module:
    """Rebuild the prompt-learning adapter of ``directory`` (its ``config`` already read) on ``model``, as
    ``PeftModel.from_pretrained`` does; every check runs before the model changes."""
    peft_type = config.get("peft_type")
    num_virtual_tokens = _positive_int(config, "num_virtual_tokens")
    tensors = read_tensors(directory)
    embeddings = _prompt_embeddings(tensors)
    if embeddings.shape[0] != num_virtual_tokens:  # before the layer is built: its size comes from the config
        raise ValueError(f"{CONFIG_NAME}: num_virtual_tokens={num_virtual_tokens} but {WEIGHTS_NAME} saves "
                         f"{embeddings.shape[0]} virtual tokens ({PROMPT_WEIGHTS_KEY} {tuple(embeddings.shape)})")
    build, attach, kwargs = _method(peft_type, config)
    layer = build(model, num_virtual_tokens, inference_mode=True, **kwargs)
    _check_checkpoint_fits(config, layer, embeddings)
    saved = _saved_module_tensors(model, config, tensors)
    # Everything is checked: change the model.
    attach(model, num_virtual_tokens, inference_mode=True, modules_to_save=sorted(saved), **kwargs)
    prompt_learning_layer(model).load_prompt_embeddings(embeddings)
    for name, module_tensors in saved.items():
        model.get_submodule(name).trainable_copy.load_state_dict(module_tensors, strict=True)
    return model


def save_prompt_learning(model: nn.Module, directory: str | os.PathLike, layer: PromptLearningLayer,
                         task_type: Optional[str], base_model_name_or_path: Optional[str]) -> None:
    """Write ``layer`` (and the model's ``modules_to_save``) as PEFT's adapter directory."""
    saved = saved_modules(model)
    config = {"base_model_name_or_path": base_model_name_or_path, "revision": None, "task_type": task_type,
              "inference_mode": True, "modules_to_save": [name for name, _ in saved] or None,
              "auto_mapping": None, **layer.peft_config()}
    tensors = {PROMPT_WEIGHTS_KEY: layer.prompt_embeddings().detach().cpu().contiguous()}
    for name, wrapper in saved:  # PEFT's names: the wrapped module's, without "modules_to_save.<adapter>"
        for key, tensor in wrapper.trainable_copy.state_dict().items():
            tensors[f"{_PROMPT_KEY_PREFIX}{name}.{key}"] = tensor.detach().cpu().contiguous()
    write_adapter(directory, config, tensors)


def _method(peft_type: str, config: dict):
    """``(build, attach, kwargs)``: the layer builder and the ``apply_*`` that rebuild ``peft_type``."""
    if peft_type == "PREFIX_TUNING":
        return prefix_tuning_layer, apply_prefix_tuning, {}
    if peft_type == "PROMPT_TUNING":
        return prompt_tuning_layer, apply_prompt_tuning, {}
    encoder = config.get("encoder_reparameterization_type", "MLP")
    if not isinstance(encoder, str) or encoder.upper() not in ("MLP", "LSTM"):
        raise ValueError(f"{CONFIG_NAME}: encoder_reparameterization_type={encoder!r}; supported: 'MLP', 'LSTM'")
    return prompt_tuning_layer, apply_prompt_tuning, dict(
        encoder=encoder.lower(), encoder_hidden_size=_positive_int(config, "encoder_hidden_size"),
        encoder_num_layers=config.get("encoder_num_layers", 2), encoder_dropout=config.get("encoder_dropout", 0.0))


def _check_checkpoint_fits(config: dict, layer: PromptLearningLayer, embeddings: torch.Tensor) -> None:
    ours = layer.peft_config()
    for field in _GEOMETRY_FIELDS:
        if config.get(field) is not None and field in ours and config[field] != ours[field]:
            raise ValueError(f"{CONFIG_NAME}: {field}={config[field]!r} but this model needs {ours[field]!r}; "
                             "the checkpoint was trained on a different model")
    expected = tuple(layer.embedding.weight.shape)
    if tuple(embeddings.shape) != expected:
        raise ValueError(f"{WEIGHTS_NAME}: {PROMPT_WEIGHTS_KEY} has shape {tuple(embeddings.shape)}, this model "
                         f"needs {expected} ([num_virtual_tokens, dim])")


def _prompt_embeddings(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    embeddings = tensors.get(PROMPT_WEIGHTS_KEY)
    if embeddings is None:
        raise ValueError(f"{WEIGHTS_NAME} has no {PROMPT_WEIGHTS_KEY!r} tensor; found {sorted(tensors)[:5]}")
    if embeddings.ndim != 2 or not embeddings.is_floating_point():
        raise ValueError(f"{WEIGHTS_NAME}: {PROMPT_WEIGHTS_KEY} must be a 2-D floating tensor [P, dim], got "
                         f"{tuple(embeddings.shape)} {embeddings.dtype}")
    return embeddings


def _saved_module_tensors(model: nn.Module, config: dict, tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: its state dict}`` for the checkpoint's ``modules_to_save`` tensors, checked against
    ``model`` (every other tensor name is an error)."""
    listed = config.get("modules_to_save") or []
    if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
        raise ValueError(f"{CONFIG_NAME}: modules_to_save must be a list of module names, got {listed!r}")
    names = [n for n, _ in model.named_modules() if n]
    present = [m for m in dict.fromkeys(listed) if any(is_under_modules_to_save(n, [m]) for n in names)]
    outermost = modules_to_save_names(model, present) if present else []
    saved: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in tensors.items():
        if key == PROMPT_WEIGHTS_KEY:
            continue
        inner = key[len(_PROMPT_KEY_PREFIX):] if key.startswith(_PROMPT_KEY_PREFIX) else ""
        owner = next((n for n in outermost if inner.startswith(n + ".")), None)
        if owner is None:
            unexpected.append(key)
            continue
        saved.setdefault(owner, {})[inner[len(owner) + 1:]] = tensor
    if unexpected:
        raise ValueError(f"{WEIGHTS_NAME} holds tensors that are neither {PROMPT_WEIGHTS_KEY!r} nor of the "
                         f"modules_to_save {present}: {unexpected[:5]}")
    for name, module_tensors in saved.items():
        expected = {k: tuple(v.shape) for k, v in model.get_submodule(name).state_dict().items()}
        got = {k: tuple(v.shape) for k, v in module_tensors.items()}
        if got != expected:
            raise ValueError(f"{WEIGHTS_NAME}: the saved {name!r} ({got}) does not fit this model's ({expected})")
    return saved


def _positive_int(config: dict, key: str) -> int:
    """``config[key]`` checked as ``check_positive_int`` does; a bad file is a ValueError naming the field."""
    try:
        return check_positive_int(key, config.get(key))
    except TypeError as exc:
        raise ValueError(f"{CONFIG_NAME}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{CONFIG_NAME}: {exc}") from None
