"""Put bottleneck adapters (and AdapterFusion, AdapterDrop) into a transformers model, in place.

Where an adapter sits follows AdapterHub ``adapters`` 1.3 exactly, so its
checkpoints and outputs carry over (``fastpeft.integrations.adapterhub``;
facts in ``docs/architecture.md``, "Bottleneck adapters"). Each transformer
layer has two adapter *locations*: ``mh_adapter`` (after the attention
sub-layer) and ``output_adapter`` (after the feed-forward sub-layer). At a
location the sub-layer's output ``h``, its input ``x`` (the residual stream)
and the block's LayerNorm (post-LN blocks; None in pre-LN blocks) meet an
``AdapterLayer``, which does what the block did (``LN(h + x)`` or ``h + x``)
plus the adapter, as AdapterHub's ``BottleneckLayer`` does.

The per-architecture table ``ARCHITECTURES`` says what is swapped:
- post-LN encoders (BERT, RoBERTa): the ``attention.output`` and ``output``
  modules (``BertSelfOutput``/``BertOutput``) become ``PostLNOutputWithAdapters``
  (same ``dense``/``dropout``/``LayerNorm`` children, plus the adapters);
- pre-LN decoders (GPT-2; Llama, Mistral, Qwen2): each block becomes a
  ``PreLNBlockWithAdapters`` holding the block's own children plus
  ``attention_adapters``/``output_adapters``.
The swapped modules keep the original children under their original names, so
base-model parameter names do not change, and the adapter parameters get
AdapterHub's names (``encoder.layer.0.output.adapters.<name>.adapter_up.weight``,
``layers.0.output_adapters.adapters.<name>...``). No transformers class is
patched. Every argument is checked before the model is touched.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from numbers import Real
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..nn.adapter import BottleneckAdapter
from ..nn.adapter_config import BnConfig, resolve_bn_config
from ..nn.adapter_fusion import AdapterFusion, AdapterFusionConfig, resolve_fusion_config

LOCATIONS = ("mh_adapter", "output_adapter")


# ----------------------------------------------------------------------------------------------------------------
# One adapter location
# ----------------------------------------------------------------------------------------------------------------

class LayerDropGate:
    """AdapterDrop state shared by the locations of one transformer layer.

    ``skip`` removes the layer's adapters (inference); ``p`` drops them at
    random in training, one draw per forward of the layer: the first location
    of the layer draws, the later ones reuse its decision.
    """

    def __init__(self):
        self.skip = False
        self.p = 0.0
        self.first_location: Optional[str] = None
        self._dropped = False

    def dropped(self, location_key: str, training: bool) -> bool:
        if self.skip:
            return True
        if not training or self.p <= 0.0:
            return False
        if location_key == self.first_location or self.first_location is None:
            self._dropped = bool(torch.rand(()) < self.p)
        return self._dropped


class AdapterLayer(nn.Module):
    """The adapters of one location: ``adapters`` and ``adapter_fusion_layer`` (AdapterHub's names and semantics).

    ``adapter_layer_forward(h, x, layer_norm)`` returns what the block would
    have computed at this location (``layer_norm(h + x)``, or ``h + x`` when
    ``layer_norm`` is None) with the active adapter or fusion applied. Nothing
    adapter-related runs when no adapter is active or AdapterDrop skips it.
    """

    def __init__(self, location_key: str, layer_idx: int, drop_gate: LayerDropGate):
        super().__init__()
        self.location_key = location_key
        self.layer_idx = layer_idx
        self.adapters = nn.ModuleDict()
        self.adapter_fusion_layer = nn.ModuleDict()
        self.adapter_configs: dict[str, BnConfig] = {}
        self.fusion_members: dict[str, list[str]] = {}
        self.active: Optional[str] = None
        self.drop_gate = drop_gate

    def add_adapter(self, name: str, adapter: BottleneckAdapter, config: BnConfig) -> None:
        self.adapters[name] = adapter.train(self.training)  # follow the model's train/eval mode
        self.adapter_configs[name] = config

    def add_fusion(self, fusion_name: str, members: list[str], fusion: AdapterFusion) -> None:
        self.adapter_fusion_layer[fusion_name] = fusion.train(self.training)
        self.fusion_members[fusion_name] = list(members)

    def set_active(self, name: Optional[str]) -> None:
        known = name in self.adapters or name in self.adapter_fusion_layer
        self.active = name if known else None

    def adapter_layer_forward(self, hidden_states: Tensor, residual_input: Tensor,
                              layer_norm: Optional[nn.Module]) -> Tensor:
        name = self.active
        if name is None or self.drop_gate.dropped(self.location_key, self.training):
            return _block_residual(hidden_states, residual_input, layer_norm)
        if name in self.adapter_fusion_layer:
            return self._fuse(name, hidden_states, residual_input, layer_norm)
        cfg = self.adapter_configs[name]
        adapter = self.adapters[name]
        h_in, _, residual = _pre_forward(cfg, hidden_states, residual_input, layer_norm)
        if cfg.is_parallel:
            out = _parallel_adapter_output(adapter, h_in)
        else:
            out = adapter(h_in, residual)
        return _post_forward(cfg, out, hidden_states, residual_input, layer_norm)

    forward = adapter_layer_forward

    def _fuse(self, fusion_name: str, hidden_states: Tensor, residual_input: Tensor,
              layer_norm: Optional[nn.Module]) -> Tensor:
        members = self.fusion_members[fusion_name]
        fusion = self.adapter_fusion_layer[fusion_name]
        cfg = self.adapter_configs[members[-1]]  # AdapterHub: the last fused adapter's config decides
        h_in, query, residual = _pre_forward(cfg, hidden_states, residual_input, layer_norm,
                                             query_before_ln=fusion.config.query_before_ln)
        ups = torch.stack([self.adapters[n].adapter_output(h_in) for n in members], dim=-2)
        out = fusion(query, ups, residual)
        return _post_forward(cfg, out, hidden_states, residual_input, layer_norm)

    def extra_repr(self) -> str:
        return f"location={self.location_key}, layer={self.layer_idx}, active={self.active}"


def _block_residual(h: Tensor, x: Tensor, layer_norm: Optional[nn.Module]) -> Tensor:
    return layer_norm(h + x) if layer_norm is not None else h + x


def _pre_forward(cfg: BnConfig, h: Tensor, x: Tensor, layer_norm: Optional[nn.Module],
                 query_before_ln: Optional[bool] = None):
    """``(adapter input, fusion query, adapter residual)``: AdapterHub's ``Adapter.pre_forward``."""
    if cfg.is_parallel:
        return x, x, x
    query = h if query_before_ln else None
    residual = h if cfg.residual_before_ln is True else None
    if cfg.original_ln_before:
        h = h + x
        if cfg.residual_before_ln == "post_add":
            residual = h
        if layer_norm is not None:
            h = layer_norm(h)
    if cfg.residual_before_ln is False:
        residual = h
    if query_before_ln is False:
        query = h
    if residual is None:  # "post_add" without original_ln_before: AdapterHub leaves it undefined
        raise ValueError("residual_before_ln='post_add' needs original_ln_before=True")
    return h, query, residual


def _post_forward(cfg: BnConfig, out: Tensor, h: Tensor, x: Tensor, layer_norm: Optional[nn.Module]) -> Tensor:
    """AdapterHub's ``post_forward`` (``ParallelAdapter``'s adds the sub-layer output first)."""
    if cfg.is_parallel:
        out = out + h
    if cfg.original_ln_after:
        out = _block_residual(out, x, layer_norm)
    return out


def _parallel_adapter_output(adapter: BottleneckAdapter, x: Tensor) -> Tensor:
    """AdapterHub's ``ParallelAdapter.forward``: the adapter branch with no residual (``ln_after`` still applies)."""
    return adapter(x, None)


# ----------------------------------------------------------------------------------------------------------------
# Swapped modules
# ----------------------------------------------------------------------------------------------------------------

class PostLNOutputWithAdapters(AdapterLayer):
    """A BERT-style ``SelfOutput``/``Output`` (``LN(dropout(dense(h)) + x)``) with an adapter location."""

    CHILDREN = frozenset({"dense", "dropout", "LayerNorm"})

    def __init__(self, original: nn.Module, location_key: str, layer_idx: int, drop_gate: LayerDropGate):
        super().__init__(location_key, layer_idx, drop_gate)
        self.dense = original.dense
        self.dropout = original.dropout
        self.LayerNorm = original.LayerNorm

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        h = self.dropout(self.dense(hidden_states))
        return self.adapter_layer_forward(h, input_tensor, self.LayerNorm)


class PreLNBlockWithAdapters(nn.Module):
    """A pre-LN transformer block ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with two adapter locations.

    Holds the block's own children under their names (``names``: attention,
    mlp, and the two norms) and ``attention_adapters``/``output_adapters``. The
    block's call arguments are bound to the original class's ``forward``
    signature and passed on to the attention module as keywords, as the
    original forward does.
    """

    # transformers' gradient_checkpointing_enable() sets these on every module that has the attribute.
    gradient_checkpointing = False

    def __init__(self, original: nn.Module, names: "_PreLNNames", layer_idx: int, drop_gate: LayerDropGate):
        super().__init__()
        for key, value in vars(original).items():
            if (not key.startswith("_") or key == "_gradient_checkpointing_func") and key != "training":
                setattr(self, key, value)  # plain attributes the model may read (attention_type, layer_idx, ...)
        self._names = names
        self._signature = inspect.signature(type(original).forward)
        for child in (names.attn, names.mlp, names.norm1, names.norm2):
            setattr(self, child, getattr(original, child))
        self.attention_adapters = AdapterLayer("mh_adapter", layer_idx, drop_gate)
        self.output_adapters = AdapterLayer("output_adapter", layer_idx, drop_gate)

    def _attention_kwargs(self, hidden_states, args, kwargs) -> dict:
        bound = self._signature.bind(self, hidden_states, *args, **kwargs).arguments
        params = self._signature.parameters
        out = {}
        for i, (key, value) in enumerate(bound.items()):
            if i < 2:
                continue  # self, hidden_states
            if params[key].kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            elif params[key].kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"{type(self).__name__}: unexpected extra positional arguments")
            else:
                out[key] = value
        for key in ("encoder_hidden_states", "encoder_attention_mask"):
            if out.pop(key, None) is not None:
                raise ValueError(f"{key}: cross-attention blocks are not supported with adapters")
        return out

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        """The block's forward; under gradient checkpointing (set by the model) it is recomputed in backward."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # As transformers' checkpointed layers: no cache is written while checkpointing (the replay would write twice).
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
                if kwargs.get(key) is not None:
                    kwargs[key] = None
            run = getattr(self, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
            return run(partial(self._block_forward, **kwargs), hidden_states, *args)
        return self._block_forward(hidden_states, *args, **kwargs)

    def _block_forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        n = self._names
        attn_kwargs = self._attention_kwargs(hidden_states, args, kwargs)
        residual = hidden_states
        h = getattr(self, n.norm1)(hidden_states)
        if n.attn_hidden_as_keyword:
            h = getattr(self, n.attn)(hidden_states=h, **attn_kwargs)[0]
        else:
            h = getattr(self, n.attn)(h, **attn_kwargs)[0]
        h = self.attention_adapters(h, residual, None)
        residual = h
        h = getattr(self, n.mlp)(getattr(self, n.norm2)(h))
        return self.output_adapters(h, residual, None)


# ----------------------------------------------------------------------------------------------------------------
# Architecture table
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _PreLNNames:
    attn: str
    mlp: str
    norm1: str
    norm2: str
    attn_hidden_as_keyword: bool


@dataclass(frozen=True)
class Architecture:
    """Where adapters sit in one model family (paths relative to the block, ``layers`` to the base model)."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    locations: dict  # location key -> module path inside the block (AdapterHub's)
    pre_ln: Optional[_PreLNNames] = None  # None: post-LN, the location modules themselves are swapped


