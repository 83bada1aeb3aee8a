"""``BottleneckAdapter``: AdapterHub's bottleneck adapter module on the fused ``bottleneck_adapter`` op.

Configuration surface and parameter names are those of AdapterHub
``adapters`` 1.3 (``BnConfig`` and ``methods/modeling.py``'s ``Adapter``), so a
state dict maps 1:1 in both directions:

- ``adapter_norm_before.{weight,bias}`` (``ln_before``; the same LayerNorm is
  also ``adapter_down.0``, as in AdapterHub, so both keys are present),
- ``adapter_down.{0|1}.{weight,bias}`` (the down Linear; ``adapter_down`` is
  ``Sequential([LayerNorm?], Linear, activation)``),
- ``adapter_up.{weight,bias}``,
- ``scaling`` (``"learned"``: shape ``[1]``; ``"channel"``: ``[hidden_size]``),
- ``adapter_norm_after.{weight,bias}`` (``ln_after``), ``gate.{weight,bias}``
  (``use_gating``).

``forward(hidden_states, residual_input)`` is AdapterHub's ``Adapter.forward``
output: ``o = gate · dropout(s · up(act(down(LN_before(h)))))``, then the
residual before or after ``adapter_norm_after`` per
``adapter_residual_before_ln``. With ``is_parallel`` (or
``residual_input=None``) no residual is added, as in ``ParallelAdapter``.
The down/activation/up/scale/dropout/residual chain is one fused op call; the
optional LayerNorms and the gate are composed around it (the residual moves
out of the op only where a LayerNorm or the gate must come before it).
``adapter_output`` gives AdapterHub's ``up`` (the scaled up-projection that
AdapterFusion stacks); ``pre_forward`` / ``post_forward`` reproduce
AdapterHub's residual and LayerNorm handling around the adapter for
placements; an adapter location in a model
(``fastpeft.injection.adapter_location``) runs exactly these.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..activations import activation as lookup_activation
from ..ops.adapter import bottleneck_adapter
from .._validation import check_probability
from .adapter_config import INIT_WEIGHTS
from .base import PeftLayer



class BottleneckActivation(nn.Module):
    """The activation inside ``adapter_down`` (no parameters; the fused op applies it by name)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name.lower()
        self._fn = lookup_activation(self.name)

    def forward(self, x: Tensor) -> Tensor:
        return self._fn.forward_(x.clone())

    def extra_repr(self) -> str:
        return self.name


