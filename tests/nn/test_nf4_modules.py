"""NF4Linear and QLoRALinear: forward/grads vs a dense float64 reference on the dequantized weight,
vs bitsandbytes ``Linear4bit`` (+ LoRA math, + PEFT on a Linear4bit), init, merge, buffers, errors."""
import math

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from fastpeft.nn import NF4Linear, QLoRALinear
from fastpeft.quant.nf4 import NF4Weight
from numerics import assert_close_to_ref

BACKENDS = ["cpu", "triton"]


def dense_linear(k=128, n=40, bias=True, dtype=torch.float32):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3.0)
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


def bnb_linear4bit(lin: nn.Linear, double_quant: bool):
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=double_quant)
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=double_quant)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone())
    return q.to("cpu")  # bitsandbytes quantizes on the move to a device


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4linear_forward_and_grads(backend, double_quant):
    lin = dense_linear()
    layer = NF4Linear.from_linear(lin, blocksize=64, double_quant=double_quant)
    w = layer.dequantize(torch.float64)
    x = torch.randn(2, 5, 128, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    b64 = lin.bias.detach().double().requires_grad_()
    y64 = x64 @ w.T + b64
    y64.backward(dy.double())
    base = x.detach() @ w.float().T + lin.bias.detach()
    assert_close_to_ref(y, y64, base, what="y")
    assert_close_to_ref(x.grad, x64.grad, dy @ w.float(), what="dx")
    assert_close_to_ref(layer.bias.grad, b64.grad, dy.sum((0, 1)), what="dbias")
    assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4linear_from_bnb_matches_bnb_layer(double_quant):
    lin = dense_linear()
    q = bnb_linear4bit(lin, double_quant)
    layer = NF4Linear.from_bnb(q)
    assert torch.equal(layer.weight.view(-1), q.weight.data.view(torch.uint8).view(-1))
    assert layer.double_quant == double_quant
    x = torch.randn(7, 128)
    ref = x.double() @ layer.dequantize(torch.float64).T + lin.bias.double()
    assert_close_to_ref(layer(x), ref, q(x))
    # The same bytes as our own quantizer: from_linear and from_bnb agree exactly.
    own = NF4Linear.from_linear(lin, double_quant=double_quant)
    assert torch.equal(own.dequantize(), layer.dequantize())


def test_nf4linear_buffers_move_but_never_cast():
    layer = NF4Linear.from_linear(dense_linear(), double_quant=True)
    before = layer.dequantize()
    layer.half()
    assert layer.weight.dtype == torch.uint8 and layer.weight_absmax.dtype == torch.uint8
    assert layer.weight_code.dtype == torch.float32 and layer.weight_nested_absmax.dtype == torch.float32
    assert layer.bias.dtype == torch.float16
    assert torch.equal(layer.dequantize(), before)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_absmax", "weight_code", "weight_nested_absmax", "weight_nested_code",
                       "weight_nested_offset", "bias"}
    x = torch.randn(3, 128, dtype=torch.float16)
    assert layer(x).dtype == torch.float16


def test_nf4linear_repr_and_errors():
    layer = NF4Linear.from_linear(dense_linear(bias=False), blocksize=128)
    text = repr(layer)
    assert "blocksize=128" in text and "bias=False" in text and "in_features=128" in text
    with pytest.raises(TypeError, match="weight"):
        NF4Linear(torch.randn(4, 64))
    with pytest.raises(ValueError, match="blocksize"):
        NF4Linear(NF4Weight.from_float(torch.randn(4, 96)))
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear(NF4Weight.from_float(torch.randn(2, 2, 64)))
    with pytest.raises(ValueError, match="bias"):
        NF4Linear(NF4Weight.from_float(torch.randn(4, 64)), torch.randn(5))
    with pytest.raises(TypeError, match="linear"):
        NF4Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="blocksize"):
        NF4Linear.from_linear(dense_linear(), blocksize=48)


