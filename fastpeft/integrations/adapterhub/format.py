"""Read and write bottleneck adapters and AdapterFusion layers in AdapterHub ``adapters`` 1.3's directory format.

An adapter directory (``model.save_adapter(path, name)`` in AdapterHub) holds
- ``adapter_config.json``: ``{"config": <BnConfig fields>, "hidden_size",
  "model_class", "model_name", "model_type", "name", "version"}``;
- ``adapter.safetensors`` (``use_safetensors=True``) or ``pytorch_adapter.bin``
  (a torch state dict; read with ``torch.load(weights_only=True)``, see
  ``fastpeft.integrations.adapter_directory``):
  the adapter's entries of the model's state dict, e.g.
  ``encoder.layer.0.output.adapters.<name>.adapter_down.0.weight`` (BERT),
  ``model.layers.0.output_adapters.adapters.<name>.adapter_up.bias`` (Llama).
A fusion directory holds ``adapter_fusion_config.json`` (``"adapter_names"``
too) and ``model_adapter_fusion.safetensors`` (or
``pytorch_model_adapter_fusion.bin``) with ``...adapter_fusion_layer.<a,b>.query.weight``...

Keys are relative to the model AdapterHub saved from, with or without a head
(``bert.`` / ``model.`` / ``transformer.`` prefix); both load. fastpeft's
adapted models carry the same module paths (``fastpeft.injection.adapter_architectures``),
so names map one to one. ``save_adapter`` writes safetensors only (no
pickle): AdapterHub reads it with ``model.load_adapter(path, use_safetensors=True)``
(and ``load_adapter_fusion(path, use_safetensors=True)``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ...injection.adapter import adapter_layers, apply_adapter, apply_adapter_fusion, set_active_adapter
from ...injection.adapter_architectures import architecture_of, base_model_of, hidden_size_of
from ...injection.adapter_location import AdapterLayer
from ...injection.adapter_placement import new_bottleneck_adapter, planned_adapter_locations
from ...nn.adapter_config import BnConfig, resolve_bn_config
from ...nn.adapter_fusion import AdapterFusion, resolve_fusion_config
from ..adapter_directory import check_directory, read_json, read_weights, write_directory

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_adapter.bin"
HEAD_CONFIG_NAME = "head_config.json"
HEAD_WEIGHTS_NAME = "model_head.safetensors"
HEAD_PICKLE_WEIGHTS_NAME = "pytorch_model_head.bin"
FUSION_CONFIG_NAME = "adapter_fusion_config.json"
FUSION_WEIGHTS_NAME = "model_adapter_fusion.safetensors"
FUSION_PICKLE_WEIGHTS_NAME = "pytorch_model_adapter_fusion.bin"
# What AdapterHub writes as "version"; a config without it gets AdapterHub's legacy activation renaming.
ADAPTERHUB_VERSION = "adapters.1.3.0"
_LEGACY_ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}


def _read_config(directory: str, name: str) -> dict:
    data = read_json(directory, name)
    if not isinstance(data.get("config"), dict):
        raise ValueError(f"{os.path.join(directory, name)}: not an AdapterHub config (no 'config' object)")
    return data


def _check_model_matches(model: nn.Module, meta: dict, path: str) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if meta.get("model_type") not in (None, model_type):
        raise ValueError(f"{path} was saved from a {meta['model_type']!r} model; this model is {model_type!r}")
    hidden = hidden_size_of(model)
    if meta.get("hidden_size") not in (None, hidden):
        raise ValueError(f"{path} was saved for hidden_size {meta['hidden_size']}; this model has {hidden}")


def _base_relative(model: nn.Module, state: dict) -> dict:
    """Keys relative to the base model: strip the head model's base prefix (``bert.``, ``model.``...) when present."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and all(k.startswith(prefix + ".") for k in state):
        return {k[len(prefix) + 1:]: v for k, v in state.items()}
    return dict(state)


def read_adapter_config(path: str | os.PathLike) -> tuple[BnConfig, dict]:
    """``(BnConfig, metadata)`` of an AdapterHub adapter directory (legacy activation names renamed as AdapterHub)."""
    meta = _read_config(check_directory(path), CONFIG_NAME)
    config = dict(meta["config"])
    if "version" not in meta and config.get("non_linearity") in _LEGACY_ACTIVATION_RENAME:
        config["non_linearity"] = _LEGACY_ACTIVATION_RENAME[config["non_linearity"]]
    return resolve_bn_config(config), meta


