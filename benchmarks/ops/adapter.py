"""Bottleneck adapter ``y = h + s · up(act(down(h)))``: fastpeft against AdapterHub's eager math and torch.compile.

The layer is the Pfeiffer (``seq_bn``) adapter as AdapterHub runs it: a relu
bottleneck of ``H // 16`` with biases, scaling 1.0, dropout 0, and the adapter
input as its own residual (pre-LN placement ``x + h + A(x + h)``).

Providers:
- ``adapterhub``: AdapterHub 1.3's ``Adapter.forward`` math, faithfully, as the
  same separate eager modules (``Sequential(Linear, activation)``,
  ``Linear``, ``up * scaling``, ``nn.Dropout``, ``+ residual``); the
  baseline the ratios divide by;
- ``fastpeft``: ``fastpeft.ops.bottleneck_adapter`` (one fused op);
- ``compile``: ``torch.compile`` of the same math as one function of tensors
  (``adapterhub_math``).
In the backward modes the adapter's weights and biases are trainable and x
needs grad (a middle layer in training).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..suite.spec import FORWARD, FORWARD_BACKWARD, Built, Case, OpBench, Provider
from .common import case_tensors, compiled, missing_import, rotating_inputs, trainable, upstream_grad

REDUCTION = 16
SCALING = 1.0
ACTIVATION = "relu"


def _shapes(device_type: str, level: str) -> list:
    def grid(hidden, tokens):
        return [dict(tokens=m, H=h, b=h // REDUCTION) for h in hidden for m in tokens]

    if device_type == "cuda":
        if level == "quick":
            return grid([4096], [1, 4096])
        return grid([768, 4096], [1, 512, 4096] + ([16, 8192] if level == "full" else []))
    if level == "quick":
        return grid([768], [1, 64])
    if level == "full":
        return grid([768, 4096], [1, 512, 4096])
    return grid([768], [1, 512, 4096]) + grid([4096], [1, 512])


def _make_case(shape: dict, device, dtype, mode: str) -> Case:
    m, h, b = shape["tokens"], shape["H"], shape["b"]

    def param(*size, scale):
        return trainable(torch.randn(*size, device=device, dtype=dtype) * scale, mode)

    tensors = dict(down_weight=param(b, h, scale=h**-0.5), down_bias=param(b, scale=0.1),
                   up_weight=param(h, b, scale=b**-0.5), up_bias=param(h, scale=0.1))
    return Case(shape, device, dtype, mode, rotating_inputs(m, h, device, dtype, mode),
                upstream_grad(m, h, device, dtype, mode), tensors)


class _AdapterHubAdapter(nn.Module):
    """AdapterHub's ``Adapter`` forward for this configuration, module by module (no LayerNorm, no gate)."""

    def __init__(self, down_weight, down_bias, up_weight, up_bias):
        super().__init__()
        from transformers.activations import get_activation

        b, h = down_weight.shape
        down = nn.Linear(h, b, device=down_weight.device, dtype=down_weight.dtype)
        self.adapter_up = nn.Linear(b, h, device=up_weight.device, dtype=up_weight.dtype)
        with torch.no_grad():
            down.weight.copy_(down_weight)
            down.bias.copy_(down_bias)
            self.adapter_up.weight.copy_(up_weight)
            self.adapter_up.bias.copy_(up_bias)
        self.adapter_down = nn.Sequential(down, get_activation(ACTIVATION))
        self.scaling = SCALING
        self.dropout = nn.Dropout(p=0.0)

    def forward(self, x, residual_input):
        down = self.adapter_down(x)
        up = self.adapter_up(down)
        up = up * self.scaling
        output = self.dropout(up)
        return output + residual_input


def _eager_module(case: Case) -> _AdapterHubAdapter:
    module = _AdapterHubAdapter(*case_tensors(case, "down_weight", "down_bias", "up_weight", "up_bias"))
    module.train(case.mode != FORWARD)
    return module.requires_grad_(case.mode != FORWARD)


def _eager(case: Case) -> Built:
    module = _eager_module(case)
    return Built(lambda x: module(x, x), list(module.parameters()))


def adapterhub_math(x, residual_input, down_weight, down_bias, up_weight, up_bias, training: bool):
    """``_AdapterHubAdapter.forward`` as one function of tensors (what ``compile`` compiles)."""
    from transformers.activations import ACT2FN

    up = F.linear(ACT2FN[ACTIVATION](F.linear(x, down_weight, down_bias)), up_weight, up_bias) * SCALING
    return F.dropout(up, 0.0, training) + residual_input


def _compiled(case: Case) -> Built:
    params = [t.detach().clone().requires_grad_(t.requires_grad)
              for t in case_tensors(case, "down_weight", "down_bias", "up_weight", "up_bias")]
    fn = compiled(adapterhub_math)
    training = case.mode != FORWARD
    return Built(lambda x: fn(x, x, *params, training), params, note="dynamic=True")


def _fastpeft(case: Case) -> Built:
    from fastpeft.ops.adapter import bottleneck_adapter

    down_weight, down_bias, up_weight, up_bias = case_tensors(case, "down_weight", "down_bias", "up_weight",
                                                              "up_bias")
    return Built(lambda x: bottleneck_adapter(x, down_weight, up_weight, down_bias, up_bias, residual=x,
                                              scaling=SCALING, activation=ACTIVATION),
                 [down_weight, down_bias, up_weight, up_bias])


def _work(shape: dict, mode: str, provider: str, dtype) -> tuple:
    """Ideal (flops, bytes): each GEMM once, x/y/dy/dx and the weights read or written once per pass.

    Forward: ``x W_dᵀ`` and ``z W_uᵀ``; backward: ``dz = dy W_u``, ``dx = da W_d``, ``dW_u = dyᵀ z``,
    ``dW_d = daᵀ x``.
    """
    m, h, b = shape["tokens"], shape["H"], shape["b"]
    e = torch.empty((), dtype=dtype).element_size()
    weights = e * (2 * h * b + h + b)
    fwd = (4 * m * h * b, weights + e * 2 * m * h)
    bwd = (8 * m * h * b, 2 * weights + e * 3 * m * h)
    if mode == FORWARD:
        return fwd
    if mode == FORWARD_BACKWARD:
        return fwd[0] + bwd[0], fwd[1] + bwd[1]
    return bwd


OP = OpBench(
    name="adapter",
    title="Bottleneck adapter (Pfeiffer, reduction 16)",
    providers=[
        Provider("adapterhub", _eager, missing_import("transformers")),
        Provider("fastpeft", _fastpeft, missing_import("fastpeft.ops.adapter"), ours=True),
        Provider("compile", _compiled, missing_import("transformers")),
    ],
    shapes=_shapes,
    make_case=_make_case,
    work=_work,
    baseline="adapterhub",
    reference="adapterhub",
    headline=("adapterhub", "fastpeft", "compile"),
    baseline_is_peer=True,
)
