"""AdaLoRA (fastpeft.apply_adalora + update_and_allocate) against HF PEFT's AdaLoRA on twin tiny Llamas: the
layer output and gradients, the loss with the orthogonality regulariser, SGD steps in lockstep through the
budget schedule (the E masks / rank_pattern after each allocator step), and the errors raised before changes."""
import os

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

import fastpeft
from fastpeft.injection.adalora import adalora_layers, apply_adalora, update_and_allocate
from models import tiny_llama, token_ids

pytestmark = pytest.mark.usefixtures("cpu_backend")
TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=7, beta1=0.85, beta2=0.85,
                orth_reg_weight=0.5)


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def twins(seed=5):
    ours = apply_adalora(tiny_llama(), TARGETS, lora_alpha=8, **SCHEDULE)
    # a task type: a plain PeftModel's forward skips AdaLoraModel.forward, where PEFT adds the regulariser
    config = AdaLoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, lora_alpha=8, **SCHEDULE)
    theirs = get_peft_model(tiny_llama(), config)
    g = torch.Generator().manual_seed(seed)
    layers = dict(adalora_layers(ours))
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            for key, ours_p in (("lora_A", layer.lora_A.weight), ("lora_B", layer.lora_B.weight),
                                ("lora_E", layer.lora_E)):
                ours_p.copy_(torch.randn(ours_p.shape, generator=g) * 0.3)
                getattr(peft_layer, key)["default"].copy_(ours_p)
    return ours, theirs


def peft_pattern(theirs):
    pattern = theirs.peft_config["default"].rank_pattern
    return None if pattern is None else {k.replace(".lora_E.default", ""): v
                                         for k, v in pattern.items()}


def test_training_in_lockstep_with_peft_through_the_budget_schedule():
    ours, theirs = twins()
    ids = token_ids(batch=2, seq=9)
    ours.train(), theirs.train()
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    layers = dict(adalora_layers(ours))
    masked_somewhere = False
    for step in range(SCHEDULE["total_step"] + 1):
        loss_ours, loss_theirs = ours(ids, labels=ids).loss, theirs(ids, labels=ids).loss
        assert abs(loss_ours.item() - loss_theirs.item()) <= 1e-5 * abs(loss_theirs.item()), step
        for model, opt, loss in ((ours, opt_ours, loss_ours), (theirs, opt_theirs, loss_theirs)):
            loss.backward()
            opt.step()
        pattern = update_and_allocate(ours, step)
        theirs.base_model.update_and_allocate(step)
        assert pattern == peft_pattern(theirs), step
        for name, layer in layers.items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            for key, p in (("lora_A", layer.lora_A.weight), ("lora_B", layer.lora_B.weight), ("lora_E", layer.lora_E)):
                torch.testing.assert_close(p, getattr(peft_layer, key)["default"], rtol=1e-4, atol=1e-5)
            masked_somewhere |= bool((layer.lora_E == 0).any())
        opt_ours.zero_grad(), opt_theirs.zero_grad()
    assert masked_somewhere
    assert sum(sum(v) for v in pattern.values()) == SCHEDULE["target_r"] * len(layers)


@pytest.mark.parametrize("bad, match", [
    (dict(total_step=None), "total_step"), (dict(total_step=0), "total_step"),
    (dict(tinit=5, tfinal=2), "tinit"), (dict(target_r=5), "target_r"), (dict(beta1=1.0), "beta1"),
    (dict(orth_reg_weight=-1.0), "orth_reg_weight"), (dict(deltaT=0), "deltaT"),
])
def test_bad_schedule_raises_before_any_change(bad, match):
    model = tiny_llama()
    with pytest.raises((ValueError, TypeError), match=match):
        apply_adalora(model, TARGETS, **(SCHEDULE | bad))
    assert not fastpeft.injection.lora_modules(model)


def test_update_and_allocate_needs_an_adalora_model():
    with pytest.raises(ValueError, match="apply_adalora"):
        update_and_allocate(fastpeft.apply_lora(tiny_llama(), TARGETS, r=2), 0)


def test_merge_keeps_the_output_and_save_lora_refuses_before_writing(tmp_path):
    ours, _ = twins()
    ids = token_ids()
    with torch.no_grad():
        want = ours.eval()(ids).logits
        with pytest.raises(ValueError, match="ADALORA"):
            fastpeft.save_lora(ours, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        fastpeft.merge_lora(ours)
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
def test_layer_output_and_gradients_match_peft_svdlinear(backend):
    assert os.environ["FASTPEFT_BACKEND"] == backend
    ours, theirs = twins()
    name, layer = adalora_layers(ours)[0]
    peft_layer = theirs.base_model.model.get_submodule(name)
    x = torch.randn(2, 5, layer.in_features)
    y, y_ref = layer(x), peft_layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [layer.lora_A.weight, layer.lora_B.weight, layer.lora_E], dy)
    grads_ref = torch.autograd.grad(y_ref, [getattr(peft_layer, k)["default"] for k in ("lora_A", "lora_B", "lora_E")],
                                    dy)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