def bottleneck_size_for(hidden_size: int, reduction_factor: Union[int, float]) -> int:
    """AdapterHub's bottleneck size ``int(hidden_size // reduction_factor)``, at least 1."""
    return max(1, int(hidden_size // reduction_factor))


class BottleneckAdapter(PeftLayer):
    """A bottleneck adapter with AdapterHub's configuration and parameter names (see module docstring).

    ``bottleneck_size`` overrides ``reduction_factor``. ``scaling``: a float,
    ``"learned"`` (one trained scalar) or ``"channel"`` (a trained ``[hidden]``
    vector). ``init_weights``: ``"bert"`` (N(0, 0.02), zero biases),
    ``"mam_adapter"`` (Kaiming-uniform down, zero up: starts as the
    identity map) or ``"houlsby"`` (truncated normal, std 0.01, clipped at
    ±0.02). ``residual_before_ln``, ``original_ln_before`` and
    ``original_ln_after`` only matter to ``pre_forward`` / ``post_forward``.
    """

    peft_kind = "adapter"

    def __init__(self, hidden_size: int, *, bottleneck_size: Optional[int] = None,
                 reduction_factor: Union[int, float] = 16, non_linearity: str = "relu",
                 scaling: Union[float, str] = 1.0, init_weights: str = "bert", ln_before: bool = False,
                 ln_after: bool = False, residual_before_ln: Union[bool, str] = True,
                 adapter_residual_before_ln: bool = False, use_gating: bool = False, dropout: float = 0.0,
                 original_ln_before: bool = False, original_ln_after: bool = True, is_parallel: bool = False,
                 device=None, dtype=None):
        super().__init__()
        _check_config(hidden_size, bottleneck_size, reduction_factor, non_linearity, scaling, init_weights,
                      residual_before_ln, dropout)
        factory = dict(device=device, dtype=dtype)
        self.hidden_size = int(hidden_size)
        self.bottleneck_size = int(bottleneck_size) if bottleneck_size is not None else \
            bottleneck_size_for(hidden_size, reduction_factor)
        self.reduction_factor = reduction_factor if bottleneck_size is None else hidden_size / self.bottleneck_size
        self.non_linearity = non_linearity.lower()
        self.init_weights = init_weights
        self.ln_before, self.ln_after = bool(ln_before), bool(ln_after)
        self.residual_before_ln = residual_before_ln
        self.adapter_residual_before_ln = bool(adapter_residual_before_ln)
        self.use_gating = bool(use_gating)
        self.dropout = float(dropout)
        self.original_ln_before, self.original_ln_after = bool(original_ln_before), bool(original_ln_after)
        self.is_parallel = bool(is_parallel)

        layers = []
        if self.ln_before:
            self.adapter_norm_before = nn.LayerNorm(hidden_size, **factory)
            layers.append(self.adapter_norm_before)
        layers += [nn.Linear(hidden_size, self.bottleneck_size, **factory), BottleneckActivation(self.non_linearity)]
        self.adapter_down = nn.Sequential(*layers)
        self.adapter_up = nn.Linear(self.bottleneck_size, hidden_size, **factory)
        if isinstance(scaling, str):
            self.scaling = nn.Parameter(torch.ones(1 if scaling == "learned" else hidden_size, **factory))
        else:
            self.scaling = float(scaling)
        self.scaling_mode = scaling if isinstance(scaling, str) else "float"
        if self.ln_after:
            self.adapter_norm_after = nn.LayerNorm(hidden_size, **factory)
        if self.use_gating:
            self.gate = nn.Linear(hidden_size, 1, **factory)
        self.reset_parameters()

    @property
    def down_proj(self) -> nn.Linear:
        """The down-projection Linear inside ``adapter_down``."""
        return self.adapter_down[1 if self.ln_before else 0]

    def reset_parameters(self) -> None:
        """AdapterHub's initialisation for ``init_weights`` (LayerNorms start at weight 1, bias 0)."""
        down, up = self.down_proj, self.adapter_up
        with torch.no_grad():
            if self.init_weights == "bert":
                for linear in (down, up) + ((self.gate,) if self.use_gating else ()):
                    bert_init(linear)
            elif self.init_weights == "mam_adapter":
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
                if self.use_gating:
                    bert_init(self.gate)
            else:  # houlsby
                for linear in (down, up):
                    nn.init.trunc_normal_(linear.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                    nn.init.zeros_(linear.bias)
            if isinstance(self.scaling, nn.Parameter):
                self.scaling.fill_(1.0)

    def peft_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def adapter_config(self) -> dict:
        """The AdapterHub ``BnConfig`` fields this module implements (for checkpoints)."""
        return dict(reduction_factor=self.reduction_factor, non_linearity=self.non_linearity,
                    original_ln_before=self.original_ln_before, original_ln_after=self.original_ln_after,
                    ln_before=self.ln_before, ln_after=self.ln_after, init_weights=self.init_weights,
                    is_parallel=self.is_parallel,
                    scaling=self.scaling_mode if self.scaling_mode != "float" else self.scaling,
                    use_gating=self.use_gating, residual_before_ln=self.residual_before_ln,
                    adapter_residual_before_ln=self.adapter_residual_before_ln, dropout=self.dropout)

    # --- forward --------------------------------------------------------------------------------------------

    def _adapter(self, hidden_states: Tensor, residual: Optional[Tensor], dropout: bool) -> Tensor:
        """``residual + drop(s · up(act(down(LN_before(h)))))`` through the fused op."""
        h = self.adapter_norm_before(hidden_states) if self.ln_before else hidden_states
        down = self.down_proj
        return bottleneck_adapter(h, down.weight, self.adapter_up.weight, down.bias, self.adapter_up.bias, residual,
                                  self.scaling, self.non_linearity, self.dropout if dropout else 0.0, self.training)

    def forward(self, hidden_states: Tensor, residual_input: Optional[Tensor] = None) -> Tensor:
        """AdapterHub's ``Adapter.forward`` output (``ParallelAdapter.forward`` with ``is_parallel``)."""
        residual = None if self.is_parallel else residual_input
        # The residual goes into the fused op unless the gate or adapter_norm_after must act before it.
        fuse_residual = residual is not None and not self.use_gating and (
            self.adapter_residual_before_ln or not self.ln_after)
        output = self._adapter(hidden_states, residual if fuse_residual else None, dropout=True)
        if self.use_gating:
            gate = torch.sigmoid(self.gate(hidden_states))
            output = output * torch.mean(gate, dim=1).unsqueeze(-1)
        if residual is not None and not fuse_residual and self.adapter_residual_before_ln:
            output = output + residual
        if self.ln_after:
            output = self.adapter_norm_after(output)
        if residual is not None and not fuse_residual and not self.adapter_residual_before_ln:
            output = output + residual
        return output

    def adapter_output(self, hidden_states: Tensor) -> Tensor:
        """AdapterHub's ``up``: the scaled up-projection, before dropout, gate and residual (AdapterFusion's input)."""
        return self._adapter(hidden_states, None, dropout=False)

    def gate_values(self, hidden_states: Tensor) -> Tensor:
        """AdapterHub's gate ``mean_dim1(sigmoid(W_g h + b_g)).unsqueeze(-1)`` (``use_gating`` only)."""
        if not self.use_gating:
            raise RuntimeError("gate_values: this adapter was built with use_gating=False")
        return torch.mean(torch.sigmoid(self.gate(hidden_states)), dim=1).unsqueeze(-1)

    def pre_forward(self, hidden_states: Tensor, input_tensor: Optional[Tensor], layer_norm: Optional[nn.Module],
                    query_before_ln: Optional[bool] = None) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """AdapterHub's ``pre_forward``: ``(adapter input, fusion query, residual)``.

        ``hidden_states`` is the sub-layer output, ``input_tensor`` the block's
        residual stream, ``layer_norm`` the block's LayerNorm (or None).
        ``query_before_ln`` is AdapterFusion's setting (None: no fusion, no query).
        """
        if self.is_parallel:
            return input_tensor, (input_tensor if query_before_ln is not None else None), input_tensor
        query = None
        residual = hidden_states if self.residual_before_ln is True else None
        if query_before_ln:
            query = hidden_states
        if self.original_ln_before:
            if layer_norm is not None:
                hidden_states = hidden_states + input_tensor
                if self.residual_before_ln == "post_add":
                    residual = hidden_states
                hidden_states = layer_norm(hidden_states)
            elif input_tensor is not None:
                hidden_states = hidden_states + input_tensor
        if not self.residual_before_ln:
            residual = hidden_states
        if residual is None:
            # AdapterHub fails here too (it takes the residual after the LayerNorm it does not have).
            raise ValueError("residual_before_ln='post_add' needs the block's layer_norm: without one (a pre-LN "
                             "block) there is no post-add residual; use residual_before_ln=True or False")
        if query_before_ln is not None and not query_before_ln:
            query = hidden_states
        return hidden_states, query, residual

    def post_forward(self, hidden_states: Tensor, input_tensor: Optional[Tensor],
                     layer_norm: Optional[nn.Module], input_hidden_states: Optional[Tensor] = None) -> Tensor:
        """AdapterHub's ``post_forward``: the block's residual and LayerNorm after the adapter (original_ln_after).

        A parallel adapter first adds ``input_hidden_states`` (the sub-layer
        output its branch runs beside), as AdapterHub's ``ParallelAdapter`` does.
        """
        if self.is_parallel:
            if input_hidden_states is None:
                raise ValueError("a parallel adapter's post_forward needs input_hidden_states (the sub-layer output)")
            hidden_states = hidden_states + input_hidden_states
        if self.original_ln_after:
            if layer_norm is not None:
                return layer_norm(hidden_states + input_tensor)
            if input_tensor is not None:
                return hidden_states + input_tensor
        return hidden_states

    def extra_repr(self) -> str:
        scaling = self.scaling_mode if self.scaling_mode != "float" else self.scaling
        return (f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
                f"non_linearity={self.non_linearity!r}, scaling={scaling!r}, dropout={self.dropout}")


def bert_init(linear: nn.Linear) -> None:
    """AdapterHub's "bert" init of a Linear: weight N(0, 0.02), bias zero (in place; call under no_grad)."""
    linear.weight.normal_(mean=0.0, std=0.02)
    if linear.bias is not None:
        linear.bias.zero_()


def _check_config(hidden_size, bottleneck_size, reduction_factor, non_linearity, scaling, init_weights,
                  residual_before_ln, dropout) -> None:
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
    if bottleneck_size is not None and (isinstance(bottleneck_size, bool) or not isinstance(bottleneck_size, int)
                                        or bottleneck_size <= 0):
        raise ValueError(f"bottleneck_size must be a positive int or None, got {bottleneck_size!r}")
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, Real) or not reduction_factor > 0:
        raise ValueError(f"reduction_factor must be a positive number, got {reduction_factor!r}")
    lookup_activation(non_linearity)
    if isinstance(scaling, str):
        if scaling not in ("learned", "channel"):
            raise ValueError(f"scaling must be a float, 'learned' or 'channel', got {scaling!r}")
    elif isinstance(scaling, bool) or not isinstance(scaling, Real):
        raise ValueError(f"scaling must be a float, 'learned' or 'channel', got {scaling!r}")
    if init_weights not in INIT_WEIGHTS:
        raise ValueError(f"init_weights must be one of {INIT_WEIGHTS}, got {init_weights!r}")
    if not (isinstance(residual_before_ln, bool) or residual_before_ln == "post_add"):
        raise ValueError(f"residual_before_ln must be True, False or 'post_add', got {residual_before_ln!r}")
    check_probability("dropout", dropout)
