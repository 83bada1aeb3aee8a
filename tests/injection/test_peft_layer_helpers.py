"""Every model-level helper works on every layer kind of the LoRA family (LoRALinear and QLoRALinear).

``lora_parameters``, ``merge_lora``, ``unmerge_lora``, ``save_lora`` and
``load_lora`` find their layers through the PEFT-layer protocol
(``fastpeft.nn.base``), so a model converted by ``apply_qlora`` is served by
them exactly like one converted by ``apply_lora``.
"""
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.nn.base import PEFT_LAYER_KINDS, peft_layers

APPLY = {"LoRALinear": fastpeft.apply_lora, "QLoRALinear": fastpeft.apply_qlora}


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def tiny_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))


def converted(kind: str):
    model = tiny_model()
    APPLY[kind](model, target_modules=["0", "2"], r=4, lora_alpha=8, init_lora_weights=False)
    return model


def test_every_lora_kind_layer_class_is_covered():
    assert sorted(cls.__name__ for cls in PEFT_LAYER_KINDS["lora"]) == sorted(APPLY)


@pytest.mark.parametrize("kind", sorted(APPLY))
def test_lora_parameters_are_the_trainable_ones(kind):
    model = converted(kind)
    layers = peft_layers(model, "lora")
    assert [type(layer).__name__ for _, layer in layers] == [kind, kind]
    params = fastpeft.lora_parameters(model)
    assert len(params) == 4 and all(p.requires_grad for p in params)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    torch.optim.AdamW(fastpeft.lora_parameters(model), lr=1e-3)  # what the README does


@pytest.mark.parametrize("kind", sorted(APPLY))
def test_merge_then_unmerge(kind):
    model = converted(kind).eval()
    x = torch.randn(5, 64)
    before = model(x)
    fastpeft.merge_lora(model)
    assert all(layer.merged for _, layer in peft_layers(model, "lora"))
    merged = model(x)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)  # one fp32 rounding of W + s·BA
    fastpeft.unmerge_lora(model)
    assert not any(layer.merged for _, layer in peft_layers(model, "lora"))
    after = model(x)
    assert (after - before).abs().max() < 1e-5


@pytest.mark.parametrize("kind", sorted(APPLY))
def test_save_then_load_into_a_fresh_model(kind, tmp_path):
    model = converted(kind).eval()
    x = torch.randn(5, 64)
    expected = model(x)
    fastpeft.save_lora(model, tmp_path / "adapter")
    fresh = tiny_model()
    APPLY[kind](fresh, target_modules=["0", "2"], r=4, lora_alpha=8)
    fastpeft.load_lora(fresh, tmp_path / "adapter")
    assert torch.equal(fresh.eval()(x), expected)