def load_adapter(model: nn.Module, path: str | os.PathLike, load_as: Optional[str] = None,
                 with_head: bool = True) -> str:
    """Load an AdapterHub adapter directory into ``model`` (in place): apply it, load its weights, freeze the base.

    Returns the adapter's name (``load_as``, or the saved name). Only the
    loaded adapter's parameters require grad afterwards, and it is active.
    With ``with_head`` (AdapterHub's default) a saved static head
    (``head_config.json`` + ``model_head.safetensors``, see ``save_adapter``)
    is loaded into the model's head too.
    Every check (config, model type, hidden size, the exact set of weight names
    and shapes, the head's) runs before the model is changed.
    """
    if not isinstance(with_head, bool):
        raise TypeError(f"with_head must be a bool, got {type(with_head).__name__}")
    path = check_directory(path)
    cfg, meta = read_adapter_config(path)
    saved_name = meta.get("name")
    if not isinstance(saved_name, str) or not saved_name:
        raise ValueError(f"{path}/{CONFIG_NAME}: no adapter 'name'")
    name = load_as or saved_name
    _check_model_matches(model, meta, path)
    state = _base_relative(model, read_weights(path, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME))
    marker = f".adapters.{saved_name}."
    expected = {}
    hidden = hidden_size_of(model)
    for layer_idx, _, location in planned_adapter_locations(model, cfg):
        template = new_bottleneck_adapter(cfg, hidden, layer_idx).state_dict()
        for k, v in template.items():
            expected[f"{location}{marker}{k}"] = v.shape
    _check_keys(state, expected, path)
    head = _saved_head(model, path) if with_head else {}
    apply_adapter(model, cfg, name=name)
    renamed = {k.replace(marker, f".adapters.{name}."): v for k, v in state.items()}
    _load_into_base(model, renamed)
    if head:
        model.load_state_dict(head, strict=False)
    return name


