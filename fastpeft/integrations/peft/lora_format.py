"""LoRA I/O: save and load LoRA adapters in the HF PEFT directory format.

A PEFT LoRA adapter directory holds:
- ``adapter_config.json``: a ``LoraConfig`` (``peft_type`` "LORA", ``r``,
  ``lora_alpha``, ``target_modules``, ...);
- ``adapter_model.safetensors``: tensors named
  ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (PEFT
  strips the adapter name when it saves).

``save_lora`` writes such a directory from a model prepared with
``fastpeft.injection.apply_lora`` (or any model with LoRA-carrying layers,
e.g. ``apply_qlora``), so ``peft.PeftModel.from_pretrained`` loads it;
``load_lora`` reads a directory written by ``PeftModel.save_pretrained`` (or
``save_lora``) into a plain model, or into the LoRA layers a model already
has. Only plain LoRA on Linear/Conv1D is supported; any other config feature
raises ValueError.
Per-module ranks and alphas travel as PEFT's ``rank_pattern``/``alpha_pattern``.
"""
from __future__ import annotations

import collections
import math
import os
import re
from typing import Optional

import torch
from torch import nn

from ...injection.lora import check_lora_targets, lora_modules, mark_only_lora_trainable
from ...injection.qlora import apply_qlora
from ...injection.regex_safety import check_regex
from ...injection.modules_to_save import modules_to_save_names, wrap_modules_to_save
from ...injection.targets import (ALL_LINEAR, TargetSelection, is_under_modules_to_save, matches_target,
                                  selected_modules, swap_modules)
from ...nn.lora import LoRALinear, is_lora_target, lora_scaling
from ...variants import checkpoint_key_pattern, peft_config_fields, variant_for_peft_config, variant_of_layers
from ...nn.modules_to_save import ModulesToSave, saved_modules
from .peft_directory import (CONFIG_NAME, WEIGHTS_NAME, check_save_arguments, read_config_json, read_tensors,
                             write_adapter)

KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")
# A LoRA variant's per-layer tensors (DoRA's lora_magnitude_vector), saved without ".weight" as PEFT does.
_VARIANT_KEY_RE = re.compile(rf"^base_model\.model\.(?P<module>.+)\.(?P<which>{checkpoint_key_pattern()})$")
_PAIR = ("lora_A", "lora_B")

# Config entries this loader cannot honour: (key, value that means "not used").
_UNSUPPORTED_WHEN_SET = {
    "lora_bias": False, "target_parameters": None, "layer_replication": None,
    "trainable_token_indices": None, "use_bdlora": None, "alora_invocation_tokens": None, "arrow_config": None,
    "velora_config": None, "monteclora_config": None, "kasa_config": None, "use_qalora": False,
    "megatron_config": None,
}
# init_lora_weights values that only shape the starting point (the saved weights replace it).
_LOADABLE_INITS = (True, False, "gaussian", "eva", "orthogonal")


