"""LoRALinear: against HF PEFT's ``lora.Linear`` and a float64 reference.

The CPU path is forced (``FASTPEFT_BACKEND=cpu``) so the tests stay fast under
the conftest's ``TRITON_INTERPRET=1``; one test runs the Triton kernels on a
tiny layer when they are present.
"""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from numerics import assert_close_to_ref, rel_err
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastpeft.nn import LoRALinear
from fastpeft.ops import lora_dropout_mask

IN, OUT, R = 37, 29, 5


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def _base(kind, dtype=torch.float32, bias=True):
    if kind == "linear":
        return nn.Linear(IN, OUT, bias=bias, dtype=dtype)
    layer = Conv1D(OUT, IN).to(dtype)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def _random_lora(layer):
    """Non-zero A and B (B is zero after the default init, which would hide errors)."""
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn_like(layer.lora_A.weight) * 0.3)
        layer.lora_B.weight.copy_(torch.randn_like(layer.lora_B.weight) * 0.3)


def _peft_twin(ours: LoRALinear, use_rslora=False):
    """A PEFT lora.Linear over a copy of our base layer, holding our A and B."""
    conv1d = ours.fan_in_fan_out
    config = LoraConfig(r=ours.r, lora_alpha=ours.lora_alpha, lora_dropout=0.0, use_rslora=use_rslora,
                        fan_in_fan_out=conv1d, init_lora_weights=False)
    twin = PeftLoraLinear(copy.deepcopy(ours.base_layer), "default", config=config, r=ours.r,
                          lora_alpha=ours.lora_alpha, is_target_conv_1d_layer=conv1d)
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(ours.lora_A.weight)
        twin.lora_B["default"].weight.copy_(ours.lora_B.weight)
    return twin


def _reference(layer: LoRALinear, x: torch.Tensor):
    """Float64 forward of the same maths, plus grads of (x, A, B) for ``dy``."""
    w = layer.base_layer.weight.detach().double()
    w = w.t() if layer.fan_in_fan_out else w
    b = layer.base_layer.bias.detach().double()
    a = layer.lora_A.weight.detach().double().requires_grad_()
    bb = layer.lora_B.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y = F.linear(x64, w, b) + layer.scaling * (x64 @ a.t()) @ bb.t()
    return y, x64, a, bb


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_forward_and_grads(kind, dtype, use_rslora):
    ours = LoRALinear.from_linear(_base(kind, dtype), r=R, lora_alpha=11, use_rslora=use_rslora)
    _random_lora(ours)
    peft = _peft_twin(ours, use_rslora=use_rslora)
    assert ours.scaling == pytest.approx(11 / math.sqrt(R) if use_rslora else 11 / R)
    assert ours.scaling == pytest.approx(peft.scaling["default"])

    # Non-contiguous [3, 4, IN] input.
    x = torch.randn(4, 3, IN, dtype=dtype).transpose(0, 1)
    dy = torch.randn(3, 4, OUT, dtype=dtype)
    x_ours = x.clone().requires_grad_()
    x_peft = x.contiguous().requires_grad_()  # transformers' Conv1D cannot take a strided x
    y_ours, y_peft = ours(x_ours), peft(x_peft)
    y_ref, x64, a64, b64 = _reference(ours, x)
    assert y_ours.dtype == dtype
    assert_close_to_ref(y_ours, y_ref, y_peft, what="y")

    y_ours.backward(dy)
    y_peft.backward(dy)
    y_ref.backward(dy.double())
    assert_close_to_ref(x_ours.grad, x64.grad, x_peft.grad, what="dx")
    assert_close_to_ref(ours.lora_A.weight.grad, a64.grad, peft.lora_A["default"].weight.grad, what="dA")
    assert_close_to_ref(ours.lora_B.weight.grad, b64.grad, peft.lora_B["default"].weight.grad, what="dB")
    assert ours.base_layer.weight.grad is None and ours.base_layer.bias.grad is None


def test_parameter_names_and_trainability():
    layer = LoRALinear.from_linear(_base("linear"), r=R)
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"}
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.shape == (R, IN) and layer.lora_B.weight.shape == (OUT, R)


