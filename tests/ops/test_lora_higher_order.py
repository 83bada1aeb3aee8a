"""Second derivatives and forward-mode AD of LoRA and QLoRA (issue 19, item 6).

PEFT's LoRA layer is twice differentiable and supports forward-mode AD; ours
must give its values (Hessian-vector products, ``allow_unused`` second
derivatives, jvp tangents), never ``None`` or zeros.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from torch.func import functional_call

from fastpeft.nn import LoRALinear, QLoRALinear

IN, OUT, R, ALPHA = 64, 6, 3, 5


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    """float64 (the oracle's precision) runs on the CPU backend."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def _pair(kind, dropout=0.0):
    """Our layer and PEFT's on the same base weight (QLoRA: the dequantized NF4 weight), fp64."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    ours = (LoRALinear if kind == "lora" else QLoRALinear).from_linear(base, r=R, lora_alpha=ALPHA,
                                                                       lora_dropout=dropout)
    ours = ours.double() if kind == "lora" else ours
    dense = nn.Linear(IN, OUT).double()
    with torch.no_grad():
        dense.weight.copy_(ours.base_layer.weight if kind == "lora" else ours.base_layer.dequantize(torch.float64))
        dense.bias.copy_(ours.base_layer.bias)
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights=False)
    peft = PeftLoraLinear(dense, "default", config=config, r=R, lora_alpha=ALPHA, init_lora_weights=False)
    a, b = torch.randn(R, IN, dtype=torch.float64), torch.randn(OUT, R, dtype=torch.float64)
    return ours, peft, a, b


def _ours_fn(ours, x, kind):
    def f(a, b):
        if kind == "qlora":
            a, b = a.float(), b.float()
        y = functional_call(ours, {"lora_A.weight": a, "lora_B.weight": b}, (x if kind == "lora" else x.float(),))
        return (y.double() ** 2).sum()
    return f


def _peft_fn(peft, x):
    return lambda a, b: (functional_call(peft, {"lora_A.default.weight": a, "lora_B.default.weight": b},
                                         (x,)) ** 2).sum()


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_hvp_matches_peft(kind):
    ours, peft, a, b = _pair(kind)
    x = torch.randn(2, 4, IN, dtype=torch.float64)
    v = (torch.randn_like(a), torch.randn_like(b))
    _, hv = torch.autograd.functional.hvp(_ours_fn(ours, x, kind), (a, b), v)
    _, hv_peft = torch.autograd.functional.hvp(_peft_fn(peft, x), (a, b), v)
    tol = dict(rtol=1e-9, atol=1e-9) if kind == "lora" else dict(rtol=1e-4, atol=1e-4)  # QLoRA runs fp32
    for got, want in zip(hv, hv_peft):
        assert want.abs().max() > 0
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_allow_unused_second_derivative_is_not_none(kind):
    ours, peft, a, b = _pair(kind)
    dt = torch.float64 if kind == "lora" else torch.float32
    x = torch.randn(5, IN, dtype=dt, requires_grad=True)
    a, b = a.to(dt).requires_grad_(), b.to(dt).requires_grad_()
    y = functional_call(ours, {"lora_A.weight": a, "lora_B.weight": b}, (x,))
    ga, = torch.autograd.grad((y ** 2).sum(), (a,), create_graph=True)
    got = torch.autograd.grad(ga.sum(), (b, x), allow_unused=True)
    xp, ap, bp = x.detach().double().requires_grad_(), a.detach().double().requires_grad_(), \
        b.detach().double().requires_grad_()
    yp = functional_call(peft, {"lora_A.default.weight": ap, "lora_B.default.weight": bp}, (xp,))
    gap, = torch.autograd.grad((yp ** 2).sum(), (ap,), create_graph=True)
    want = torch.autograd.grad(gap.sum(), (bp, xp))
    tol = dict(rtol=1e-9, atol=1e-9) if kind == "lora" else dict(rtol=1e-4, atol=1e-3)
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g.double(), w, **tol)


def test_gradgradcheck_with_dropout():
    """With dropout the second derivatives use the forward's own keep-mask."""
    from fastpeft.ops import lora_linear
    torch.manual_seed(1)
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, w, a, b, bias):
        torch.manual_seed(7)  # one dropout seed for every evaluation
        return lora_linear(x, w, a, b, 0.7, bias, dropout_p=0.3, training=True)

    assert torch.autograd.gradgradcheck(f, (x, w, a, b, bias))


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_forward_mode_jvp_matches_peft(kind):
    ours, peft, a, b = _pair(kind)
    dt = torch.float64 if kind == "lora" else torch.float32
    x, tx = torch.randn(2, 3, IN, dtype=torch.float64), torch.randn(2, 3, IN, dtype=torch.float64)
    ta = torch.randn_like(a)
    with fwAD.dual_level():
        y = functional_call(ours, {"lora_A.weight": fwAD.make_dual(a.to(dt), ta.to(dt)), "lora_B.weight": b.to(dt)},
                            (fwAD.make_dual(x.to(dt), tx.to(dt)),))
        tangent = fwAD.unpack_dual(y).tangent
        yp = functional_call(peft, {"lora_A.default.weight": fwAD.make_dual(a, ta), "lora_B.default.weight": b},
                             (fwAD.make_dual(x, tx),))
        want = fwAD.unpack_dual(yp).tangent
    assert tangent is not None
    tol = dict(rtol=1e-9, atol=1e-9) if kind == "lora" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tangent.double(), want, **tol)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_create_graph_gradients_equal_the_fused_backward_with_dropout(monkeypatch, backend):
    """The recorded (create_graph) gradients use the very mask the fused forward drew, on either backend."""
    from fastpeft.ops import lora_linear
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    x = torch.randn(5, 40, requires_grad=True)
    w = torch.randn(7, 40)
    a = torch.randn(3, 40, requires_grad=True)
    b = torch.randn(7, 3, requires_grad=True)
    dy = torch.randn(5, 7)
    grads = []
    for create_graph in (False, True):
        torch.manual_seed(3)
        y = lora_linear(x, w, a, b, 0.6, dropout_p=0.4, training=True)
        grads.append(torch.autograd.grad(y, (x, a, b), dy, create_graph=create_graph))
    for fused, recorded in zip(*grads):
        assert recorded.grad_fn is not None
        torch.testing.assert_close(recorded, fused, rtol=1e-5, atol=1e-5)


def _dora_layer():
    layer = LoRALinear(nn.Linear(IN, OUT).double(), r=R, lora_alpha=ALPHA, variant="dora")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer, (layer.lora_A.weight, layer.lora_B.weight)


def _nf4_layer():
    from fastpeft.nn import NF4Linear
    layer = NF4Linear.from_linear(nn.Linear(IN, OUT), blocksize=64)
    return layer, ()


@pytest.mark.parametrize("make", [_dora_layer, _nf4_layer], ids=["dora", "nf4"])
def test_once_differentiable_ops_raise_instead_of_none(make):
    """Ops without second derivatives (DoRA, NF4) raise under allow_unused instead of returning None or zeros."""
    layer, params = make()
    dtype = torch.float64 if params else torch.float32
    x = torch.randn(3, IN, dtype=dtype, requires_grad=True)
    wrt = params[0] if params else x
    g, = torch.autograd.grad((layer(x) ** 2).sum(), (wrt,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad(g.sum(), (params[1] if params else x,), allow_unused=True)
