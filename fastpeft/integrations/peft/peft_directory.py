"""HF PEFT's adapter directory, whatever the method: its file names, its config, its tensors, save arguments.

``adapter_config.json`` (``peft_type`` says the method) beside
``adapter_model.safetensors`` (or PEFT's legacy ``adapter_model.bin``, read
with ``torch.load(weights_only=True)``; see
``fastpeft.integrations.adapter_directory``). The methods' own files are
``lora_format`` and ``prompt_learning_format``.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..adapter_directory import read_json, read_weights, write_directory

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def read_config_json(directory: str | os.PathLike) -> dict:
    """``adapter_config.json`` of ``directory`` as a dict, unvalidated (any ``peft_type``)."""
    return read_json(directory, CONFIG_NAME)


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's weights file, by its saved name."""
    return read_weights(directory, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)


def write_adapter(directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors``."""
    write_directory(directory, CONFIG_NAME, config, WEIGHTS_NAME, tensors)


def check_save_arguments(model, directory, base_model_name_or_path, task_type) -> None:
    """TypeError naming the argument for what ``save_lora`` / ``save_peft`` cannot take."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {type(base_model_name_or_path).__name__}")
    if task_type is not None and not isinstance(task_type, str):
        raise TypeError(f"task_type must be a str or None, got {type(task_type).__name__}")
