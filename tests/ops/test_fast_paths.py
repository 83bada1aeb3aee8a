"""The per-call fast paths of the LoRA / NF4 / QLoRA / prefix-attention ops and modules are the slow paths, only cheaper.

- Each cheap argument predicate (``_arguments_ok``, ``nf4_weight_ok``) says
  True only where the raising checks pass (else a bad call would slip past the
  checks), and True for good calls (else the fast path would never run).
- The forward without an autograd Function (nothing can need a gradient)
  returns what the Function returns.
- Cached choices (backend, NF4 weight view) still follow changes.
- Torch's ``once_differentiable`` and our cheaper one agree.
"""
import importlib

import pytest
import torch
from torch import nn

from fastpeft.nn.lora import LoRALinear, module_parameter
from fastpeft.nn.nf4 import NF4Linear
from fastpeft.nn.qlora import QLoRALinear
from fastpeft.ops import lora as lora_op
from fastpeft.ops import nf4 as nf4_op
from fastpeft.ops import qlora as qlora_op
from fastpeft.quant.nf4 import NF4Weight

pytestmark = pytest.mark.usefixtures("cpu_backend")

N, K, R = 6, 128, 2


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def _good_lora():
    return dict(x=torch.randn(3, K), weight=torch.randn(N, K), lora_A=torch.randn(R, K), lora_B=torch.randn(N, R),
                bias=torch.randn(N))


def _good_nf4():
    return NF4Weight.from_float(torch.randn(N, K), blocksize=64)


# Replacements for one argument, each breaking one check (plus a few that break none).
_BAD_TENSORS = {
    "x": [torch.randn(3, K + 1), torch.randint(0, 3, (3, K)), torch.tensor(1.0), [[1.0] * K], None,
          torch.randn(3, K, dtype=torch.float64), torch.randn(3, K, device="meta"), torch.randn(2, 5, K),
          torch.randn(K), torch.randn(3, K, dtype=torch.bfloat16), torch.randn(3, K, dtype=torch.complex64)],
    "weight": [torch.randn(N, K, 1), torch.randn(N, K + 1), torch.randn(N + 1, K), torch.randn(K),
               torch.randn(N, K, dtype=torch.float64), torch.randn(N, K, device="meta"), None, "w",
               torch.randn(N, K).t().contiguous().t()],
    "lora_A": [torch.randn(R, K + 1), torch.randn(0, K), torch.randn(R, K, dtype=torch.float16),
               torch.randn(R, K, device="meta"), torch.randn(R, K, 1), torch.randn(K), None, 1.0,
               torch.randn(R + 1, K)],
    "lora_B": [torch.randn(N + 1, R), torch.randn(N, R + 1), torch.randn(N, 0), torch.randn(N, R, dtype=torch.float64),
               torch.randn(N, R, device="meta"), torch.randn(N), None, torch.randn(R, N).t()],
    "bias": [torch.randn(N + 1), torch.randn(N, 1), torch.tensor(1.0), torch.randn(N, dtype=torch.float64),
             torch.randn(N, device="meta"), [0.0] * N, None],
}


def _passes(check, *args) -> bool:
    try:
        check(*args)
    except (TypeError, ValueError):
        return False
    return True


def _lora_cases(base="weight"):
    for name, values in _BAD_TENSORS.items():
        if name == "weight" and base != "weight":
            continue  # QLoRA's base is an NF4Weight: its own cases below
        for i, value in enumerate(values):
            yield pytest.param(name, value, id=f"{name}-{i}")


@pytest.mark.parametrize("name, value", _lora_cases())
def test_lora_predicate_is_true_only_where_the_checks_pass(name, value):
    args = {**_good_lora(), name: value}
    ordered = (args["x"], args["weight"], args["lora_A"], args["lora_B"], args["bias"])
    ok = lora_op._arguments_ok(*ordered)
    assert not ok or _passes(lora_op._validate, *ordered)


@pytest.mark.parametrize("name, value", _lora_cases(base="w_nf4"))
def test_qlora_predicate_is_true_only_where_the_checks_pass(name, value):
    args = {**_good_lora(), name: value}
    ordered = (args["x"], _good_nf4(), args["lora_A"], args["lora_B"], args["bias"])
    ok = qlora_op._arguments_ok(*ordered)
    assert not ok or _passes(qlora_op._validate, *ordered)


