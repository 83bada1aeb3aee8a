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
    output = adapter_up_output(params, cfg, hidden_states)
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


def adapterhub_pre_forward(hidden_states, input_tensor, layer_norm, residual_before_ln, original_ln_before,
                           query_before_ln=None):
    """AdapterHub's ``Adapter.pre_forward``, transcribed (query_before_ln None: no fusion config).

    Returns ``(adapter input, fusion query, residual)``; the residual is None
    where AdapterHub leaves it undefined (its forward then fails).
    """
    query = None
    residual = None
    if residual_before_ln is True:
        residual = hidden_states
    if query_before_ln is not None and query_before_ln:
        query = hidden_states
    if original_ln_before:
        if layer_norm:
            hidden_states = hidden_states + input_tensor
            if residual_before_ln == "post_add":
                residual = hidden_states
            hidden_states = layer_norm(hidden_states)
        elif input_tensor is not None:
            hidden_states = hidden_states + input_tensor
    if not residual_before_ln:
        residual = hidden_states
    if query_before_ln is not None and not query_before_ln:
        query = hidden_states
    return hidden_states, query, residual


def adapterhub_location_math(params: dict, cfg: dict, hidden_states, input_tensor, layer_norm):
    """AdapterHub's ``BottleneckLayer`` with one active adapter: pre_forward, the adapter, post_forward.

    ``cfg``: ``adapter_module_math``'s fields plus residual_before_ln,
    original_ln_before, original_ln_after and is_parallel (``ParallelAdapter``:
    the adapter reads the block input, adds no residual, and its output is
    added to the sub-layer output before the block's residual). Returns None
    where AdapterHub's residual is undefined.
    """
    if cfg["is_parallel"]:
        h_in, residual = input_tensor, None
    else:
        h_in, _, residual = adapterhub_pre_forward(hidden_states, input_tensor, layer_norm, cfg["residual_before_ln"],
                                                   cfg["original_ln_before"])
        if residual is None:
            return None
    out = adapter_module_math(params, cfg, h_in, residual)
    if cfg["is_parallel"]:
        out = out + hidden_states
    if cfg["original_ln_after"]:
        out = layer_norm(out + input_tensor) if layer_norm is not None else out + input_tensor
    return out
