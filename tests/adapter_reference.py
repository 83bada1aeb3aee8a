"""Float64-capable re-implementations of AdapterHub's bottleneck adapter, written from its source.

AdapterHub ``adapters`` 1.3, ``src/adapters/methods/modeling.py``: ``Adapter``
(``adapter_down`` = [LayerNorm if ln_before, Linear, activation],
``adapter_up``, scale, dropout, gate, residual / ``adapter_norm_after``) and
its ``pre_forward`` / ``post_forward``. Plain eager torch ops, nothing from
fastpeft, so they serve as the tests' reference (in float64) and peer (in the
input dtype).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN


def reference_activation(name: str):
    """The activation AdapterHub's ``Activation_Function_Class`` builds for ``name``."""
    name = name.lower()
    if name == "leakyrelu":
        return F.leaky_relu
    if name == "identity":
        return lambda t: t
    return ACT2FN[name]


def adapter_op_math(x, down_weight, up_weight, down_bias=None, up_bias=None, residual=None, scaling=1.0, act="relu",
                    keep=None, p=0.0):
    """``residual + drop(scaling · (act(x W_dᵀ + b_d) W_uᵀ + b_u))`` as separate eager ops."""
    up = F.linear(reference_activation(act)(F.linear(x, down_weight, down_bias)), up_weight, up_bias)
    out = up * scaling
    if keep is not None:
        out = out * keep.to(out.dtype).view(out.shape) * (1.0 / (1.0 - p))
    return out + residual if residual is not None else out


def adapter_module_math(params: dict, cfg: dict, hidden_states, residual_input, keep=None):
    """AdapterHub ``Adapter.forward`` (output only) with the parameters of a state dict ``params``.

    ``cfg``: ln_before, ln_after, use_gating, adapter_residual_before_ln,
    non_linearity, scaling (a float; learned/channel scales live in
    ``params["scaling"]``), dropout ``p`` with the keep-mask ``keep``. A
    ``residual_input`` of None is ``ParallelAdapter.forward`` (no residual).
    """
    x = hidden_states
    h = hidden_states
    if cfg["ln_before"]:
        h = F.layer_norm(h, h.shape[-1:], params["adapter_norm_before.weight"], params["adapter_norm_before.bias"])
    linear = "adapter_down.1" if cfg["ln_before"] else "adapter_down.0"
    down = reference_activation(cfg["non_linearity"])(F.linear(h, params[f"{linear}.weight"],
                                                               params[f"{linear}.bias"]))
    up = F.linear(down, params["adapter_up.weight"], params["adapter_up.bias"])
    scaling = params["scaling"] if "scaling" in params else cfg["scaling"]
    output = up * scaling
    if keep is not None:
        output = output * keep.to(output.dtype).view(output.shape) / (1.0 - cfg["dropout"])
    if cfg["use_gating"]:
        gate = torch.sigmoid(F.linear(x, params["gate.weight"], params["gate.bias"]))
        gate = torch.mean(gate, dim=1).unsqueeze(-1)
        output = output * gate
    if cfg["adapter_residual_before_ln"] and residual_input is not None:
        output = output + residual_input
    if cfg["ln_after"]:
        output = F.layer_norm(output, output.shape[-1:], params["adapter_norm_after.weight"],
                              params["adapter_norm_after.bias"])
    if not cfg["adapter_residual_before_ln"] and residual_input is not None:
        output = output + residual_input
    return output


def adapter_up_output(params: dict, cfg: dict, hidden_states):
    """AdapterHub's ``up`` (what AdapterFusion stacks): the scaled up-projection, before dropout and gate."""
    h = hidden_states
    if cfg["ln_before"]:
        h = F.layer_norm(h, h.shape[-1:], params["adapter_norm_before.weight"], params["adapter_norm_before.bias"])
    linear = "adapter_down.1" if cfg["ln_before"] else "adapter_down.0"
    down = reference_activation(cfg["non_linearity"])(F.linear(h, params[f"{linear}.weight"],
                                                               params[f"{linear}.bias"]))
    up = F.linear(down, params["adapter_up.weight"], params["adapter_up.bias"])
    return up * (params["scaling"] if "scaling" in params else cfg["scaling"])
