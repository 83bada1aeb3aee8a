"""AdapterFusion (Pfeiffer et al. 2021): attention over the outputs of several adapters, as AdapterHub does it.

At one adapter location, N adapters each produce their scaled up-projection
``u_i`` (``BottleneckAdapter.adapter_output``); the fusion layer attends over
them with the block's hidden state as query, as AdapterHub ``adapters`` 1.3's
``BertFusion`` does:

    q = W_Q query + b_Q,  k_i = W_K u_i + b_K,  v_i = W_V u_i (value_before_softmax)
    p = softmax(dropout(q · k_i) / T),  out = Σ_i p_i v_i + residual

with AdapterHub's switches: ``residual_before`` (add the residual to every
``u_i`` before attending, not to the result), ``value_before_softmax`` (False:
``W_V`` acts on the attended sum instead), ``query``/``key``/``value`` (False:
that projection is the identity), ``temperature`` (T starts at 50 and drops by
0.05 per forward call, to 1; AdapterHub lowers it on every call, in eval mode
too), ``value_initialized`` (``W_V`` starts as the identity, 1e-6 elsewhere).
Presets ``static`` (no value matrix) and ``dynamic`` (value matrix and its
regulariser ``0.01 · ‖I − W_V‖²``, ``regularization_loss``).

Parameter names (``query``, ``key``, ``value``, and ``dense`` when all three
are off) are AdapterHub's ``BertFusion`` names, so checkpoints map 1:1.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .._validation import check_probability
from .adapter import bert_init
from .adapter_config import config_values
from .base import PeftLayer

TEMPERATURE_START = 50.0


@dataclass
class AdapterFusionConfig:
    """AdapterHub's ``AdapterFusionConfig`` fields (names, meaning); defaults are the ``dynamic`` preset."""

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: Any = True
    dropout_prob: Optional[float] = None

    def __post_init__(self):
        for name in ("key", "query", "value", "query_before_ln", "regularization", "residual_before", "temperature",
                     "value_before_softmax"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.dropout_prob is not None:
            check_probability("dropout_prob", self.dropout_prob)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FUSION_PRESETS = {
    "static": dict(key=True, query=True, value=False, query_before_ln=False, regularization=False,
                   residual_before=False, temperature=False, value_before_softmax=True, value_initialized=False,
                   dropout_prob=None),
    "dynamic": dict(key=True, query=True, value=True, query_before_ln=False, regularization=True,
                    residual_before=False, temperature=False, value_before_softmax=True, value_initialized=True,
                    dropout_prob=None),
}


def resolve_fusion_config(config: Union[str, Mapping, AdapterFusionConfig] = "dynamic",
                          **overrides) -> AdapterFusionConfig:
    """A validated ``AdapterFusionConfig`` from a preset name, a dict or a config; ValueError names unknown fields."""
    return AdapterFusionConfig(**config_values(config, AdapterFusionConfig, FUSION_PRESETS, "AdapterFusion", overrides))


class AdapterFusion(PeftLayer):
    """The fusion layer of one adapter location (see module docstring).

    ``forward(query [..., H], adapter_outputs [..., N, H], residual [..., H])``
    returns ``[..., H]``. ``dropout_prob`` is the dropout on the attention
    scores (AdapterHub: the config's ``dropout_prob`` or, when None, the model's
    ``attention_probs_dropout_prob``).
    """

    peft_kind = "adapter_fusion"

    def __init__(self, hidden_size: int, config: Union[str, Mapping, AdapterFusionConfig] = "dynamic",
                 dropout_prob: float = 0.0, **overrides):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.config = resolve_fusion_config(config, **overrides)
        if self.config.dropout_prob is not None:
            dropout_prob = self.config.dropout_prob
        dropout_prob = check_probability("dropout_prob", dropout_prob)
        self.hidden_size = hidden_size
        cfg = self.config
        self.dropout = nn.Dropout(float(dropout_prob))
        if not (cfg.query or cfg.key or cfg.value):
            self.dense = nn.Linear(hidden_size, 1)  # AdapterHub creates (and never uses) it in this case
        with torch.no_grad():
            if cfg.query:
                self.query = nn.Linear(hidden_size, hidden_size)
                bert_init(self.query)
            if cfg.key:
                self.key = nn.Linear(hidden_size, hidden_size)
                bert_init(self.key)
            if cfg.value:
                self.value = nn.Linear(hidden_size, hidden_size, bias=False)
                bert_init(self.value)
                if cfg.value_initialized:
                    self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.T = TEMPERATURE_START if cfg.temperature else 1.0
        self.reduction = self.T / 1000.0

    def peft_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def forward(self, query: Tensor, adapter_outputs: Tensor, residual: Tensor) -> Tensor:
        if adapter_outputs.dim() != query.dim() + 1 or adapter_outputs.shape[:-2] != query.shape[:-1] \
                or adapter_outputs.shape[-1] != query.shape[-1]:
            raise ValueError(f"adapter_outputs has shape {tuple(adapter_outputs.shape)}; expected query's leading "
                             f"dims {tuple(query.shape[:-1])} + [N, {query.shape[-1]}]")
        if residual.shape != query.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}; it must match query's {tuple(query.shape)}")
        cfg = self.config
        value = adapter_outputs
        if cfg.residual_before:
            value = value + residual.unsqueeze(-2)
        q = self.query(query) if cfg.query else query
        k = self.key(value) if cfg.key else value
        v = self.value(value) if cfg.value and cfg.value_before_softmax else value
        scores = torch.matmul(k, q.unsqueeze(-1)).squeeze(-1)  # [..., N]
        probs = torch.softmax(self.dropout(scores) / self.T, dim=-1)
        self.T = max(self.T - self.reduction, 1.0)
        context = torch.matmul(probs.unsqueeze(-2), v).squeeze(-2)
        if cfg.value and not cfg.value_before_softmax:
            context = self.value(context)
        if not cfg.residual_before:
            context = context + residual
        return context

    def regularization_loss(self) -> Optional[Tensor]:
        """``0.01 · ‖I − W_V‖²`` (AdapterHub's fusion regulariser), or None without a value matrix."""
        if not self.config.value:
            return None
        w = self.value.weight
        eye = torch.eye(self.hidden_size, device=w.device, dtype=w.dtype)
        return 0.01 * (eye - w).pow(2).sum()

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden_size={self.hidden_size}, query={c.query}, key={c.key}, value={c.value}, "
                f"value_before_softmax={c.value_before_softmax}, residual_before={c.residual_before}, T={self.T:g}")
