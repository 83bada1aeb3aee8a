"""The adapter op's edges (issue 19 items 6 and 9): what it refuses, and the derivatives it does not give.

- Bad arguments raise a ValueError/TypeError naming the argument, before anything runs: a non-finite
  float ``scaling``; ``adapter_dropout_mask`` with a probability outside [0, 1), a seed outside
  [0, 2**62) or a device torch cannot parse; sparse tensors.
- First derivatives only: a double backward and a forward-mode tangent raise on both backends (never a
  wrong second derivative, never a tangent dropped in a kernel).
- leaky relu's negative slope is 0.01 in the input's dtype (fp64 gradients exact to fp64, not to fp32).
"""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from adapter_reference import adapter_op_math
from fastpeft.ops import adapter_dropout_mask, bottleneck_adapter

M, H, B = 6, 20, 5


def _inputs(dtype=torch.float32, requires_grad=False):
    t = dict(x=torch.randn(M, H), down_weight=torch.randn(B, H) * 0.3, up_weight=torch.randn(H, B) * 0.3,
             down_bias=torch.randn(B), up_bias=torch.randn(H))
    return {n: v.to(dtype).requires_grad_(requires_grad) for n, v in t.items()}


@pytest.mark.parametrize("scaling", [math.nan, math.inf, -math.inf])
def test_non_finite_scaling_is_refused(scaling):
    with pytest.raises(ValueError, match="scaling"):
        bottleneck_adapter(**_inputs(), scaling=scaling)


@pytest.mark.parametrize("kwargs, name", [
    (dict(dropout_p=1.5), "dropout_p"), (dict(dropout_p=-0.1), "dropout_p"),
    (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"), (dict(seed=2**62), "seed"), (dict(seed=1.5), "seed"),
    (dict(device="gpu"), "device"), (dict(device=None), "device"),
])
def test_dropout_mask_arguments_are_checked(kwargs, name):
    args = dict(shape=(3, 4), dropout_p=0.5, seed=7, device="cpu") | kwargs
    with pytest.raises((ValueError, TypeError), match=name):
        adapter_dropout_mask(**args)


@pytest.mark.parametrize("name", ["x", "down_weight", "up_weight", "down_bias", "up_bias"])
def test_sparse_inputs_are_refused_by_name(name):
    inputs = _inputs()
    inputs[name] = inputs[name].to_sparse()
    with pytest.raises(TypeError, match=f"{name} has layout"):
        bottleneck_adapter(**inputs)


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
def test_double_backward_raises(backend):
    inputs = _inputs(requires_grad=True)
    y = bottleneck_adapter(**inputs, activation="gelu")
    (gx,) = torch.autograd.grad(y.pow(2).sum(), inputs["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mode_tangents_raise(backend, requires_grad):
    inputs = _inputs(requires_grad=requires_grad)
    with fwAD.dual_level():
        inputs["x"] = fwAD.make_dual(inputs["x"].detach(), torch.randn(M, H))
        with pytest.raises(RuntimeError, match="jvp|forward"):
            bottleneck_adapter(**inputs)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)  # fp64 runs on the CPU path only
def test_leaky_relu_slope_in_float64(backend):
    inputs = _inputs(torch.float64, requires_grad=True)
    y = bottleneck_adapter(**inputs, activation="leakyrelu")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(inputs.values()), dy)
    ref_inputs = {n: v.detach().clone().requires_grad_() for n, v in inputs.items()}
    ref = adapter_op_math(ref_inputs["x"], ref_inputs["down_weight"], ref_inputs["up_weight"],
                          ref_inputs["down_bias"], ref_inputs["up_bias"], act="leakyrelu")
    want = torch.autograd.grad(ref, list(ref_inputs.values()), dy)
    for name, g, w in zip(inputs, grads, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=f"d{name}")