def save_lora(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: Optional[str] = None,
              task_type: Optional[str] = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for the LoRA layers of ``model``.

    ``task_type`` is PEFT's (e.g. ``"CAUSAL_LM"``; None: PEFT wraps the model in a plain ``PeftModel``).

    LoRA layers are those of the "lora" kind (``fastpeft.nn.base``) (``LoRALinear``, ``QLoRALinear``).
    The LoRA tensors are saved in their own dtype. Raises ValueError when the
    model has no LoRA layer, one is merged, or dropout or rsLoRA differ between
    layers (a PEFT config has one value for each).
    """
    check_save_arguments(model, directory, base_model_name_or_path, task_type)
    layers = lora_modules(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save; call fastpeft.apply_lora first")
    for name, layer in layers:
        if getattr(layer, "merged", False):
            raise ValueError(f"LoRA layer {name!r} is merged; call unmerge_lora(model) before save_lora")
    dropout = _uniform(layers, "lora_dropout")
    use_rslora = _uniform(layers, "use_rslora")
    variant = variant_of_layers(layers)
    r, rank_pattern = _value_and_pattern(layers, "r")
    lora_alpha, alpha_pattern = _value_and_pattern(layers, "lora_alpha")

    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, [n for n, _ in layers]),
        "use_rslora": use_rslora,
        "fan_in_fan_out": all(getattr(layer, "fan_in_fan_out", False) for _, layer in layers),
        "bias": "none",
        "lora_bias": False,
        **peft_config_fields(),
        **variant.peft_config,
        "init_lora_weights": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    tensors = {}
    for name, layer in layers:
        # copies: layers may share a pair (LoRA-drop), written under each name as PEFT expects
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().clone()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().clone()
        tensors.update({f"{KEY_PREFIX}{name}.{k}": t for k, t in layer.variant.checkpoint_tensors(layer).items()})
    saved = saved_modules(model)
    if saved:
        # PEFT's layout: the trainable copy's tensors without "modules_to_save.<adapter>" in the name.
        config["modules_to_save"] = [name for name, _ in saved]
        for name, wrapper in saved:
            for key, tensor in wrapper.trainable_copy.state_dict().items():
                tensors[f"{KEY_PREFIX}{name}.{key}"] = tensor.detach().cpu().contiguous()

    write_adapter(directory, config, tensors)


def load_lora(model: nn.Module, directory: str | os.PathLike,
              lora_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load the LoRA adapter saved in ``directory`` into ``model`` (in place) and return it.

    Two cases:
    - ``model`` has no LoRA layers: every module the config targets becomes a
      ``LoRALinear`` with the config's rank, alpha, dropout and rsLoRA, holding
      the saved weights (cast to the base weights' dtype, or to ``lora_dtype``).
      As after ``apply_lora``, only the LoRA parameters are trainable.
    - ``model`` already has LoRA layers (``apply_lora``, ``apply_qlora``, ...):
      they must be exactly the adapter's modules, with the config's rank,
      scaling and dropout; the saved weights are copied into them (in their
      dtype; ``lora_dtype`` must then be None) and trainability is left as is.
    Weights are read from safetensors, or from PEFT's legacy ``adapter_model.bin`` with
    ``torch.load(weights_only=True)`` (any other pickle is refused).
    Nothing in the model changes when anything is rejected.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = read_lora_config(directory)
    weights, saved_tensors = _read_weights(directory, config["modules_to_save"])
    targets = config["target_modules"]
    selection = TargetSelection.of(targets, config["exclude_modules"], config["layers_to_transform"],
                                   config["layers_pattern"], config["modules_to_save"])
    saved_plan = _modules_to_save_plan(model, config["modules_to_save"], saved_tensors)
    existing = dict(lora_modules(model))
    if existing:
        if lora_dtype is not None:
            raise ValueError("lora_dtype applies only when load_lora creates the LoRA layers; "
                             "the model already has them")
        _check_module_sets(sorted(existing), sorted(weights), "has LoRA layers")
        _check_targets_match(existing, selection)
        plan = _rank_alpha_plan(config, weights)
        for name, layer in existing.items():
            _check_existing_layer(name, layer, config, *plan[name])
            _check_shapes(name, layer, weights[name])
        with torch.no_grad():
            for name, layer in existing.items():
                layer.lora_A.weight.copy_(weights[name]["lora_A"])
                layer.lora_B.weight.copy_(weights[name]["lora_B"])
                layer.variant.load_checkpoint(layer, _variant_tensors(weights[name]))
        _load_modules_to_save(model, saved_plan)
        return model

    candidates = [n for n in selected_modules(model, selection) if is_lora_target(model.get_submodule(n))]
    _check_module_sets(candidates, sorted(weights), "has targeted Linear/Conv1D modules")
    names = sorted(weights)
    check_lora_targets(model, names)
    plan = _rank_alpha_plan(config, weights)

    def make(name: str, module: nn.Module) -> nn.Module:
        r, alpha = plan[name]
        layer = LoRALinear.from_linear(module, r=r, lora_alpha=alpha, lora_dropout=config["lora_dropout"],
                                       use_rslora=config["use_rslora"], init_lora_weights=False,
                                       lora_dtype=lora_dtype, variant=config["variant"])
        _check_shapes(name, layer, weights[name])
        with torch.no_grad():
            layer.lora_A.weight.copy_(weights[name]["lora_A"])
            layer.lora_B.weight.copy_(weights[name]["lora_B"])
            layer.variant.load_checkpoint(layer, _variant_tensors(weights[name]))
        return layer

    # Build every layer before swapping any in, so a bad tensor leaves the model untouched.
    built = {name: make(name, model.get_submodule(name)) for name in names}
    swap_modules(model, names, lambda name, module: built[name])
    _load_modules_to_save(model, saved_plan)
    mark_only_lora_trainable(model)
    return model


def load_qlora(model: nn.Module, directory: str | os.PathLike, blocksize: int = 64, double_quant: bool = False,
               lora_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load a (Q)LoRA adapter onto a base model in one call, quantising its targets to NF4 (in place).

    ``PeftModel.from_pretrained`` on a 4-bit base, for fastpeft: the config's
    targets, rank, alpha, dropout, rsLoRA and DoRA come from ``directory``;
    ``apply_qlora`` builds the layers (``nn.Linear`` targets quantised with
    ``blocksize``/``double_quant``, bitsandbytes ``Linear4bit`` nf4 targets kept
    as they are) and ``load_lora`` copies the saved weights in; only the LoRA
    parameters train, as after ``apply_qlora``. ``modules_to_save`` names the
    model lacks are skipped, as PEFT skips them. The config and tensors are
    read and checked before the model changes; per-module ranks or alphas
    (``rank_pattern``/``alpha_pattern``) are refused (ValueError), since
    ``apply_qlora`` builds one rank.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = read_lora_config(directory)
    _read_weights(directory, config["modules_to_save"])
    for key in ("rank_pattern", "alpha_pattern"):
        if config[key]:
            raise ValueError(f"{CONFIG_NAME}: {key}={config[key]!r}: load_qlora builds one rank and alpha for "
                             "every layer; apply_qlora per group of modules, then load_lora")
    if lora_modules(model):
        raise ValueError("model already has LoRA layers; load_lora copies an adapter into them")
    names = [n for n, _ in model.named_modules() if n]
    listed = config["modules_to_save"] or []
    present = [m for m in listed if any(is_under_modules_to_save(n, [m]) for n in names)] or None
    apply_qlora(model, config["target_modules"], r=config["r"], lora_alpha=config["lora_alpha"],
                lora_dropout=config["lora_dropout"], use_rslora=config["use_rslora"], init_lora_weights=False,
                blocksize=blocksize, double_quant=double_quant, lora_dtype=lora_dtype,
                exclude_modules=config["exclude_modules"], layers_to_transform=config["layers_to_transform"],
                layers_pattern=config["layers_pattern"], modules_to_save=present,
                use_dora=config["variant"].peft_config.get("use_dora", False))
    return load_lora(model, directory)


def _modules_to_save_plan(model: nn.Module, modules_to_save, saved_tensors: dict) -> list[tuple[str, dict]]:
    """``[(module name, its state dict from the file)]``, checked against the model before anything changes."""
    if not modules_to_save:
        return []
    plan = []
    for name in modules_to_save_names(model, modules_to_save, allow_wrapped=True, skip_missing=True):
        module = model.get_submodule(name)
        target = module.trainable_copy if isinstance(module, ModulesToSave) else module
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in saved_tensors.items() if k.startswith(prefix)}
        expected = target.state_dict()
        if set(state) != set(expected):
            raise ValueError(f"{WEIGHTS_NAME}: modules_to_save {name!r} needs tensors {sorted(expected)[:5]}, "
                             f"the file has {sorted(state)[:5]}")
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(f"{WEIGHTS_NAME}: {KEY_PREFIX}{name}.{key} has shape {tuple(tensor.shape)}, "
                                 f"the model needs {tuple(expected[key].shape)}")
        plan.append((name, state))
    used = {f"{name}.{key}" for name, state in plan for key in state}
    stray = sorted(set(saved_tensors) - used)
    if stray:
        raise ValueError(f"{WEIGHTS_NAME} holds tensors that are neither LoRA weights nor modules_to_save: "
                         f"{stray[:5]}")
    return plan


def _load_modules_to_save(model: nn.Module, plan) -> None:
    """Wrap each planned module in ``ModulesToSave`` (unless it is) and load the file's tensors into its copy."""
    wrap_modules_to_save(model, [name for name, _ in plan
                                 if not isinstance(model.get_submodule(name), ModulesToSave)])
    for name, state in plan:
        model.get_submodule(name).trainable_copy.load_state_dict(state, strict=True)


def _check_module_sets(model_names, file_names, what: str) -> None:
    extra_in_file = sorted(set(file_names) - set(model_names))
    if extra_in_file:
        raise ValueError(
            f"{WEIGHTS_NAME} has weights for modules where the model lacks them or target_modules does not "
            f"select them: {extra_in_file[:5]}"
        )
    no_weights = sorted(set(model_names) - set(file_names))
    if no_weights:
        raise ValueError(f"the model {what} for which {WEIGHTS_NAME} lacks LoRA weights: {no_weights[:5]}")


def _check_targets_match(existing: dict, selection: TargetSelection) -> None:
    if isinstance(selection.target_modules, str) and selection.target_modules.lower() == ALL_LINEAR:
        return  # every LoRA layer wraps a Linear/Conv1D; the file's module names were compared already
    unselected = sorted(n for n in existing if not selection.selects(n))
    if unselected:
        raise ValueError(f"{CONFIG_NAME}: target_modules does not select the model's LoRA layers {unselected[:5]}")


def _rank_alpha_plan(config: dict, weights: dict) -> dict:
    """``{module: (r, lora_alpha)}`` from the config (with its patterns), checked against the tensors."""
    plan = {}
    for name, pair in weights.items():
        a, b = pair["lora_A"], pair["lora_B"]
        r = _pattern_value(config["rank_pattern"], name, config["r"])
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(
                f"{WEIGHTS_NAME}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"but the config gives rank r={r}"
            )
        plan[name] = (r, _pattern_value(config["alpha_pattern"], name, config["lora_alpha"]))
    return plan


def _check_existing_layer(name: str, layer: nn.Module, config: dict, r: int, alpha) -> None:
    if layer.variant is not config["variant"]:
        raise ValueError(f"LoRA layer {name!r} is a {layer.variant.name} layer; the adapter is "
                         f"{config['variant'].name} ({CONFIG_NAME}: {config['variant'].peft_config or 'plain LoRA'})")
    scaling = lora_scaling(r, alpha, config["use_rslora"])
    if layer.r != r or not math.isclose(layer.scaling, scaling, rel_tol=1e-12):
        raise ValueError(
            f"LoRA layer {name!r} has r={layer.r}, scaling={layer.scaling:g}; the adapter has r={r}, "
            f"scaling={scaling:g} (lora_alpha={alpha}, use_rslora={config['use_rslora']})"
        )
    if layer.lora_dropout != config["lora_dropout"]:
        raise ValueError(
            f"LoRA layer {name!r} has lora_dropout={layer.lora_dropout}; the adapter has {config['lora_dropout']}"
        )


def _variant_tensors(pair: dict) -> dict:
    """A module's tensors from the file other than the LoRA pair (its variant's, e.g. DoRA's magnitude)."""
    return {key: tensor for key, tensor in pair.items() if key not in _PAIR}


def _check_shapes(name: str, layer: nn.Module, pair: dict) -> None:
    layer.variant.check_checkpoint(f"{WEIGHTS_NAME}: {KEY_PREFIX}{name}", layer.variant.checkpoint_shapes(layer),
                                   _variant_tensors(pair))
    for which in ("lora_A", "lora_B"):
        expected, tensor = getattr(layer, which).weight.shape, pair[which]
        if tensor.shape != expected:
            raise ValueError(
                f"{WEIGHTS_NAME}: {KEY_PREFIX}{name}.{which}.weight has shape {tuple(tensor.shape)}, "
                f"the model needs {tuple(expected)}"
            )


def read_lora_config(directory: str | os.PathLike) -> dict:
    """The validated ``adapter_config.json`` of ``directory`` as a dict (defaults filled in)."""
    config = read_config_json(directory)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{CONFIG_NAME}: peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    for key, unused in _UNSUPPORTED_WHEN_SET.items():
        value = config.get(key, unused)
        if value != unused and value not in (None, False, [], {}):
            raise ValueError(f"{CONFIG_NAME}: {key}={value!r} is not supported by fastpeft.load_lora")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{CONFIG_NAME}: bias={config['bias']!r} is not supported (only 'none')")
    init = config.get("init_lora_weights", True)
    if init not in _LOADABLE_INITS:
        raise ValueError(
            f"{CONFIG_NAME}: init_lora_weights={init!r} changes the base weights or needs extra state; "
            "not supported by fastpeft.load_lora"
        )
    out = {
        "exclude_modules": config.get("exclude_modules") or None,
        "layers_to_transform": _none_if_empty(config.get("layers_to_transform")),
        "layers_pattern": config.get("layers_pattern") or None,
        "modules_to_save": config.get("modules_to_save") or None,
        "r": config.get("r", 8),
        "lora_alpha": config.get("lora_alpha", 8),
        "lora_dropout": config.get("lora_dropout", 0.0),
        "use_rslora": bool(config.get("use_rslora", False)),
        "target_modules": config.get("target_modules"),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "variant": variant_for_peft_config(config),
    }
    if not out["target_modules"]:
        raise ValueError(f"{CONFIG_NAME}: target_modules is missing or empty")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(out[key], dict):
            raise ValueError(f"{CONFIG_NAME}: {key} must be an object, got {out[key]!r}")
        for pattern in out[key]:
            check_regex(f"{CONFIG_NAME}: {key} key", pattern)
    try:
        TargetSelection.of(out["target_modules"], out["exclude_modules"], out["layers_to_transform"],
                           out["layers_pattern"], out["modules_to_save"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{CONFIG_NAME}: {exc}") from None
    return out


def _none_if_empty(value):
    return None if value is None or value == [] else value


def _read_weights(directory, modules_to_save=None) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``({module path: {"lora_A": tensor, "lora_B": tensor}}, {modules_to_save tensor name: tensor})``
    from the directory's weights (names without the ``base_model.model.`` prefix)."""
    weights: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    saved: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in read_tensors(directory).items():
        match = _KEY_RE.match(key) or _VARIANT_KEY_RE.match(key)
        if match is None:
            inner = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else None
            if inner is not None and modules_to_save and is_under_modules_to_save(inner, modules_to_save):
                saved[inner] = tensor
            else:
                unexpected.append(key)
            continue
        weights[match["module"]][match["which"]] = tensor
    if unexpected:
        raise ValueError(f"{WEIGHTS_NAME} holds tensors that are not plain LoRA A/B weights: {unexpected[:5]}")
    for name, pair in weights.items():
        if not set(_PAIR) <= set(pair):
            raise ValueError(f"{WEIGHTS_NAME}: {name} has {sorted(pair)} but needs both lora_A and lora_B")
    return dict(weights), saved


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank/alpha pattern lookup: the first key that matches a ``.``-bounded suffix of ``name``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _uniform(layers, attribute):
    values = {getattr(layer, attribute) for _, layer in layers}
    if len(values) != 1:
        raise ValueError(f"LoRA layers differ in {attribute} ({sorted(values)}); a PEFT config holds one value")
    return values.pop()


def _value_and_pattern(layers, attribute):
    """The most common value, plus a PEFT pattern for the layers that differ from it.

    Pattern keys are leaf names (``"v_proj"``) when every layer with that leaf
    name shares the value, else escaped full module paths.
    """
    counts = collections.Counter(getattr(layer, attribute) for _, layer in layers)
    common = counts.most_common(1)[0][0]
    by_leaf = collections.defaultdict(list)
    for name, layer in layers:
        by_leaf[name.rsplit(".", 1)[-1]].append((name, getattr(layer, attribute)))
    pattern = {}
    for leaf, entries in by_leaf.items():
        values = {value for _, value in entries}
        if values == {common}:
            continue
        if len(values) == 1:
            pattern[re.escape(leaf)] = values.pop()
        else:
            pattern.update({re.escape(name): value for name, value in entries if value != common})
    if isinstance(common, float) and math.isfinite(common) and common.is_integer():
        common = int(common)
    return common, pattern


def _target_modules(model: nn.Module, lora_names: list[str]) -> list[str]:
    """Leaf names (``q_proj``...) when they select exactly the LoRA layers, else the full paths."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in lora_names})
    inside_lora = tuple(f"{name}." for name in lora_names)
    selected = {n for n, _ in model.named_modules()
                if n and not n.startswith(inside_lora) and matches_target(n, leaves)}
    return leaves if selected == set(lora_names) else sorted(lora_names)
