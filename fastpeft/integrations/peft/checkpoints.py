"""``load_peft`` / ``save_peft``: any HF PEFT adapter fastpeft supports, both ways, without pickle.

A PEFT adapter directory holds ``adapter_config.json`` (``peft_type`` says the
method) and ``adapter_model.safetensors``. LoRA adapters go through
``fastpeft.integrations.peft.format`` (``load_lora`` / ``save_lora``). The
prompt-learning methods (prefix tuning / P-tuning v2, prompt tuning, P-tuning)
all save one tensor, ``prompt_embeddings [P, dim]``: the trained virtual tokens
after their reparameterisation (projection, MLP or LSTM). PEFT loads it into a
plain, frozen embedding (``inference_mode``), and so does ``load_peft``: the
loaded model gives the checkpoint's outputs.
The layer protocol used here is ``fastpeft.nn.prompt_learning``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ...injection.lora import lora_modules
from ...injection.modules_to_save import modules_to_save_names, saved_modules
from ...injection.prompt_learning import infer_task_type
from ...injection.targets import is_under_modules_to_save
from ...nn.prompt_learning import PromptLearningLayer, prompt_learning_layer
from .format import (CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, check_save_arguments, load_lora,
                     read_config_json, save_lora)

PROMPT_LEARNING_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
SUPPORTED_PEFT_TYPES = ("LORA", *PROMPT_LEARNING_TYPES)
PROMPT_WEIGHTS_KEY = "prompt_embeddings"
# A prompt-learning PeftModel wraps the transformers model directly: its modules_to_save tensors are
# "base_model.<module>.<tensor>" (LoRA's are "base_model.model.<module>...", one wrapper deeper).
_PROMPT_KEY_PREFIX = "base_model."
# The prompt-learning methods' config fields that must agree with the model a checkpoint is loaded into.
_GEOMETRY_FIELDS = ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                    "num_transformer_submodules")


def load_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply the adapter saved in ``directory`` (by ``PeftModel.save_pretrained`` or ``save_peft``) to ``model``.

    In place; returns ``model``. ``peft_type`` LORA loads as ``fastpeft.load_lora``
    does (trainable LoRA). PREFIX_TUNING, PROMPT_TUNING and P_TUNING are rebuilt
    the way ``PeftModel.from_pretrained`` rebuilds them: the saved
    ``prompt_embeddings`` in a plain embedding (``inference_mode``), the saved
    ``modules_to_save`` (e.g. a classifier's head) in their wrappers, all
    frozen; the outputs are the checkpoint's. Errors (ValueError, raised
    before the model changes): an unsupported ``peft_type`` (the message lists
    the supported ones), a checkpoint whose shapes or fields do not fit
    ``model``, a model that already has a prompt-learning method, a
    pickle-only checkpoint, tensors the format does not have.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = read_config_json(directory)
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise ValueError(f"{CONFIG_NAME}: peft_type {peft_type!r} is not supported by fastpeft.load_peft; "
                         f"supported: {', '.join(SUPPORTED_PEFT_TYPES)}")
    if peft_type == "LORA":
        return load_lora(model, directory)
    num_virtual_tokens = _positive_int(config, "num_virtual_tokens")
    tensors = _read_tensors(directory)
    embeddings = _prompt_embeddings(tensors)
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


def save_peft(model: nn.Module, directory: str | os.PathLike, *, task_type: Optional[str] = "auto",
              base_model_name_or_path: Optional[str] = None) -> None:
    """Write the model's adapter so that ``peft.PeftModel.from_pretrained(base_model, directory)`` loads it.

    The model carries either LoRA layers (``apply_lora``/``apply_qlora``) or one
    prompt-learning method (``apply_prefix_tuning``/``apply_prompt_tuning``).
    ``task_type`` is PEFT's (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), which picks the
    ``PeftModel`` class PEFT wraps the model in; ``"auto"`` reads it off the
    model's class name (``...ForCausalLM`` -> CAUSAL_LM, a bare ``...Model`` ->
    FEATURE_EXTRACTION), None writes none.
    """
    check_save_arguments(model, directory, base_model_name_or_path, task_type)
    layer = prompt_learning_layer(model)
    has_lora = bool(lora_modules(model))
    if layer is not None and has_lora:
        raise ValueError(f"model carries both LoRA layers and {layer.peft_type}; a PEFT adapter holds one method")
    if layer is None and not has_lora:
        raise ValueError("model has no adapter to save: apply LoRA, QLoRA, prefix tuning, prompt tuning or "
                         "P-tuning first")
    if task_type == "auto":
        task_type = getattr(layer, "task_type", None) or infer_task_type(model)
    if has_lora:
        save_lora(model, directory, base_model_name_or_path, task_type=task_type)
        return
    saved = saved_modules(model)
    config = {"base_model_name_or_path": base_model_name_or_path, "revision": None, "task_type": task_type,
              "inference_mode": True, "modules_to_save": [name for name, _ in saved] or None,
              "auto_mapping": None, **layer.peft_config()}
    tensors = {PROMPT_WEIGHTS_KEY: layer.prompt_embeddings().detach().cpu().contiguous()}
    for name, wrapper in saved:  # PEFT's names: the wrapped module's, without "modules_to_save.<adapter>"
        for key, tensor in wrapper.trainable_copy.state_dict().items():
            tensors[f"{_PROMPT_KEY_PREFIX}{name}.{key}"] = tensor.detach().cpu().contiguous()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------- loading prompt learning
def _method(peft_type: str, config: dict):
    """``(build, attach, kwargs)``: the layer builder and the ``apply_*`` that rebuild ``peft_type``."""
    from ...injection.prefix_tuning import apply_prefix_tuning, prefix_tuning_layer
    from ...injection.prompt_tuning import apply_prompt_tuning, prompt_tuning_layer

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


def _read_tensors(directory) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, PICKLE_WEIGHTS_NAME)):
            raise ValueError(f"{os.fspath(directory)!r} has only {PICKLE_WEIGHTS_NAME}, a pickle, which fastpeft "
                             f"does not load; re-save the adapter with safetensors ({WEIGHTS_NAME})")
        raise FileNotFoundError(f"directory {os.fspath(directory)!r} has no {WEIGHTS_NAME}")
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


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
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{CONFIG_NAME}: {key} must be a positive integer, got {value!r}")
    return value