def _bad_nf4_weights():
    good = _good_nf4()

    def edited(**fields):
        w = _good_nf4()
        w.__dict__.update(fields)
        return w

    yield good
    yield edited(blocksize=96)  # 128 % 96 != 0
    yield edited(shape=(N, K, 1))
    yield edited(shape=(N, K + 64))
    yield edited(packed=good.packed.to(torch.int8))
    yield edited(packed=good.packed[:-1])
    yield edited(packed="bytes")
    yield edited(absmax=good.absmax[:-1], _absmax_float=None)
    yield edited(absmax=good.absmax.double(), _absmax_float=None)
    yield edited(absmax=good.absmax.to("meta"), _absmax_float=None)
    yield edited(code=good.code.to("meta"))
    yield NF4Weight.from_float(torch.randn(N, K), blocksize=64, double_quant=True)
    yield torch.randn(N, K)
    yield None


@pytest.mark.parametrize("w", list(_bad_nf4_weights()))
def test_nf4_weight_predicate_is_true_only_where_the_checks_pass(w):
    ok = nf4_op.nf4_weight_ok(w)
    assert not ok or _passes(nf4_op.validate_nf4_weight, "w_nf4", w)
    x, a, b = torch.randn(3, K), torch.randn(R, K), torch.randn(N, R)
    assert not qlora_op._arguments_ok(x, w, a, b, None) or _passes(qlora_op._validate, x, w, a, b, None)
    assert not nf4_op._arguments_ok(x, w, None) or _passes(nf4_op._validate, x, w, None)


@pytest.mark.parametrize("name, value", [(k, v) for k, vs in _BAD_TENSORS.items() if k in ("x", "bias") for v in vs])
def test_nf4_linear_predicate_is_true_only_where_the_checks_pass(name, value):
    args = {**_good_lora(), name: value}
    ordered = (args["x"], _good_nf4(), args["bias"])
    assert not nf4_op._arguments_ok(*ordered) or _passes(nf4_op._validate, *ordered)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lead", [(3,), (2, 5), (1,)])
def test_good_calls_take_the_fast_checks(dtype, lead):
    t = {k: v.to(dtype) for k, v in _good_lora().items()}
    x = torch.randn(*lead, K, dtype=dtype)
    w = _good_nf4()
    assert lora_op._arguments_ok(x, t["weight"], t["lora_A"], t["lora_B"], t["bias"])
    assert lora_op._arguments_ok(x, t["weight"], t["lora_A"], t["lora_B"], None)
    assert qlora_op._arguments_ok(x, w, t["lora_A"], t["lora_B"], t["bias"])
    assert nf4_op._arguments_ok(x, w, t["bias"])
    assert nf4_op.nf4_weight_ok(NF4Weight.from_float(torch.randn(N, K), blocksize=64, double_quant=True))


# ---- the forward without an autograd Function ---------------------------------------------

@pytest.mark.parametrize("lead", [(4,), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_without_autograd_equals_the_function(lead, dtype):
    t = {k: v.to(dtype) for k, v in _good_lora().items()}
    x = torch.randn(*lead, K, dtype=dtype)
    w = _good_nf4()
    calls = [
        lambda x, a, b: lora_op.lora_linear(x, t["weight"], a, b, 1.5, bias=t["bias"]),
        lambda x, a, b: qlora_op.qlora_linear(x, w, a, b, 1.5, bias=t["bias"]),
        lambda x, a, b: nf4_op.nf4_linear(x, w, t["bias"]),
    ]
    for call in calls:
        with torch.no_grad():
            plain = call(x, t["lora_A"], t["lora_B"])
        a, b = t["lora_A"].clone().requires_grad_(), t["lora_B"].clone().requires_grad_()
        x_grad = x.clone().requires_grad_()
        recorded = call(x_grad, a, b)
        assert plain.shape == recorded.shape == (*lead, N) and plain.dtype == recorded.dtype == dtype
        assert not plain.requires_grad
        assert torch.equal(plain, recorded.detach())
        assert recorded.grad_fn is not None


@pytest.mark.parametrize("sq", [1, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_attention_without_autograd_equals_the_function(sq, dtype, monkeypatch):
    op = importlib.import_module("fastpeft.ops.prefix_attention")  # the package exports the function by this name
    prefix_attention = op.prefix_attention

    q = torch.randn(2, 4, sq, 16, dtype=dtype)
    k, v = torch.randn(2, 2, 24, 16, dtype=dtype), torch.randn(2, 2, 24, 16, dtype=dtype)
    pk, pv = torch.randn(1, 2, 5, 16, dtype=dtype), torch.randn(1, 2, 5, 16, dtype=dtype)
    function_apply = op.PrefixAttentionFunction.apply
    with monkeypatch.context() as patch:
        patch.setattr(op.PrefixAttentionFunction, "apply", lambda *a: pytest.fail("built an autograd node"))
        with torch.no_grad():
            plain, plain_lse = prefix_attention(q, k, v, pk, pv, causal=True, return_lse=True)
    assert op.PrefixAttentionFunction.apply == function_apply
    pk_grad = pk.clone().requires_grad_()
    recorded, lse = prefix_attention(q, k, v, pk_grad, pv, causal=True, return_lse=True)
    assert recorded.grad_fn is not None and plain.grad_fn is None
    assert torch.equal(plain, recorded.detach()) and torch.equal(plain_lse, lse)


def test_forward_ad_inputs_keep_their_tangent():
    """Inside a forward-AD level the fast path never drops a tangent (tests/ops/test_lora_higher_order.py
    checks the values against PEFT)."""
    import torch.autograd.forward_ad as fwAD

    t = _good_lora()
    tx = torch.randn_like(t["x"])
    with fwAD.dual_level():
        x = fwAD.make_dual(t["x"], tx)
        tangent = fwAD.unpack_dual(lora_op.lora_linear(x, t["weight"], t["lora_A"], t["lora_B"], 1.0)).tangent
    expected = tx @ t["weight"].t() + (tx @ t["lora_A"].t()) @ t["lora_B"].t()
    torch.testing.assert_close(tangent, expected)


# ---- cached choices follow changes --------------------------------------------------------

def test_backend_choice_follows_the_environment(monkeypatch):
    t = _good_lora()
    lora_op.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], 1.0)  # cached for cpu
    monkeypatch.setenv("FASTPEFT_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND"):
        lora_op.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], 1.0)
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")
    lora_op.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], 1.0)


