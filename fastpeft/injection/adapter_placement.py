"""Block surgery for bottleneck adapters: find a model's adapter locations, check its blocks, swap them once.

``planned_adapter_locations`` validates a model against a ``BnConfig`` and
lists where adapters would go without changing anything; ``wrap_block``
swaps one block (or its location modules) for the modules of
``adapter_blocks``; ``new_bottleneck_adapter`` builds the module one location
holds.
"""
from __future__ import annotations

from numbers import Real

from torch import nn

from ..nn.adapter import BottleneckAdapter
from ..nn.adapter_config import BnConfig
from .adapter_architectures import Architecture, architecture_of, base_model_of
from .adapter_blocks import PostLNOutputWithAdapters, PreLNBlockWithAdapters
from .adapter_location import LOCATIONS, LayerDropGate
from .targets import set_submodule


def layer_blocks(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    """The model's list of transformer blocks; ValueError when ``arch.layers`` is not there."""
    try:
        return base_model_of(model).get_submodule(arch.layers)
    except AttributeError:
        raise ValueError(f"model: no {arch.layers!r} layer list in {type(model).__name__}") from None


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


def _check_residual_placement(arch: Architecture, cfg: BnConfig) -> None:
    """AdapterHub takes a ``"post_add"`` residual only after a block LayerNorm it applies (original_ln_before in
    a post-LN block); elsewhere its residual is undefined and its forward fails: refuse up front."""
    if cfg.residual_before_ln == "post_add" and (arch.pre_ln is not None or not cfg.original_ln_before):
        raise ValueError(f"residual_before_ln='post_add' needs original_ln_before=True in a post-LN block; "
                         f"{arch.family} blocks are {'pre' if arch.pre_ln is not None else 'post'}-LN and "
                         f"original_ln_before={cfg.original_ln_before}")


def planned_adapter_locations(model: nn.Module, cfg: BnConfig) -> list[tuple[int, str, str]]:
    """``(layer index, location key, path from the base model)`` of every location ``cfg`` puts an adapter at.

    Validates the model and ``cfg`` against it (ValueError/TypeError); changes nothing.
    """
    arch = architecture_of(model)
    _check_residual_placement(arch, cfg)
    blocks = layer_blocks(model, arch)
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
    if not out:
        raise ValueError("leave_out leaves out every layer: the adapter would sit nowhere")
    return out


def wrap_block(model: nn.Module, arch: Architecture, i: int) -> None:
    """Swap block ``i`` (or its location modules) for the fastpeft modules, once."""
    blocks = layer_blocks(model, arch)
    block = blocks[i]
    if arch.pre_ln is not None:
        if not isinstance(block, PreLNBlockWithAdapters):
            blocks[i] = PreLNBlockWithAdapters(block, arch.pre_ln, i, LayerDropGate()).train(block.training)
        return
    gate = None
    for path in arch.locations.values():
        sub = block.get_submodule(path)
        if isinstance(sub, PostLNOutputWithAdapters):
            gate = sub.drop_gate
    gate = gate or LayerDropGate()
    for key, path in arch.locations.items():
        original = block.get_submodule(path)
        if not isinstance(original, PostLNOutputWithAdapters):
            wrapper = PostLNOutputWithAdapters(original, key, i, gate).train(original.training)
            set_submodule(block, path, wrapper)


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
