"""An adapter directory on disk: a JSON config beside one weights file. The one reader and writer of both.

HF PEFT (``adapter_config.json`` + ``adapter_model.safetensors``) and AdapterHub
(``adapter_config.json`` + ``adapter.safetensors``, fusions alike) share this
shape; each format names its files and checks the contents, these functions
only move bytes. One policy for weights: safetensors when the directory has
them, otherwise the format's legacy torch file read with
``torch.load(weights_only=True)``, which rebuilds only tensors and plain
containers and refuses every other object before any of its code runs (a
malicious pickle raises ValueError here). fastpeft writes safetensors only.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file


def check_directory(directory) -> str:
    """``directory`` as a str path; TypeError naming it unless it is a str or os.PathLike."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    return os.fspath(directory)


def read_json(directory, name: str) -> dict:
    """The JSON object in file ``name`` of ``directory`` (FileNotFoundError naming it; ValueError if not an object)."""
    path = os.path.join(check_directory(directory), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"directory {os.fspath(directory)!r} has no {name}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path} is not a usable JSON config: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def read_weights(directory, safetensors_name: str, pickle_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``directory``: ``safetensors_name``, else ``pickle_name`` loaded with weights_only=True."""
    directory = check_directory(directory)
    safe = os.path.join(directory, safetensors_name)
    if os.path.isfile(safe):
        try:
            return load_file(safe, device="cpu")
        except Exception as exc:  # safetensors' SafetensorError (truncated, bad header) or an OS error
            raise ValueError(f"{safe}: not a readable safetensors file ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
    legacy = os.path.join(directory, pickle_name)
    if not os.path.isfile(legacy):
        raise FileNotFoundError(f"directory {directory!r} has neither {safetensors_name} nor {pickle_name}")
    try:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as exc:  # an UnpicklingError for a forbidden object, or anything a corrupt file raises
        raise ValueError(f"{legacy}: refused; fastpeft reads a pickle only as torch.load(weights_only=True) does, "
                         f"and this one is not a plain dict of tensors ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); re-save the adapter with safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{legacy}: refused; the pickle holds {type(state).__name__}, not a dict of tensors")
    return state


def write_directory(directory, config_name: str, config: dict, weights_name: str,
                    tensors: dict[str, torch.Tensor]) -> None:
    """Write ``config`` as JSON and ``tensors`` as safetensors (``{"format": "pt"}`` metadata) into ``directory``."""
    directory = check_directory(directory)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, weights_name), metadata={"format": "pt"})
    with open(os.path.join(directory, config_name), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