# ---------------------------------------------------------------- QLoRALinear
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_qlora_forward_and_grads_vs_dense_float64(backend, use_rslora):
    lin = dense_linear()
    layer = QLoRALinear.from_linear(lin, r=4, lora_alpha=8, use_rslora=use_rslora, init_lora_weights=False)
    assert layer.scaling == (8 / 2 if use_rslora else 8 / 4)
    w = layer.base_layer.dequantize(torch.float64)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(3, 4, 128, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    x64, a64, b64 = leaves
    y64 = x64 @ w.T + lin.bias.double() + layer.scaling * (x64 @ a64.T) @ b64.T
    y64.backward(dy.double())
    leaves32 = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    x32, a32, b32 = leaves32
    y32 = x32 @ w.float().T + lin.bias + layer.scaling * (x32 @ a32.T) @ b32.T
    y32.backward(dy)
    assert_close_to_ref(y, y64, y32, what="y")
    for name, got, ref, base in zip(("dx", "dA", "dB"), (x.grad, a.grad, b.grad), leaves, leaves32):
        assert_close_to_ref(got, ref.grad, base.grad, what=name)
    assert layer.base_layer.bias.grad is None


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_vs_bnb_linear4bit_plus_lora_math(double_quant):
    lin = dense_linear()
    q = bnb_linear4bit(lin, double_quant)
    layer = QLoRALinear.from_bnb(q, r=3, lora_alpha=6, init_lora_weights=False)
    x = torch.randn(9, 128)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    bnb_out = q(x) + layer.scaling * (x @ a.T) @ b.T
    ref = x.double() @ layer.base_layer.dequantize(torch.float64).T + lin.bias.double() \
        + layer.scaling * (x.double() @ a.double().T) @ b.double().T
    assert_close_to_ref(layer(x), ref, bnb_out)


def test_qlora_vs_peft_on_bnb_linear4bit():
    import peft  # a test dependency: a missing install must fail, not skip

    lin = dense_linear()
    model = nn.Sequential(bnb_linear4bit(lin, double_quant=True))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["0"]))
    plora = peft_model.base_model.model[0]
    with torch.no_grad():
        plora.lora_B["default"].weight.normal_()
    ours = QLoRALinear.from_bnb(plora.base_layer, r=4, lora_alpha=16)
    with torch.no_grad():
        ours.lora_A.weight.copy_(plora.lora_A["default"].weight)
        ours.lora_B.weight.copy_(plora.lora_B["default"].weight)
    x = torch.randn(5, 128)
    ref = x.double() @ ours.base_layer.dequantize(torch.float64).T + lin.bias.double() \
        + 4.0 * (x.double() @ ours.lora_A.weight.double().T) @ ours.lora_B.weight.double().T
    assert_close_to_ref(ours(x), ref, peft_model(x))


def test_qlora_peft_init():
    torch.manual_seed(3)
    layer = QLoRALinear.from_linear(dense_linear(), r=8)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(128)  # kaiming_uniform(a=sqrt(5)) on fan_in=128
    a = layer.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    g = QLoRALinear.from_linear(dense_linear(k=256), r=16, init_lora_weights="gaussian")
    assert abs(g.lora_A.weight.std().item() - 1 / 16) < 0.1 / 16
    x = torch.randn(4, 128)
    assert torch.equal(layer(x), layer.base_layer(x))  # zero B: the base output exactly
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"lora_A.weight", "lora_B.weight"}


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_to_dense_linear_returns_merged_dense_linear(double_quant):
    lin = dense_linear()
    layer = QLoRALinear.from_linear(lin, r=4, init_lora_weights=False, double_quant=double_quant)
    packed_before = layer.base_layer.weight.clone()
    merged = layer.to_dense_linear()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    expected = layer.base_layer.dequantize(torch.float64) + layer.scaling * (
        layer.lora_B.weight.double() @ layer.lora_A.weight.double())
    torch.testing.assert_close(merged.weight.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(merged.bias, lin.bias)
    assert torch.equal(layer.base_layer.weight, packed_before)  # never merged in place
    x = torch.randn(6, 128)
    ref = x.double() @ expected.T + lin.bias.double()
    assert_close_to_ref(merged(x), ref, layer(x))
    assert merged.weight.requires_grad and merged.bias.requires_grad is True


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_merge_and_unmerge_in_place_are_exact(double_quant):
    lin = dense_linear()
    layer = QLoRALinear.from_linear(lin, r=4, init_lora_weights=False, double_quant=double_quant).eval()
    packed_before = layer.base_layer.weight.clone()
    x = torch.randn(6, 128)
    before = layer(x)
    expected = layer.base_layer.dequantize(torch.float64) + layer.scaling * (
        layer.lora_B.weight.double() @ layer.lora_A.weight.double())
    layer.merge()
    assert layer.merged
    assert_close_to_ref(layer(x), x.double() @ expected.T + lin.bias.double(), before)
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, packed_before)
    assert torch.equal(layer(x), before)


