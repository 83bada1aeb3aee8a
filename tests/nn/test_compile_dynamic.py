"""LoRALinear / QLoRALinear under ``torch.compile(fullgraph=True)`` with dynamic shapes (issue 19, item 7).

With ``dynamic=True`` (and under automatic dynamic shapes once a recompile
marks the layer's float attributes dynamic) the scaling reaches the op as a
symbolic float; every per-call check must trace, and the compiled layer must
give the eager layer's output and gradients.
"""
import pytest
import torch
from torch import nn

from fastpeft.nn import LoRALinear, QLoRALinear

IN, OUT, R = 64, 12, 4


def _layer(kind):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    layer = (LoRALinear if kind == "lora" else QLoRALinear).from_linear(base, r=R, lora_alpha=3)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def _check_matches_eager(layer, compiled, x):
    y_eager = layer(x)
    y_eager.sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    layer.zero_grad()
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager)
    for p, g in zip((layer.lora_A.weight, layer.lora_B.weight), grads):
        torch.testing.assert_close(p.grad, g)
    layer.zero_grad()


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_fullgraph_dynamic_true(kind):
    torch._dynamo.reset()
    layer = _layer(kind)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows in (3, 5):
        _check_matches_eager(layer, compiled, torch.randn(rows, IN))


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_fullgraph_automatic_dynamic_after_recompile(kind):
    """A second shape and a changed scaling recompile with both marked dynamic."""
    torch._dynamo.reset()
    layer = _layer(kind)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    _check_matches_eager(layer, compiled, torch.randn(3, IN))
    layer.scaling = 0.5
    _check_matches_eager(layer, compiled, torch.randn(5, IN))
    layer.scaling = 0.25
    _check_matches_eager(layer, compiled, torch.randn(2, 7, IN))


def test_non_finite_scaling_still_raises_when_compiled_dynamic():
    torch._dynamo.reset()
    layer = _layer("lora")
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="eager")
    compiled(torch.randn(3, IN))
    for bad in (float("inf"), float("nan")):
        layer.scaling = bad
        with pytest.raises(Exception, match="scaling must be finite"):
            compiled(torch.randn(4, IN))
