"""fastpeft as an HF PEFT backend (``LoraConfig._register_custom_module``).

Each test checks that the fused op really ran (a counting wrapper around
``fastpeft.integrations.peft.lora_linear``) or, for the fallbacks, that it did
not, and compares against stock PEFT on the same weights with a float64
reference (docs/architecture.md, "Numerics and tests").
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from models import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama, token_ids
from numerics import assert_close_to_ref, rel_err
from peft_fused_calls import count_fused_calls
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

import fastpeft.integrations.peft.backend as backend
from fastpeft.integrations.peft import (FastLoraLinear, FusedLoraTarget, fastpeft_lora_config, load_fastpeft_adapter,
                                        register_fastpeft)
from fastpeft.ops import lora_dropout_mask

IN, OUT = 37, 29
# Whole-model fp32 outputs differ from the float64 reference by a few ulp for both
# sides; their ratio is noise, so model-level checks add a floor of ~16 fp32 ulp
# (a real bug, e.g. a wrong scaling, is off by 1e-2 or more).
MODEL_TINY = 2e-6


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


@pytest.fixture
def fused_calls(monkeypatch):
    return count_fused_calls(monkeypatch, "lora_linear")


def _randomize(model, adapter="default"):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_A.{adapter}." in name or f"lora_B.{adapter}." in name:
                p.copy_(torch.randn_like(p) * 0.3)


def _copy_lora(src, dst):
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_" in name:
                dst_params[name].copy_(p)


def _pair(build, **config):
    """(fastpeft-backed PEFT model, stock PEFT model) with the same random LoRA weights."""
    base = build()
    fast = get_peft_model(copy.deepcopy(base), fastpeft_lora_config(init_lora_weights=False, **config))
    stock = get_peft_model(base, LoraConfig(init_lora_weights=False, **config))
    _randomize(fast)
    _copy_lora(fast, stock)
    return fast, stock


class _Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _layer_base(kind, dtype=torch.float32):
    if kind == "linear":
        return nn.Linear(IN, OUT, dtype=dtype)
    layer = Conv1D(OUT, IN).to(dtype)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_matches_stock_peft_forward_and_grads(kind, fused_calls):
    conv1d = kind == "conv1d"
    fast, stock = _pair(lambda: _Wrap(_layer_base(kind)), r=3, lora_alpha=7, target_modules=["proj"],
                        fan_in_fan_out=conv1d)
    fast_layer, stock_layer = fast.base_model.model.proj, stock.base_model.model.proj
    assert type(fast_layer) is FastLoraLinear and type(stock_layer) is PeftLoraLinear
    assert fast_layer.fan_in_fan_out is conv1d

    x = torch.randn(2, 5, IN)
    x_fast, x_stock = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_stock = fast(x_fast), stock(x_stock)
    assert len(fused_calls) == 1

    # float64 reference from the stock layer's own tensors.
    base = stock_layer.base_layer
    w = base.weight.detach().double()
    w = w.t() if conv1d else w
    a = stock_layer.lora_A["default"].weight.detach().double().requires_grad_()
    b = stock_layer.lora_B["default"].weight.detach().double().requires_grad_()
    x64 = x.double().requires_grad_()
    y64 = F.linear(x64, w, base.bias.detach().double()) + (7 / 3) * (x64 @ a.t()) @ b.t()
    assert_close_to_ref(y_fast, y64, y_stock, what="y")

    dy = torch.randn_like(y_fast)
    for y, d in ((y_fast, dy), (y_stock, dy), (y64, dy.double())):
        y.backward(d)
    assert_close_to_ref(x_fast.grad, x64.grad, x_stock.grad, what="dx")
    assert_close_to_ref(fast_layer.lora_A["default"].weight.grad, a.grad,
                        stock_layer.lora_A["default"].weight.grad, what="dA")
    assert_close_to_ref(fast_layer.lora_B["default"].weight.grad, b.grad,
                        stock_layer.lora_B["default"].weight.grad, what="dB")
    assert fast_layer.base_layer.weight.grad is None


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_model_matches_stock_peft(model_name, fused_calls):
    build, targets = (tiny_llama, LLAMA_TARGETS) if model_name == "llama" else (tiny_gpt2, GPT2_TARGETS)
    fast, stock = _pair(build, r=4, lora_alpha=5, target_modules=targets, fan_in_fan_out=model_name == "gpt2")
    names = fast.base_model.targeted_module_names
    assert all(type(fast.base_model.model.get_submodule(n)) is FastLoraLinear for n in names)
    stock64 = copy.deepcopy(stock).double()

    ids = token_ids(batch=2, seq=6)
    outs = [m(input_ids=ids).logits for m in (fast, stock, stock64)]
    assert len(fused_calls) == len(names)
    assert_close_to_ref(outs[0], outs[2], outs[1], what="logits", tiny=MODEL_TINY)
    weights = torch.randn(outs[0].shape, dtype=torch.float64)
    for out in outs:
        (out * weights.to(out.dtype)).sum().backward()
    stock_params, stock64_params = dict(stock.named_parameters()), dict(stock64.named_parameters())
    for name, p in fast.named_parameters():
        if p.requires_grad:
            assert_close_to_ref(p.grad, stock64_params[name].grad, stock_params[name].grad, what=name, tiny=MODEL_TINY)


def test_fp32_adapters_on_bf16_layer(fused_calls):
    fast, stock = _pair(lambda: _Wrap(_layer_base("linear", torch.bfloat16)), r=4, lora_alpha=6,
                        target_modules=["proj"])
    layer = fast.base_model.model.proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    y = fast(x)
    assert y.dtype == torch.bfloat16 and len(fused_calls) == 1
    y.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32

    base = layer.base_layer
    a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    x64 = x.double()
    y64 = F.linear(x64, base.weight.double(), base.bias.double()) + 1.5 * (x64 @ a.t()) @ b.t()
    with torch.no_grad():
        assert_close_to_ref(y, y64, stock(x), what="bf16 y")


def test_dropout_runs_in_the_fused_op_only_when_training(fused_calls):
    p = 0.3
    fast, stock = _pair(lambda: _Wrap(_layer_base("linear")), r=3, lora_alpha=3, lora_dropout=p,
                        target_modules=["proj"])
    layer = fast.base_model.model.proj
    x = torch.randn(6, IN)
    fast.eval()
    y_eval = fast(x).detach()
    fast.train()
    torch.manual_seed(7)
    y_train = fast(x).detach()
    assert fused_calls == [p, p]

    # The op draws its mask seed from the default generator (fastpeft.ops.lora).
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = lora_dropout_mask(x.shape, p, seed, x.device)
    base = layer.base_layer
    a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    expected = F.linear(x.double(), base.weight.double(), base.bias.double()) \
        + ((x.double() * keep / (1 - p)) @ a.t()) @ b.t()
    assert rel_err(y_train, expected) < 1e-5
    with torch.no_grad():
        stock.eval()
        assert rel_err(y_eval, stock(x)) < 1e-5
    assert rel_err(y_train, y_eval) > 1e-3


def test_merged_and_disabled_adapters_fall_back(fused_calls):
    fast, stock = _pair(lambda: _Wrap(_layer_base("linear")), r=3, lora_alpha=5, target_modules=["proj"])
    x = torch.randn(4, IN)
    with torch.no_grad():
        y = fast(x)
        base_only = fast.base_model.model.proj.base_layer(x)
        with fast.disable_adapter():
            assert torch.equal(fast(x), base_only)
        fast.merge_adapter()
        y_merged = fast(x)
        fast.unmerge_adapter()
    assert len(fused_calls) == 1
    assert rel_err(y_merged, y) < 1e-5


def test_multiple_adapters_and_mixed_batches_fall_back(fused_calls):
    fast, stock = _pair(lambda: _Wrap(_layer_base("linear")), r=3, lora_alpha=5, target_modules=["proj"])
    second = dict(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights=False)
    fast.add_adapter("other", fastpeft_lora_config(**second))
    stock.add_adapter("other", LoraConfig(**second))
    _randomize(fast, "other")
    _copy_lora(fast, stock)
    fast.eval()
    stock.eval()
    x = torch.randn(4, IN)
    with torch.no_grad():
        fast.base_model.set_adapter(["default", "other"])
        stock.base_model.set_adapter(["default", "other"])
        assert rel_err(fast(x), stock(x)) < 1e-6
        names = ["default", "other", "__base__", "other"]
        assert rel_err(fast(x, adapter_names=names), stock(x, adapter_names=names)) < 1e-6
    assert fused_calls == []


def test_dora_falls_back_to_peft(fused_calls):
    fast, stock = _pair(lambda: _Wrap(_layer_base("linear")), r=3, lora_alpha=5, target_modules=["proj"],
                        use_dora=True)
    x = torch.randn(4, IN)
    with torch.no_grad():
        assert rel_err(fast(x), stock(x)) < 1e-6
    assert fused_calls == []


def test_gpt2_conv1d_layout_is_set_per_layer_and_merges(fused_calls):
    # The config says nothing about fan_in_fan_out; each Conv1D layer still gets it.
    fast = get_peft_model(tiny_gpt2(), fastpeft_lora_config(r=3, lora_alpha=5, target_modules=GPT2_TARGETS,
                                                             init_lora_weights=False))
    _randomize(fast)
    layers = [fast.base_model.model.get_submodule(n) for n in fast.base_model.targeted_module_names]
    assert all(type(m) is FastLoraLinear and m.fan_in_fan_out for m in layers)
    ids = token_ids()
    with torch.no_grad():
        y = fast(input_ids=ids).logits
        assert len(fused_calls) == len(layers)
        merged = fast.merge_and_unload()
        assert rel_err(merged(input_ids=ids).logits, y) < 1e-5


class _CustomLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_target_key_matches_only_plain_layers():
    assert isinstance(nn.Linear(2, 3), FusedLoraTarget)
    assert isinstance(Conv1D(3, 2), FusedLoraTarget)
    assert not isinstance(_CustomLinear(2, 3), FusedLoraTarget)
    assert not isinstance(nn.Conv1d(2, 3, 1), FusedLoraTarget)
    assert not isinstance("linear", FusedLoraTarget)
    with pytest.raises(TypeError, match="type key"):
        FusedLoraTarget()

    model = nn.ModuleDict({"plain": nn.Linear(4, 4), "custom": _CustomLinear(4, 4)})
    peft_model = get_peft_model(model, fastpeft_lora_config(r=2, target_modules=["plain", "custom"]))
    assert type(peft_model.base_model.model["plain"]) is FastLoraLinear
    assert type(peft_model.base_model.model["custom"]) is PeftLoraLinear


def test_save_with_fastpeft_load_with_stock_peft_and_back(tmp_path, fused_calls):
    fast, stock = _pair(tiny_llama, r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"])
    fast.save_pretrained(tmp_path / "fast")
    config_text = (tmp_path / "fast" / "adapter_config.json").read_text()
    assert "FastLoraLinear" not in config_text and json.loads(config_text)["peft_type"] == "LORA"

    ids = token_ids()
    with torch.no_grad():
        y_fast = fast(input_ids=ids).logits
        reloaded_stock = PeftModel.from_pretrained(tiny_llama(), tmp_path / "fast")
        assert all(type(m) is not FastLoraLinear for m in reloaded_stock.modules())
        assert rel_err(reloaded_stock(input_ids=ids).logits, y_fast) < 1e-5

        stock.save_pretrained(tmp_path / "stock")
        reloaded_fast = load_fastpeft_adapter(tiny_llama(), tmp_path / "stock")
        names = reloaded_fast.base_model.targeted_module_names
        assert len(names) == 4
        assert all(type(reloaded_fast.base_model.model.get_submodule(n)) is FastLoraLinear for n in names)
        calls_before = len(fused_calls)
        assert rel_err(reloaded_fast(input_ids=ids).logits, stock(input_ids=ids).logits) < 1e-5
        assert len(fused_calls) == calls_before + 4
    assert not any(p.requires_grad for p in reloaded_fast.parameters())  # from_pretrained's default


def test_load_fastpeft_adapter_is_trainable(tmp_path):
    fast, _ = _pair(tiny_llama, r=2, lora_alpha=2, target_modules=["q_proj"])
    fast.save_pretrained(tmp_path)
    model = load_fastpeft_adapter(tiny_llama(), tmp_path, is_trainable=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="config must be a peft.LoraConfig"):
        register_fastpeft({"r": 8})
    with pytest.raises(TypeError, match="config is read from model_id"):
        load_fastpeft_adapter(tiny_llama(), tmp_path, config=LoraConfig())