def test_qlora_dropout_changes_training_output_only():
    layer = QLoRALinear.from_linear(dense_linear(), r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(4, 128)
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, layer(x))
    layer.train()
    assert not torch.allclose(layer(x), y_eval)


def test_qlora_fp32_adapters_on_fp16_input():
    layer = QLoRALinear.from_linear(dense_linear(), r=4, init_lora_weights=False)
    x = torch.randn(3, 128, dtype=torch.float16)
    y = layer(x)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32


def test_qlora_errors():
    lin = dense_linear()
    with pytest.raises(TypeError, match="base_layer"):
        QLoRALinear(lin)
    with pytest.raises(ValueError, match="r must be"):
        QLoRALinear.from_linear(lin, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        QLoRALinear.from_linear(lin, lora_dropout=1.5)
    with pytest.raises(ValueError, match="init_lora_weights"):
        QLoRALinear.from_linear(lin, init_lora_weights="orthogonal-ish")
    with pytest.raises(TypeError, match="lora_dtype"):
        QLoRALinear.from_linear(lin, lora_dtype=torch.int8)
    with pytest.raises(ValueError, match="blocksize"):
        QLoRALinear.from_linear(dense_linear(k=96))
    with pytest.raises(ValueError, match="quant_state"):
        QLoRALinear.from_bnb(bnb.nn.Linear4bit(64, 8, quant_type="nf4"))  # never moved: not quantized


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_qlora_module_compiles_fullgraph(backend):
    layer = QLoRALinear.from_linear(dense_linear(), r=4, init_lora_weights=False, double_quant=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 128)
    out = compiled(x)
    assert torch.equal(out, layer(x))
    out.sum().backward()
    grad_a = layer.lora_A.weight.grad.clone()
    layer.zero_grad()
    layer(x).sum().backward()
    assert torch.equal(grad_a, layer.lora_A.weight.grad)


@pytest.mark.parametrize("double_quant", [False, True])
def test_load_state_dict_refreshes_quantized_weight(double_quant):
    src = QLoRALinear.from_linear(dense_linear(), r=4, init_lora_weights=False, double_quant=double_quant)
    dst = QLoRALinear.from_linear(dense_linear(), r=4, double_quant=double_quant)
    x = torch.randn(3, 128)
    dst(x)  # fills dst's caches (e.g. the decoded double-quant scales) before the load
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(x), src(x))
    assert torch.equal(dst.base_layer.dequantize(), src.base_layer.dequantize())


@pytest.mark.parametrize("buffer", ["weight_absmax", "weight_nested_absmax", "weight_nested_offset", "weight"])
def test_in_place_copy_into_buffers_is_seen_by_forward(buffer):
    src = NF4Linear.from_linear(dense_linear(), double_quant=True)
    dst = NF4Linear.from_linear(dense_linear(), double_quant=True)
    x = torch.randn(3, 128)
    before = dst(x)  # decodes and caches dst's fp32 block scales
    with torch.no_grad():
        getattr(dst, buffer).copy_(getattr(src, buffer))
    expected = _fresh_layer_from_buffers(dst)(x)
    assert not torch.equal(expected, before)
    assert torch.equal(dst(x), expected)


def _fresh_layer_from_buffers(layer):
    """A new NF4Linear on copies of ``layer``'s current buffers: no cache of ``layer`` can reach it."""
    w = NF4Weight(layer.weight.clone(), (layer.out_features, layer.in_features), layer.weight_dtype,
                  layer.blocksize, layer.weight_absmax.clone(), nested_absmax=layer.weight_nested_absmax.clone(),
                  nested_code=layer.weight_nested_code.clone(), offset=float(layer.weight_nested_offset),
                  code=layer.weight_code.clone())
    return NF4Linear(w, layer.bias)


@pytest.mark.parametrize("double_quant", [False, True])
def test_model_with_nf4_layers_pickles(double_quant, tmp_path):
    import io
    import pickle

    model = nn.Sequential(QLoRALinear.from_linear(dense_linear(n=64), r=4, init_lora_weights=False,
                                                  double_quant=double_quant),
                          nn.ReLU(), NF4Linear.from_linear(dense_linear(64, 40), double_quant=double_quant))
    x = torch.randn(3, 128)
    expected = model(x)
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone(x), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a user's whole-model save (fastpeft itself never pickles weights)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), expected)
    loaded[2].load_state_dict(model[2].state_dict())  # the load hook survives the round trip
    assert torch.equal(loaded(x), expected)
