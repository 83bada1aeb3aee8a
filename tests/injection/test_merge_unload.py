"""``merge_lora(model, unload=True)`` / ``unload_lora``: plain base layers come back, so the model saves and
loads with transformers as its original architecture and serves the merged logits."""
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.nn import LoRALinear, NF4Linear, QLoRALinear
from models import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama, token_ids

QLORA_TARGETS = [t for t in LLAMA_TARGETS if t != "down_proj"]  # down_proj's in_features=96: not a blocksize


def _randomize_lora(model):
    torch.manual_seed(3)
    for _, layer in fastpeft.injection.lora_modules(model):
        layer.reset_lora_parameters(False)  # a non-zero update


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merge_and_unload_round_trips_through_save_pretrained(method, tmp_path):
    from transformers import LlamaForCausalLM

    ids = token_ids()
    model = tiny_llama(seed=2)
    if method == "lora":
        fastpeft.apply_lora(model, LLAMA_TARGETS, r=4, lora_alpha=8)
    else:
        fastpeft.apply_qlora(model, QLORA_TARGETS, r=4, lora_alpha=8)
    _randomize_lora(model)
    before = _logits(model, ids)
    assert fastpeft.merge_lora(model, unload=True) is model
    assert not fastpeft.injection.lora_modules(model)
    assert not any(isinstance(m, (LoRALinear, QLoRALinear, NF4Linear)) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    merged = _logits(model, ids)
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)

    model.save_pretrained(tmp_path)
    keys = set(model.state_dict())
    assert not any("base_layer" in k or "lora_" in k for k in keys)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded, ids), merged)


def test_merge_and_unload_keeps_conv1d_layout():
    ids = token_ids()
    model = fastpeft.apply_lora(tiny_gpt2(seed=4), GPT2_TARGETS, r=4)
    _randomize_lora(model)
    before = _logits(model, ids)
    conv1d = type(model.transformer.h[0].attn.c_attn.base_layer)
    fastpeft.merge_lora(model, unload=True)
    assert type(model.transformer.h[0].attn.c_attn) is conv1d
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("merged_first", [False, True])
def test_unload_lora_gives_back_the_original_model(merged_first):
    ids = token_ids()
    reference = tiny_llama(seed=2)
    expected = _logits(reference, ids)
    model = fastpeft.apply_lora(tiny_llama(seed=2), LLAMA_TARGETS, r=4)
    _randomize_lora(model)
    if merged_first:
        fastpeft.merge_lora(model)
    assert fastpeft.unload_lora(model) is model
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_unload_lora_on_qlora_keeps_the_nf4_base():
    model = fastpeft.apply_qlora(tiny_llama(seed=2), QLORA_TARGETS, r=4)
    fastpeft.unload_lora(model)
    assert type(model.model.layers[0].self_attn.q_proj) is NF4Linear


def test_unload_argument_and_root_layer_errors():
    model = fastpeft.apply_lora(tiny_llama(seed=2), ["q_proj"], r=4)
    with pytest.raises(TypeError, match="unload must be a bool"):
        fastpeft.merge_lora(model, unload="yes")
    layer = LoRALinear.from_linear(nn.Linear(8, 4), r=2)
    with pytest.raises(ValueError, match="model itself is a LoRA layer"):
        fastpeft.merge_lora(layer, unload=True)
    assert not layer.merged  # nothing changed


def test_modules_to_save_copies_are_merged_or_dropped(tmp_path):
    from transformers import LlamaForCausalLM

    ids = token_ids()
    original = _logits(tiny_llama(seed=2), ids)
    model = fastpeft.apply_lora(tiny_llama(seed=2), ["q_proj"], r=4, modules_to_save=["lm_head"])
    _randomize_lora(model)
    with torch.no_grad():
        model.lm_head.trainable_copy.weight.mul_(1.5)
    trained = _logits(model, ids)
    fastpeft.merge_lora(model, unload=True)
    assert type(model.lm_head) is nn.Linear
    torch.testing.assert_close(_logits(model, ids), trained, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(LlamaForCausalLM.from_pretrained(tmp_path).eval(), ids), _logits(model, ids))

    model = fastpeft.apply_lora(tiny_llama(seed=2), ["q_proj"], r=4, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.trainable_copy.weight.mul_(1.5)
    fastpeft.unload_lora(model)
    assert type(model.lm_head) is nn.Linear
    torch.testing.assert_close(_logits(model, ids), original, rtol=1e-5, atol=1e-5)