def test_conv1d_shapes_and_autodetect():
    layer = LoRALinear.from_linear(_base("conv1d"), r=R)
    assert layer.fan_in_fan_out is True
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    assert layer.lora_A.weight.shape == (R, IN) and layer.lora_B.weight.shape == (OUT, R)
    assert LoRALinear.from_linear(_base("linear"), r=R).fan_in_fan_out is False


def test_default_init_is_kaiming_uniform_A_and_zero_B():
    fan_in = 513
    layer = LoRALinear.from_linear(nn.Linear(fan_in, 64), r=16)
    a = layer.lora_A.weight.detach()
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform with a=sqrt(5)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(3, fan_in)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_gaussian_init_statistics():
    r = 4
    layer = LoRALinear.from_linear(nn.Linear(2048, 64), r=r, init_lora_weights="gaussian")
    a = layer.lora_A.weight.detach()
    assert a.mean().abs().item() < 0.05 / r
    assert a.std().item() == pytest.approx(1 / r, rel=0.03)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_init_false_leaves_nonzero_update():
    layer = LoRALinear.from_linear(_base("linear"), r=R, init_lora_weights=False)
    assert torch.count_nonzero(layer.lora_B.weight) > 0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge(kind):
    ours = LoRALinear.from_linear(_base(kind), r=R, lora_alpha=7)
    _random_lora(ours)
    peft = _peft_twin(ours)
    w0 = ours.base_layer.weight.detach().clone()
    x = torch.randn(6, IN)
    y_ref, *_ = _reference(ours, x)
    y_unmerged = ours(x).detach()

    ours.merge()
    assert ours.merged and "merged=True" in repr(ours)
    peft.merge()
    # Same merged weight as PEFT's independent merge.
    torch.testing.assert_close(ours.base_layer.weight, peft.base_layer.weight, rtol=1e-6, atol=1e-6)
    y_merged = ours(x).detach()
    assert_close_to_ref(y_merged, y_ref, y_unmerged, what="merged forward")
    # Merged forward is the plain base layer: changing A no longer changes the output.
    with torch.no_grad():
        ours.lora_A.weight.mul_(3.0)
    torch.testing.assert_close(ours(x), y_merged, rtol=0, atol=0)
    with torch.no_grad():
        ours.lora_A.weight.div_(3.0)

    ours.merge()  # a second merge is a no-op
    ours.unmerge()
    assert not ours.merged
    assert rel_err(ours.base_layer.weight, w0) < 1e-6
    assert_close_to_ref(ours(x), y_ref, y_unmerged, what="forward after unmerge")


def test_dropout_only_in_training_mode():
    p = 0.4
    layer = LoRALinear.from_linear(_base("linear"), r=R, lora_dropout=p)
    _random_lora(layer)
    x = torch.randn(9, IN)
    y_ref, *_ = _reference(layer, x)  # no dropout

    layer.eval()
    y_eval = layer(x).detach()
    assert_close_to_ref(y_eval, y_ref, F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
                        + layer.scaling * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t())

    layer.train()
    torch.manual_seed(123)
    y_train = layer(x).detach()
    # The op draws its mask seed from the default generator (fastpeft.ops.lora).
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = lora_dropout_mask(x.shape, p, seed, x.device)
    assert 0 < keep.sum() < keep.numel()
    x_drop = x.double() * keep / (1 - p)
    w, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    a, bb = layer.lora_A.weight.detach().double(), layer.lora_B.weight.detach().double()
    expected = F.linear(x.double(), w, b) + layer.scaling * (x_drop @ a.t()) @ bb.t()
    assert rel_err(y_train, expected) < 1e-5
    assert rel_err(y_train, y_eval) > 1e-3