def test_nf4_module_notices_replaced_bias_and_buffers():
    layer = NF4Linear.from_linear(nn.Linear(K, N), blocksize=64)
    other = NF4Linear.from_linear(nn.Linear(K, N), blocksize=64)
    x = torch.randn(2, K)
    layer(x)  # builds and caches the weight view
    layer.bias = nn.Parameter(other.bias.detach().clone())
    layer.weight = other.weight.clone()
    layer.weight_absmax = other.weight_absmax.clone()
    assert torch.equal(layer(x), other(x))


def test_module_parameter_reads_parametrizations_and_plain_attributes():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = LoRALinear.from_linear(nn.Linear(K, N), r=R, init_lora_weights=False)
    x = torch.randn(3, K)
    expected = layer(x) + layer.scaling * nn.functional.linear(nn.functional.linear(x, layer.lora_A.weight),
                                                               layer.lora_B.weight)
    parametrize.register_parametrization(layer.lora_A, "weight", Double())
    assert torch.equal(module_parameter(layer.lora_A, "weight"), layer.lora_A.weight)
    torch.testing.assert_close(layer(x), expected)
    plain = nn.Module()
    plain.bias = None
    assert module_parameter(plain, "bias") is None


def test_qlora_module_fast_path_matches_plain_torch():
    layer = QLoRALinear.from_linear(nn.Linear(K, N), r=R, blocksize=64, init_lora_weights=False).eval()
    x = torch.randn(4, K)
    dense = layer.base_layer.dequantize(torch.float32)
    expected = nn.functional.linear(x, dense, layer.base_layer.bias) + layer.scaling * nn.functional.linear(
        nn.functional.linear(x, layer.lora_A.weight), layer.lora_B.weight)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x), expected)


# ---- once_differentiable ------------------------------------------------------------------

def test_double_backward_through_the_module_raises():
    """Through an op still marked once_differentiable (LoRA and QLoRA are twice differentiable)."""
    layer = NF4Linear.from_linear(nn.Linear(K, N), blocksize=64)
    x = torch.randn(3, K, requires_grad=True)
    (dx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


# ---- the custom-op dispatcher is skipped in eager mode -------------------------------------

def test_eager_calls_do_not_go_through_the_custom_op_dispatcher():
    from torch.profiler import ProfilerActivity, profile

    t = _good_lora()
    w = _good_nf4()
    x = t["x"].clone().requires_grad_()
    a, b = t["lora_A"].clone().requires_grad_(), t["lora_B"].clone().requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lora_op.lora_linear(x, t["weight"], a, b, 1.0).sum().backward()
        qlora_op.qlora_linear(x, w, a, b, 1.0).sum().backward()
        nf4_op.nf4_linear(x, w).sum().backward()
    names = {event.name for event in prof.events()}
    assert "aten::mm" in names or "aten::addmm" in names or "aten::linear" in names  # the profiler saw the ops
    assert not {name for name in names if name.startswith("fastpeft::")}