ARCHITECTURES = (
    Architecture("bert", ("bert", "roberta"), "encoder.layer",
                 {"mh_adapter": "attention.output", "output_adapter": "output"}),
    Architecture("gpt2", ("gpt2",), "h", {"mh_adapter": "attention_adapters", "output_adapter": "output_adapters"},
                 _PreLNNames("attn", "mlp", "ln_1", "ln_2", attn_hidden_as_keyword=False)),
    Architecture("llama", ("llama", "mistral", "qwen2"), "layers",
                 {"mh_adapter": "attention_adapters", "output_adapter": "output_adapters"},
                 _PreLNNames("self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
                             attn_hidden_as_keyword=True)),
)
SUPPORTED_MODEL_TYPES = tuple(t for a in ARCHITECTURES for t in a.model_types)


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers base model (``model.base_model``), or ``model`` itself."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def architecture_of(model: nn.Module) -> Architecture:
    """The table entry of ``model``; ValueError naming the supported model types otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise ValueError(f"model: adapters are not supported for model_type {model_type!r} ({type(model).__name__}); "
                     f"supported model types: {list(SUPPORTED_MODEL_TYPES)}")


def _blocks(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    try:
        blocks = base_model_of(model).get_submodule(arch.layers)
    except AttributeError:
        raise ValueError(f"model: no {arch.layers!r} layer list in {type(model).__name__}") from None
    return blocks


def _check_block(block: nn.Module, arch: Architecture, i: int) -> None:
    """TypeError when block ``i`` does not have the structure the wrapper reproduces."""
    if isinstance(block, PreLNBlockWithAdapters):
        return
    if arch.pre_ln is not None:
        n = arch.pre_ln
        expected = {n.attn, n.mlp, n.norm1, n.norm2}
        if set(block._modules) != expected:
            raise TypeError(f"layer {i} ({type(block).__name__}) has children {sorted(block._modules)}; adapters "
                            f"support blocks made of exactly {sorted(expected)}")
        return
    for path in arch.locations.values():
        sub = block.get_submodule(path)
        if not isinstance(sub, PostLNOutputWithAdapters) and set(sub._modules) != PostLNOutputWithAdapters.CHILDREN:
            raise TypeError(f"layer {i}: {path} ({type(sub).__name__}) has children {sorted(sub._modules)}; "
                            f"adapters support {sorted(PostLNOutputWithAdapters.CHILDREN)}")


def _location_paths(model: nn.Module, arch: Architecture, cfg: BnConfig) -> list[tuple[int, str, str]]:
    """``(layer index, location key, path from the base model)`` of every location ``cfg`` puts an adapter at."""
    blocks = _blocks(model, arch)
    n_layers = len(blocks)
    bad = [i for i in cfg.leave_out if i >= n_layers]
    if bad:
        raise ValueError(f"leave_out: layer(s) {bad} do not exist; the model has {n_layers} layers")
    out = []
    for i, block in enumerate(blocks):
        _check_block(block, arch, i)
        if i in cfg.leave_out:
            continue
        for key in LOCATIONS:
            if getattr(cfg, key):
                out.append((i, key, f"{arch.layers}.{i}.{arch.locations[key]}"))
    return out


def _wrap_block(model: nn.Module, arch: Architecture, i: int) -> None:
    """Swap block ``i`` (or its location modules) for the fastpeft modules, once."""
    blocks = _blocks(model, arch)
    block = blocks[i]
    if arch.pre_ln is not None:
        if not isinstance(block, PreLNBlockWithAdapters):
            blocks[i] = PreLNBlockWithAdapters(block, arch.pre_ln, i, _new_gate(arch)).train(block.training)
        return
    gate = None
    for key, path in arch.locations.items():
        sub = block.get_submodule(path)
        if isinstance(sub, PostLNOutputWithAdapters):
            gate = sub.drop_gate
    gate = gate or _new_gate(arch)
    for key, path in arch.locations.items():
        original = block.get_submodule(path)
        if not isinstance(original, PostLNOutputWithAdapters):
            wrapper = PostLNOutputWithAdapters(original, key, i, gate).train(original.training)
            _set_submodule(block, path, wrapper)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _new_gate(arch: Architecture) -> LayerDropGate:
    gate = LayerDropGate()
    gate.first_location = LOCATIONS[0]
    return gate


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

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


def hidden_size_of(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"model: config.hidden_size is {size!r}; a positive int is needed")
    return size


def new_bottleneck_adapter(cfg: BnConfig, hidden_size: int, layer_idx: int) -> BottleneckAdapter:
    """The ``BottleneckAdapter`` that ``cfg`` puts at a location of layer ``layer_idx``."""
    scaling = float(cfg.scaling) if isinstance(cfg.scaling, Real) else cfg.scaling
    return BottleneckAdapter(hidden_size, bottleneck_size=cfg.bottleneck_size(hidden_size, layer_idx),
                             non_linearity=cfg.non_linearity, scaling=scaling, init_weights=cfg.init_weights,
                             ln_before=cfg.ln_before, ln_after=cfg.ln_after,
                             residual_before_ln=cfg.residual_before_ln,
                             adapter_residual_before_ln=cfg.adapter_residual_before_ln, use_gating=cfg.use_gating,
                             dropout=float(cfg.dropout), original_ln_before=cfg.original_ln_before,
                             original_ln_after=cfg.original_ln_after, is_parallel=cfg.is_parallel)


def planned_adapter_locations(model: nn.Module, cfg: BnConfig) -> list[tuple[int, str, str]]:
    """Where ``apply_adapter`` would put adapters of ``cfg`` (validates the model; changes nothing)."""
    arch = architecture_of(model)
    locations = _location_paths(model, arch, cfg)
    if not locations:
        raise ValueError("leave_out leaves out every layer: the adapter would sit nowhere")
    return locations


def apply_adapter(model: nn.Module, config: Union[str, Mapping, BnConfig] = "seq_bn", name: str = "default",
                  **overrides) -> nn.Module:
    """Add a bottleneck adapter called ``name`` to ``model`` (in place) and make it the one that trains.

    ``config``: a preset (``seq_bn``, ``double_seq_bn``, ``par_bn``,
    ``scaled_par_bn``), a dict of AdapterHub ``BnConfig`` fields or a
    ``BnConfig``; ``overrides`` replace fields. The adapter becomes active;
    every other parameter of the model (other adapters included) is frozen.
    Raises ValueError (unknown field or preset, bad value, unsupported model
    type, a name in use, ``leave_out`` beyond the last layer) or TypeError
    (a block whose structure is not the expected one) before changing anything.
    """
    cfg = resolve_bn_config(config, **overrides)
    _check_name(name)
    locations = planned_adapter_locations(model, cfg)
    if name in _adapter_names(model) or name in _fusion_names(model):
        raise ValueError(f"name: the model already has an adapter or fusion called {name!r}")
    hidden = hidden_size_of(model)
    arch = architecture_of(model)
    base = base_model_of(model)
    new = {}
    for layer_idx, _, path in locations:
        blocks = _blocks(model, arch)
        ref = next(blocks[layer_idx].parameters(), None)
        adapter = new_bottleneck_adapter(cfg, hidden, layer_idx)
        if ref is not None:
            adapter = adapter.to(device=ref.device, dtype=ref.dtype)
        new[path] = adapter
    for layer_idx in sorted({i for i, _, _ in locations}):
        _wrap_block(model, arch, layer_idx)
    for _, _, path in locations:
        base.get_submodule(path).add_adapter(name, new[path], cfg)
    set_active_adapter(model, name)
    _train_only(model, [p for a in new.values() for p in a.parameters()])
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
    n_layers = len(_blocks(model, architecture_of(model)))
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
