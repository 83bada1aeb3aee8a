"""``fastpeft.accelerate`` / ``restore`` on live HF PEFT models, PEFT as the oracle.

The accelerated model runs fastpeft's fused ops (counted), gives PEFT's
outputs and gradients (budget relative to PEFT's own float32 error against a
float64 PEFT twin), keeps PEFT's API (save_pretrained writes the same tensors,
set_adapter, disable_adapter, merge_and_unload), and ``restore`` gives PEFT's
own layer classes back. What it cannot serve is refused, untouched, by name.
"""
import copy

import pytest
import torch
from models import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama, token_ids
from numerics import assert_close_to_ref
from optional_deps import requires
from peft_fused_calls import count_fused_calls
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from safetensors.torch import load_file
from torch import nn

import fastpeft
from fastpeft.integrations.peft import FastLoraLinear

MODEL_TINY = 2e-6  # a few fp32 ulp of whole-model outputs (tests/integrations/test_peft_backend.py)
FAMILIES = {"llama": (tiny_llama, LLAMA_TARGETS), "gpt2": (tiny_gpt2, GPT2_TARGETS)}


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


@pytest.fixture
def fused_calls(monkeypatch):
    return count_fused_calls(monkeypatch, "lora_linear", "dora_linear")


def _peft_model(build, targets, dtype=torch.float32, **config):
    model = get_peft_model(build(dtype=dtype), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          init_lora_weights=False, **config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_accelerate_gives_peft_outputs_and_keeps_its_api(tmp_path, family, use_dora, fused_calls):
    build, targets = FAMILIES[family]
    model = _peft_model(build, targets, use_dora=use_dora)
    reference = _peft_model(build, targets, torch.float64, use_dora=use_dora)
    ids = token_ids()
    expected_loss, expected_grads = _loss_and_grads(model, ids)
    ref_loss, ref_grads = _loss_and_grads(reference, ids)
    model.save_pretrained(tmp_path / "before")
    classes = {n: type(m) for n, m in model.named_modules()}

    assert fastpeft.accelerate(model) is model
    swapped = [n for n, m in model.named_modules() if isinstance(m, FastLoraLinear)]
    assert swapped and all(classes[n] is PeftLoraLinear for n in swapped)
    loss, grads = _loss_and_grads(model, ids)
    assert fused_calls, "the fused ops never ran"
    assert_close_to_ref(loss, ref_loss, expected_loss, tiny=MODEL_TINY, what="loss")
    for name, grad in grads.items():
        assert_close_to_ref(grad, ref_grads[name], expected_grads[name], tiny=MODEL_TINY, what=name)

    model.save_pretrained(tmp_path / "after")
    before = load_file(tmp_path / "before" / "adapter_model.safetensors")
    after = load_file(tmp_path / "after" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, build()(ids).logits)
        fastpeft.restore(model)
        assert {n: type(m) for n, m in model.named_modules()} == classes
        merged_peft = copy.deepcopy(model).merge_and_unload()(ids).logits
        fastpeft.accelerate(model)
        merged = model.merge_and_unload()(ids).logits
    assert torch.equal(merged, merged_peft)


def test_set_adapter_switches_the_fused_adapter(fused_calls):
    model = _peft_model(tiny_llama, ["q_proj", "v_proj"])
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = token_ids()
    fastpeft.accelerate(model)
    with torch.no_grad():
        default = model(ids).logits
        model.set_adapter("other")
        other = model(ids).logits
        fastpeft.restore(model)
        assert torch.equal(model(ids).logits, other)
        model.set_adapter("default")
        assert torch.equal(model(ids).logits, default)
    assert not torch.equal(default, other) and fused_calls


def test_unservable_layers_are_refused_by_name_untouched():
    model = _peft_model(tiny_llama, ["q_proj", "embed_tokens"])
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"embed_tokens: .*lora\.layer\.Embedding"):
        fastpeft.accelerate(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    prompt = get_peft_model(tiny_llama(), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        fastpeft.accelerate(prompt)


@requires("bitsandbytes", "a bitsandbytes Linear4bit is the layer refused")
def test_lora_on_a_bitsandbytes_linear4bit_is_refused_by_name():
    import bitsandbytes as bnb

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    model.append(q.to("cpu"))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["0", "2"]))
    classes = {n: type(m) for n, m in peft_model.named_modules()}
    with pytest.raises(ValueError, match=r"model\.2: .*Linear4bit is not a plain nn\.Linear"):
        fastpeft.accelerate(peft_model)
    assert {n: type(m) for n, m in peft_model.named_modules()} == classes
