"""The public API of bottleneck adapters in a transformers model: apply, fuse, activate, drop, list.

Where an adapter sits follows AdapterHub ``adapters`` 1.3 exactly, so its
checkpoints and outputs carry over (``fastpeft.integrations.adapterhub``).
The job is split by file: ``adapter_location`` (the adapters of one location,
``AdapterLayer``, and the AdapterDrop gate), ``adapter_blocks`` (the modules
swapped into a block), ``adapter_architectures`` (which model families, and
where their locations are), ``adapter_placement`` (checking a model and
swapping its blocks). Adapter parameters get AdapterHub's names
(``encoder.layer.0.output.adapters.<name>.adapter_up.weight``,
``layers.0.output_adapters.adapters.<name>...``). Every argument is checked
before the model is touched.
"""
from __future__ import annotations

from numbers import Real
from typing import Iterable, Mapping, Optional, Sequence, Union

from torch import Tensor, nn

from ..nn.adapter_config import BnConfig, resolve_bn_config
from ..nn.adapter_fusion import AdapterFusion, AdapterFusionConfig, resolve_fusion_config
from .adapter_architectures import architecture_of, base_model_of, hidden_size_of
from .adapter_location import AdapterLayer
from .modules_to_save import modules_to_save_names
from .adapter_placement import layer_blocks, new_bottleneck_adapter, planned_adapter_locations, wrap_block


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """``(name, AdapterLayer)`` of every adapter location of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def _check_name(name, what: str = "name") -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{what} must be a non-empty str, got {name!r}")
    if "." in name or "," in name:
        raise ValueError(f"{what} {name!r} must not contain '.' or ','")
    return name


def _adapter_names(model: nn.Module) -> set[str]:
    return {n for _, layer in adapter_layers(model) for n in layer.adapters}


def _fusion_names(model: nn.Module) -> set[str]:
    return {n for _, layer in adapter_layers(model) for n in layer.adapter_fusion_layer}


def apply_adapter(model: nn.Module, config: Union[str, Mapping, BnConfig] = "seq_bn", name: str = "default",
                  modules_to_save: Optional[Sequence[str]] = None, **overrides) -> nn.Module:
    """Add a bottleneck adapter called ``name`` to ``model`` (in place) and make it the one that trains.

    ``config``: a preset (``seq_bn``, ``double_seq_bn``, ``par_bn``,
    ``scaled_par_bn``), a dict of AdapterHub ``BnConfig`` fields or a
    ``BnConfig``; ``overrides`` replace fields. The adapter becomes active;
    every other parameter of the model (other adapters included) is frozen,
    except the modules ``modules_to_save`` names (PEFT's matching, e.g.
    ``["classifier"]`` for a new head), which train with the adapter in place
    (AdapterHub's ``train_adapter`` keeps a model's own head trainable the same
    way; ``save_adapter`` writes the head as AdapterHub does).
    Raises ValueError (unknown field or preset, bad value, unsupported model
    type, a name in use, ``leave_out`` beyond the last layer, a
    ``modules_to_save`` entry matching no module) or TypeError (a block whose
    structure is not the expected one) before changing anything.
    """
    cfg = resolve_bn_config(config, **overrides)
    _check_name(name)
    heads = modules_to_save_names(model, modules_to_save) if modules_to_save is not None else []
    locations = planned_adapter_locations(model, cfg)
    if name in _adapter_names(model) or name in _fusion_names(model):
        raise ValueError(f"name: the model already has an adapter or fusion called {name!r}")
    hidden = hidden_size_of(model)
    arch = architecture_of(model)
    base = base_model_of(model)
    blocks = layer_blocks(model, arch)
    new = {}
    for layer_idx, _, path in locations:
        ref = next(blocks[layer_idx].parameters(), None)
        adapter = new_bottleneck_adapter(cfg, hidden, layer_idx)
        if ref is not None:
            adapter = adapter.to(device=ref.device, dtype=ref.dtype)
        new[path] = adapter
    for layer_idx in sorted({i for i, _, _ in locations}):
        wrap_block(model, arch, layer_idx)
    for _, _, path in locations:
        base.get_submodule(path).add_adapter(name, new[path], cfg)
    set_active_adapter(model, name)
    head_params = [p for head in heads for p in model.get_submodule(head).parameters()]
    _train_only(model, [p for a in new.values() for p in a.parameters()] + head_params)
    return model


def apply_adapter_fusion(model: nn.Module, adapter_names: Sequence[str],
                         config: Union[str, Mapping, AdapterFusionConfig] = "dynamic",
                         name: Optional[str] = None, **overrides) -> nn.Module:
    """Add an AdapterFusion layer over ``adapter_names`` at every location that has all of them; train only it.

    The fusion is called ``name`` (default: AdapterHub's ``",".join(adapter_names)``)
    and becomes active. ``config``: ``"dynamic"`` (default), ``"static"``, a
    dict of AdapterFusionConfig fields or a config; ``overrides`` replace
    fields. The attention-score dropout is the config's ``dropout_prob`` or the
    model's ``attention_probs_dropout_prob`` (as AdapterHub).
    """
    cfg = resolve_fusion_config(config, **overrides)
    if isinstance(adapter_names, str):
        adapter_names = adapter_names.split(",")
    adapter_names = [_check_name(n, "adapter_names entry") for n in adapter_names]
    if len(adapter_names) < 2 or len(set(adapter_names)) != len(adapter_names):
        raise ValueError(f"adapter_names must name at least two distinct adapters, got {adapter_names}")
    fusion_name = ",".join(adapter_names) if name is None else name
    if not isinstance(fusion_name, str) or not fusion_name or "." in fusion_name:
        raise ValueError(f"name {fusion_name!r} must be a non-empty str without '.'")
    known = _adapter_names(model)
    missing = [n for n in adapter_names if n not in known]
    if missing:
        raise ValueError(f"adapter_names: the model has no adapter called {missing}; it has {sorted(known)}")
    if fusion_name in _fusion_names(model) or fusion_name in known:
        raise ValueError(f"name: the model already has an adapter or fusion called {fusion_name!r}")
    targets = [layer for _, layer in adapter_layers(model) if all(n in layer.adapters for n in adapter_names)]
    if not targets:
        raise ValueError(f"adapter_names: no adapter location holds all of {adapter_names}")
    hidden = hidden_size_of(model)
    dropout = cfg.dropout_prob
    if dropout is None:
        dropout = getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0) or 0.0
    new = []
    for layer in targets:
        ref = layer.adapters[adapter_names[0]]
        p = next(ref.parameters())
        fusion = AdapterFusion(hidden, cfg, dropout_prob=float(dropout)).to(device=p.device, dtype=p.dtype)
        new.append((layer, fusion))
    for layer, fusion in new:
        layer.add_fusion(fusion_name, adapter_names, fusion)
    set_active_adapter(model, fusion_name)
    _train_only(model, [p for _, f in new for p in f.parameters()])
    return model


def set_active_adapter(model: nn.Module, name: Optional[str]) -> nn.Module:
    """Make adapter or fusion ``name`` the one every location runs (None: run the plain model)."""
    if name is not None and name not in _adapter_names(model) and name not in _fusion_names(model):
        raise ValueError(f"name: no adapter or fusion called {name!r}; adapters: {sorted(_adapter_names(model))}, "
                         f"fusions: {sorted(_fusion_names(model))}")
    for _, layer in adapter_layers(model):
        layer.set_active(name)
    return model


def set_adapter_drop(model: nn.Module, skip_layers: Optional[Iterable[int]] = None,
                     adapter_drop_p: Union[float, Mapping[int, float]] = 0.0) -> nn.Module:
    """AdapterDrop (Rücklé et al. 2021): skip the adapters of some layers, or drop them at random in training.

    ``skip_layers``: layer indices whose adapters never run (the block computes
    what it computed without adapters; no adapter op is launched).
    ``adapter_drop_p``: in training mode, each layer's adapters are dropped for
    one forward with this probability (a float for every layer, or a mapping
    ``{layer index: probability}`` as an explicit schedule, e.g. the first
    ``n`` layers only). Calling again replaces both settings.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model: it has no adapters (call apply_adapter first)")
    n_layers = len(layer_blocks(model, architecture_of(model)))
    skip = set()
    for i in (skip_layers or ()):
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers:
            raise ValueError(f"skip_layers: {i!r} is not a layer index in [0, {n_layers})")
        skip.add(i)
    if isinstance(adapter_drop_p, Mapping):
        probs = dict(adapter_drop_p)
    else:
        probs = {i: adapter_drop_p for i in range(n_layers)}
    for i, p in probs.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers:
            raise ValueError(f"adapter_drop_p: {i!r} is not a layer index in [0, {n_layers})")
        if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= p <= 1.0:
            raise ValueError(f"adapter_drop_p must be a probability in [0, 1], got {p!r} for layer {i}")
    for _, layer in layers:
        layer.drop_gate.skip = layer.layer_idx in skip
        layer.drop_gate.p = float(probs.get(layer.layer_idx, 0.0))
    return model


def adapter_parameters(model: nn.Module, name: Optional[str] = None) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` (every adapter when None), in module order."""
    out = []
    for _, layer in adapter_layers(model):
        for n, adapter in layer.adapters.items():
            if name is None or n == name:
                out.extend(adapter.parameters())
    return out


def adapter_fusion_regularization_loss(model: nn.Module) -> Optional[Tensor]:
    """Sum of ``0.01 · ‖I − W_V‖²`` over the fusion layers whose config asks for it and whose W_V trains."""
    total = None
    for _, layer in adapter_layers(model):
        for fusion in layer.adapter_fusion_layer.values():
            if fusion.config.regularization and fusion.config.value and fusion.value.weight.requires_grad:
                term = fusion.regularization_loss()
                total = term if total is None else total + term
    return total


def _train_only(model: nn.Module, params: list[nn.Parameter]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
