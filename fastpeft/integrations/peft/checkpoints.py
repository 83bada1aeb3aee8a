"""``load_peft`` / ``save_peft``: any HF PEFT adapter fastpeft supports, both ways, picked by ``peft_type``.

A PEFT adapter directory holds ``adapter_config.json`` (``peft_type`` says the
method) and ``adapter_model.safetensors`` (``peft_directory``). LoRA adapters
go through ``lora_format`` (``load_lora`` / ``save_lora``); prefix tuning /
P-tuning v2, prompt tuning and P-tuning through ``prompt_learning_format``.
Saving reads the model's layers only (``fastpeft.nn``); loading applies the
method (``fastpeft.injection``).
"""
from __future__ import annotations

import os
from typing import Optional

from torch import nn

from ..._peft_task_type import infer_task_type
from ...nn.base import peft_layers
from ...nn.modules_to_save import saved_modules
from ...nn.prompt_learning import prompt_learning_layer
from .lora_format import load_lora, save_lora
from .peft_directory import CONFIG_NAME, check_save_arguments, read_config_json
from .prompt_learning_format import PROMPT_LEARNING_TYPES, load_prompt_learning, save_prompt_learning

SUPPORTED_PEFT_TYPES = ("LORA", *PROMPT_LEARNING_TYPES)


def load_peft(model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False) -> nn.Module:
    """Apply the adapter saved in ``directory`` (by ``PeftModel.save_pretrained`` or ``save_peft``) to ``model``.

    In place; returns ``model``. One rule for every ``peft_type``, PEFT's
    ``PeftModel.from_pretrained(..., is_trainable=False)``: by default every
    parameter is frozen and the model is put in ``eval()`` mode; with
    ``is_trainable=True`` the adapter's parameters and the ``modules_to_save``
    copies train (LoRA; prompt tuning and prefix tuning without projection,
    resumed from the saved embedding as PEFT's ``get_peft_model`` +
    ``set_peft_model_state_dict`` resumes them).
    LORA loads as ``fastpeft.load_lora`` does. PREFIX_TUNING, PROMPT_TUNING and
    P_TUNING are rebuilt the way ``PeftModel.from_pretrained`` rebuilds them: the
    saved ``prompt_embeddings`` in a plain embedding (``inference_mode``), the
    saved ``modules_to_save`` (e.g. a classifier's head) in their wrappers; the
    outputs are the checkpoint's. ``modules_to_save`` names the model lacks are
    skipped, as PEFT skips them (its SEQ_CLS task lists ``classifier``, ``score``
    and ``pre_classifier``). Errors (raised before the model changes): a
    non-bool ``is_trainable`` (TypeError); ValueError for an unsupported
    ``peft_type`` (the message lists the supported ones), ``is_trainable=True``
    for P_TUNING or projected prefix tuning (the file holds the encoder's
    output, not the encoder), a checkpoint whose shapes or fields do not fit
    ``model``, a model that already has a prompt-learning method, a
    pickle that is not a plain dict of tensors, tensors the format does not have.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(is_trainable, bool):
        raise TypeError(f"is_trainable must be a bool, got {type(is_trainable).__name__}")
    config = read_config_json(directory)
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise ValueError(f"{CONFIG_NAME}: peft_type {peft_type!r} is not supported by fastpeft.load_peft; "
                         f"supported: {', '.join(SUPPORTED_PEFT_TYPES)}")
    if is_trainable and (peft_type == "P_TUNING" or (peft_type == "PREFIX_TUNING"
                                                     and config.get("prefix_projection"))):
        raise ValueError(f"{CONFIG_NAME}: is_trainable=True cannot resume {peft_type}"
                         f"{' with prefix_projection' if peft_type == 'PREFIX_TUNING' else ''}: the checkpoint "
                         "holds the encoder's output, not the encoder's weights; load it with is_trainable=False")
    if peft_type == "LORA":
        load_lora(model, directory)
        trainable = [p for _, layer in peft_layers(model, "lora") for p in layer.peft_parameters()]
    else:
        load_prompt_learning(model, directory, config)
        layer = prompt_learning_layer(model)
        if is_trainable:
            layer.inference_mode = False  # without a projection the trained form is this same embedding
        trainable = list(layer.parameters())
    trainable += [p for _, wrapper in saved_modules(model) for p in wrapper.trainable_copy.parameters()]
    model.requires_grad_(False)
    if is_trainable:
        for p in trainable:
            p.requires_grad_(True)
    else:
        model.eval()
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
    has_lora = bool(peft_layers(model, "lora"))
    if layer is not None and has_lora:
        raise ValueError(f"model carries both LoRA layers and {layer.peft_type}; a PEFT adapter holds one method")
    if layer is None and not has_lora:
        raise ValueError("model has no adapter to save: apply LoRA, QLoRA, prefix tuning, prompt tuning or "
                         "P-tuning first")
    if task_type == "auto":
        task_type = getattr(layer, "task_type", None) or infer_task_type(model)
    if has_lora:
        save_lora(model, directory, base_model_name_or_path, task_type=task_type)
    else:
        save_prompt_learning(model, directory, layer, task_type, base_model_name_or_path)