def test_extra_repr():
    text = repr(LoRALinear.from_linear(_base("linear"), r=4, lora_alpha=16, lora_dropout=0.1))
    for part in ("r=4", "lora_alpha=16", "scaling=4", "lora_dropout=0.1", "merged=False"):
        assert part in text


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"r": 0}, ValueError, "r must be"),
    ({"r": -3}, ValueError, "r must be"),
    ({"r": 2.5}, TypeError, "r must be"),
    ({"r": True}, TypeError, "r must be"),
    ({"lora_alpha": "8"}, TypeError, "lora_alpha"),
    ({"lora_alpha": float("nan")}, ValueError, "lora_alpha"),
    ({"lora_dropout": 1.0}, ValueError, "lora_dropout"),
    ({"lora_dropout": -0.1}, ValueError, "lora_dropout"),
    ({"lora_dropout": "0.1"}, TypeError, "lora_dropout"),
    ({"init_lora_weights": "pissa"}, ValueError, "init_lora_weights"),
    ({"init_lora_weights": None}, ValueError, "init_lora_weights"),
    ({"fan_in_fan_out": True}, ValueError, "fan_in_fan_out"),
    ({"lora_dtype": torch.int32}, TypeError, "lora_dtype"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LoRALinear.from_linear(_base("linear"), **kwargs)


def test_fan_in_fan_out_false_on_conv1d_rejected():
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        LoRALinear.from_linear(_base("conv1d"), fan_in_fan_out=False)


@pytest.mark.parametrize("base", [nn.Conv2d(3, 4, 1), nn.Embedding(10, 4), nn.LayerNorm(4), "linear"])
def test_bad_base_layer(base):
    with pytest.raises(TypeError, match="base_layer"):
        LoRALinear.from_linear(base)


def test_input_dtype_other_than_the_base_computes_in_the_input_dtype():
    # Outside autocast the compute dtype is x's (tests/test_autocast.py covers bf16 and autocast).
    layer = LoRALinear.from_linear(_base("linear"), r=R, init_lora_weights=False)
    x = torch.randn(2, IN, dtype=torch.float64)
    out = layer(x)
    assert out.dtype == torch.float64
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    expected = x @ w.t() + b + layer.scaling * (x @ layer.lora_A.weight.double().t()) @ layer.lora_B.weight.double().t()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_triton_backend_tiny_layer(kind, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    ours = LoRALinear.from_linear(_base(kind), r=3, lora_alpha=5)
    _random_lora(ours)
    peft = _peft_twin(ours)
    x = torch.randn(5, IN)
    x_ours, x_peft = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_peft = ours(x_ours), peft(x_peft)
    y_ref, x64, a64, b64 = _reference(ours, x)
    assert_close_to_ref(y_ours, y_ref, y_peft, what="y")
    dy = torch.randn_like(y_ours)
    y_ours.backward(dy)
    y_peft.backward(dy)
    y_ref.backward(dy.double())
    assert_close_to_ref(x_ours.grad, x64.grad, x_peft.grad, what="dx")
    assert_close_to_ref(ours.lora_A.weight.grad, a64.grad, peft.lora_A["default"].weight.grad, what="dA")
    assert_close_to_ref(ours.lora_B.weight.grad, b64.grad, peft.lora_B["default"].weight.grad, what="dB")


@settings(max_examples=20, deadline=None)
@given(in_features=st.integers(1, 40), out_features=st.integers(1, 40), r=st.integers(1, 9),
       lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), conv1d=st.booleans(), bias=st.booleans(),
       alpha=st.floats(0.5, 32))
def test_property_shapes_match_float64_reference(in_features, out_features, r, lead, conv1d, bias, alpha):
    if conv1d:
        base = Conv1D(out_features, in_features)
        nn.init.normal_(base.weight, std=0.3)
        if not bias:
            base.bias = None
    else:
        base = nn.Linear(in_features, out_features, bias=bias)
    layer = LoRALinear.from_linear(base, r=r, lora_alpha=alpha, init_lora_weights=False)
    x = torch.randn(*lead, in_features, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, out_features)

    w = base.weight.detach().double()
    w = w.t() if conv1d else w
    b = base.bias.detach().double() if base.bias is not None else None
    a = layer.lora_A.weight.detach().double().requires_grad_()
    bb = layer.lora_B.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = F.linear(x64, w, b) + layer.scaling * (x64 @ a.t()) @ bb.t()
    xt = x.detach().requires_grad_()
    yt = F.linear(xt, w.float(), None if b is None else b.float()) \
        + layer.scaling * (xt @ layer.lora_A.weight.detach().t()) @ layer.lora_B.weight.detach().t()
    assert_close_to_ref(y, y64, yt, tiny=1e-6, what="y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    assert rel_err(layer.lora_A.weight.grad, a.grad) < 1e-5
    assert rel_err(layer.lora_B.weight.grad, bb.grad) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-5


def test_gradcheck_float64_conv1d():
    base = Conv1D(5, 7).double()
    nn.init.normal_(base.weight)
    layer = LoRALinear.from_linear(base, r=2, init_lora_weights=False)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    params = (layer.lora_A.weight, layer.lora_B.weight)
    assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x, *params))