def _head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """AdapterHub's static head: every entry of the model's state dict outside its base model (empty for a
    bare model)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or base_model_of(model) is model:
        return {}
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix + ".")}


def _saved_head(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """The head tensors saved in ``path``, checked against the model's head (empty when either has none: a bare
    model loads only the adapter, as in AdapterHub)."""
    if not _head_state(model) or not any(os.path.isfile(os.path.join(path, n)) for n in (HEAD_WEIGHTS_NAME, HEAD_PICKLE_WEIGHTS_NAME)):
        return {}
    meta = read_json(path, HEAD_CONFIG_NAME)
    if meta.get("config") is not None:
        raise ValueError(f"{path}/{HEAD_CONFIG_NAME}: a flex head (AdapterHub's model.heads) is not supported; "
                         "fastpeft loads a model's own (static) head")
    _check_model_matches(model, meta, path)
    state = read_weights(path, HEAD_WEIGHTS_NAME, HEAD_PICKLE_WEIGHTS_NAME)
    _check_keys(state, {k: v.shape for k, v in _head_state(model).items()}, path)
    return state


def _check_keys(state: dict, expected: dict, path: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: weight names do not match the adapter's config: missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{' ...' if len(unexpected) > 4 else ''}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)}, expected {tuple(shape)}")


def _load_into_base(model: nn.Module, state: dict) -> None:
    base = base_model_of(model)
    with torch.no_grad():
        for key, value in state.items():
            module_path, _, param_name = key.rpartition(".")
            target = base.get_submodule(module_path)
            current = getattr(target, param_name)
            current.copy_(value.to(device=current.device, dtype=current.dtype))


def _adapter_state(model: nn.Module, marker: str) -> dict[str, torch.Tensor]:
    # Separate copies: safetensors refuses tensors that share memory (ln_before registers one LayerNorm twice).
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items() if marker in k}


def _meta(model: nn.Module, name: str, config: dict, **extra) -> dict:
    model_config = getattr(model, "config", None)
    return {"config": config, "hidden_size": hidden_size_of(model), "model_class": type(model).__name__,
            "model_name": getattr(model_config, "name_or_path", "") or "",
            "model_type": getattr(model_config, "model_type", None), "name": name,
            "version": ADAPTERHUB_VERSION, **extra}


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", with_head: bool = True) -> None:
    """Write adapter ``name`` of ``model`` as an AdapterHub directory (``adapter_config.json`` + ``adapter.safetensors``).

    Keys are relative to ``model`` as given, as AdapterHub's would be for the
    same model class. With ``with_head`` (AdapterHub's default) a model with a
    head (``...ForSequenceClassification``, ``...ForCausalLM``) also gets
    AdapterHub's static-head files: ``head_config.json`` (``"config": null``,
    labels) and ``model_head.safetensors`` with every tensor outside the base
    model (``classifier.weight``...), so a head trained with the adapter
    (``apply_adapter(..., modules_to_save=[...])``) reloads with it.
    """
    if not isinstance(with_head, bool):
        raise TypeError(f"with_head must be a bool, got {type(with_head).__name__}")
    architecture_of(model)
    configs = [layer.adapter_configs[name] for _, layer in adapter_layers(model) if name in layer.adapters]
    if not configs:
        raise ValueError(f"name: the model has no adapter called {name!r}")
    state = _adapter_state(model, f".adapters.{name}.")
    write_directory(path, CONFIG_NAME, _meta(model, name, configs[0].to_dict()), WEIGHTS_NAME, state)
    head = _head_state(model) if with_head else {}
    if head:
        model_config = getattr(model, "config", None)
        labels = {"label2id": dict(getattr(model_config, "label2id", None) or {})}
        if getattr(model_config, "num_labels", None) is not None:
            labels["num_labels"] = model_config.num_labels
        head = {k: v.detach().to("cpu").clone().contiguous() for k, v in head.items()}
        write_directory(path, HEAD_CONFIG_NAME, _meta(model, None, None, **labels), HEAD_WEIGHTS_NAME, head)


def _fusion_layers(model: nn.Module, fusion_name: str) -> list[AdapterLayer]:
    return [layer for _, layer in adapter_layers(model) if fusion_name in layer.adapter_fusion_layer]


def save_adapter_fusion(model: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Write fusion ``name`` (e.g. ``"a,b"``) as AdapterHub's ``adapter_fusion_config.json`` + safetensors."""
    architecture_of(model)
    layers = _fusion_layers(model, name)
    if not layers:
        raise ValueError(f"name: the model has no AdapterFusion called {name!r}")
    fusion: AdapterFusion = layers[0].adapter_fusion_layer[name]
    meta = _meta(model, name, fusion.config.to_dict(), adapter_names=list(layers[0].fusion_members[name]))
    state = _adapter_state(model, f".adapter_fusion_layer.{name}.")
    write_directory(path, FUSION_CONFIG_NAME, meta, FUSION_WEIGHTS_NAME, state)


def load_adapter_fusion(model: nn.Module, path: str | os.PathLike) -> str:
    """Load an AdapterHub fusion directory into ``model``, whose fused adapters must be loaded already.

    Returns the fusion's name; it becomes active and only it trains.
    """
    path = check_directory(path)
    meta = _read_config(path, FUSION_CONFIG_NAME)
    cfg = resolve_fusion_config(meta["config"])
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}/{FUSION_CONFIG_NAME}: no fusion 'name'")
    adapter_names = meta.get("adapter_names") or name.split(",")
    _check_model_matches(model, meta, path)
    state = _base_relative(model, read_weights(path, FUSION_WEIGHTS_NAME, FUSION_PICKLE_WEIGHTS_NAME))
    marker = f".adapter_fusion_layer.{name}."
    hidden = hidden_size_of(model)
    template = AdapterFusion(hidden, cfg).state_dict()
    base = base_model_of(model)
    locations = []
    for layer_path, layer in base.named_modules():
        if isinstance(layer, AdapterLayer) and all(n in layer.adapters for n in adapter_names):
            locations.append(layer_path)
    if not locations:
        raise ValueError(f"{path}: the model has no adapter location holding all of {adapter_names}")
    expected = {f"{loc}{marker}{k}": v.shape for loc in locations for k, v in template.items()}
    _check_keys(state, expected, path)
    apply_adapter_fusion(model, adapter_names, cfg, name=name)
    _load_into_base(model, state)
    set_active_adapter(model, name)
    return name
