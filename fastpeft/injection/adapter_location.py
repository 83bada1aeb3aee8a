"""The adapters of one adapter location (``AdapterLayer``) and the AdapterDrop gate its layer shares.

Each transformer layer has two locations, ``mh_adapter`` (after the attention
sub-layer) and ``output_adapter`` (after the feed-forward sub-layer). At a
location the sub-layer's output ``h``, its input ``x`` (the residual stream)
and the block's LayerNorm (post-LN blocks; None in pre-LN blocks) meet an
``AdapterLayer``, which does what the block did (``LN(h + x)`` or ``h + x``)
plus the active adapter or fusion, as AdapterHub ``adapters`` 1.3's
``BottleneckLayer`` does. The residual and LayerNorm handling around an
adapter is ``BottleneckAdapter.pre_forward`` / ``post_forward``
(``fastpeft.nn.adapter``): one implementation for the module and the model.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..nn.adapter import BottleneckAdapter
from ..nn.adapter_config import BnConfig
from ..nn.adapter_fusion import AdapterFusion

LOCATIONS = ("mh_adapter", "output_adapter")


class LayerDropGate:
    """AdapterDrop state shared by the locations of one transformer layer.

    ``skip`` removes the layer's adapters (inference); ``p`` drops them at
    random in training, one draw per forward of the layer: the first location
    of the layer draws, the later ones reuse its decision.
    """

    def __init__(self):
        self.skip = False
        self.p = 0.0
        self._dropped = False

    def dropped(self, location_key: str, training: bool) -> bool:
        if self.skip:
            return True
        if not training or self.p <= 0.0:
            return False
        if location_key == LOCATIONS[0]:
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
        # The gate first: the layer's first location draws even when it holds no active adapter.
        if self.drop_gate.dropped(self.location_key, self.training) or name is None:
            return layer_norm(hidden_states + residual_input) if layer_norm is not None \
                else hidden_states + residual_input
        if name in self.adapter_fusion_layer:
            return self._fuse(name, hidden_states, residual_input, layer_norm)
        adapter = self.adapters[name]
        h_in, _, residual = adapter.pre_forward(hidden_states, residual_input, layer_norm)
        out = adapter(h_in, residual)
        return adapter.post_forward(out, residual_input, layer_norm, input_hidden_states=hidden_states)

    forward = adapter_layer_forward

    def _fuse(self, fusion_name: str, hidden_states: Tensor, residual_input: Tensor,
              layer_norm: Optional[nn.Module]) -> Tensor:
        members = self.fusion_members[fusion_name]
        fusion = self.adapter_fusion_layer[fusion_name]
        last = self.adapters[members[-1]]  # AdapterHub: the last fused adapter's placement decides
        h_in, query, residual = last.pre_forward(hidden_states, residual_input, layer_norm,
                                                 query_before_ln=fusion.config.query_before_ln)
        ups = torch.stack([self.adapters[n].adapter_output(h_in) for n in members], dim=-2)
        out = fusion(query, ups, residual)
        return last.post_forward(out, residual_input, layer_norm, input_hidden_states=hidden_states)

    def extra_repr(self) -> str:
        return f"location={self.location_key}, layer={self.layer_idx}, active={self.active}"