def _check_half_precision_with_fp32_adapters(kind, dtype, device):
    layer = LoRALinear.from_linear(_base(kind).to(device, dtype), r=R, lora_alpha=7, lora_dtype=torch.float32)
    _random_lora(layer)
    x = torch.randn(3, 17, IN, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.dtype == torch.float32

    y_ref, x64, a64, b64 = _reference(layer, x)
    y_ref.backward(dy.double())
    # Plain torch in the same dtype on the same operands.
    w = layer.base_layer.weight.detach()
    w = w.t() if layer.fan_in_fan_out else w
    xt = x.detach().requires_grad_()
    at = layer.lora_A.weight.detach().to(dtype).requires_grad_()
    bt = layer.lora_B.weight.detach().to(dtype).requires_grad_()
    yt = F.linear(xt, w, layer.base_layer.bias) + layer.scaling * (xt @ at.t()) @ bt.t()
    yt.backward(dy)
    assert_close_to_ref(y, y_ref, yt, what="y")
    assert_close_to_ref(x.grad, x64.grad, xt.grad, what="dx")
    assert_close_to_ref(layer.lora_A.weight.grad, a64.grad, at.grad, what="dA")
    assert_close_to_ref(layer.lora_B.weight.grad, b64.grad, bt.grad, what="dB")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_precision_with_fp32_adapters(kind, dtype):
    _check_half_precision_with_fp32_adapters(kind, dtype, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fused_kernels_with_fp32_adapters(kind, dtype, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "auto")
    _check_half_precision_with_fp32_adapters(kind, dtype, "cuda")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_torch_compile_fullgraph(kind):
    torch._dynamo.reset()
    layer = LoRALinear.from_linear(_base(kind), r=R, lora_alpha=3, lora_dropout=0.2).eval()
    _random_lora(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, IN)
    y_eager = layer(x)
    y_eager.sum().backward()
    grads_eager = [p.grad.clone() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    layer.zero_grad()
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    for p, g in zip((layer.lora_A.weight, layer.lora_B.weight), grads_eager):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    layer.train()
    assert compiled(x).shape == y.shape  # the dropout branch traces without a graph break


@pytest.mark.parametrize("make, call, match", [
    (lambda: LoRALinear.from_linear(nn.Linear(4, 3)), lambda layer: layer(None), "x must be a torch.Tensor"),
    (lambda: __import__("fastpeft").nn.NF4Linear.from_linear(nn.Linear(64, 3)), lambda layer: layer(None),
     "x must be a torch.Tensor"),
    (lambda: __import__("fastpeft").nn.QLoRALinear.from_linear(nn.Linear(64, 3)), lambda layer: layer(None),
     "x must be a torch.Tensor"),
    (lambda: None, lambda _: LoRALinear.from_linear(nn.Linear(4, 3), use_rslora=None), "use_rslora must be a bool"),
    (lambda: None, lambda _: LoRALinear.from_linear(nn.Linear(4, 3), use_rslora="yes"), "use_rslora must be a bool"),
    (lambda: None, lambda _: __import__("fastpeft").apply_lora(nn.Sequential(nn.Linear(4, 3)), ["0"],
                                                               use_rslora=1), "use_rslora must be a bool"),
    (lambda: None, lambda _: __import__("fastpeft").load_lora(nn.Linear(4, 3), None), "directory must be"),
])
def test_none_and_wrong_types_name_the_argument(make, call, match):
    layer = make()
    with pytest.raises(TypeError, match=match):
        call(layer)
