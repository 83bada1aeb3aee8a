"""apply_qlora on a tiny Llama (GQA): outputs equal the dense model whose targeted linear weights
are replaced by their dequantized values; only LoRA parameters train; errors leave the model untouched."""
import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from fastpeft.nn import QLoRALinear
from fastpeft.injection.qlora import apply_qlora, qlora_modules
from models import tiny_llama, token_ids
from numerics import assert_close_to_ref

# down_proj has in_features=96 (intermediate size), not a multiple of any NF4 blocksize.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]


def dense_with_dequantized_weights(qmodel, dtype=torch.float64):
    """A fresh tiny Llama (same seed) with each targeted weight = the NF4 dequantized one."""
    dense = tiny_llama().to(dtype)
    with torch.no_grad():
        for name, layer in qlora_modules(qmodel):
            target = dense.get_submodule(name)
            target.weight.copy_(layer.base_layer.dequantize(torch.float64))
    return dense


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
@pytest.mark.parametrize("double_quant", [False, True])
def test_outputs_match_dequantized_dense_model(backend, double_quant):
    model = apply_qlora(tiny_llama(), TARGETS, r=4, lora_alpha=8, double_quant=double_quant)
    assert len(qlora_modules(model)) == 2 * len(TARGETS)
    ids = token_ids(batch=2, seq=5)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        ref = dense_with_dequantized_weights(model)(input_ids=ids).logits
        base = dense_with_dequantized_weights(model, torch.float32)(input_ids=ids).logits
    assert_close_to_ref(got, ref, base)


def test_only_lora_parameters_train_and_get_grads():
    model = apply_qlora(tiny_llama(), TARGETS, r=2, lora_alpha=4, lora_dropout=0.1, init_lora_weights=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.{ab}.weight" for n, _ in qlora_modules(model) for ab in ("lora_A", "lora_B")}
    assert trainable == expected
    model.train()
    loss = model(input_ids=token_ids(batch=2, seq=6), labels=token_ids(batch=2, seq=6)).loss
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in expected), n
    assert all(torch.count_nonzero(p.grad) > 0 for n, p in model.named_parameters() if n in expected)


def test_lora_update_is_applied_after_training_step():
    model = apply_qlora(tiny_llama(), ["q_proj", "v_proj"], r=2, lora_alpha=2)
    ids = token_ids(batch=1, seq=4)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for _, m in qlora_modules(model):
            m.lora_B.weight.normal_()
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)


def test_wraps_bnb_linear4bit_without_requantizing():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    model.append(q.to("cpu"))
    packed = q.weight.data.clone()
    apply_qlora(model, ["2"], r=2)
    assert isinstance(model[2], QLoRALinear)
    assert torch.equal(model[2].base_layer.weight.view(-1), packed.view(torch.uint8).view(-1))
    assert not model[0].weight.requires_grad


def test_errors_leave_model_untouched():
    model = tiny_llama()
    with pytest.raises(ValueError, match="down_proj.*blocksize"):
        apply_qlora(model, TARGETS + ["down_proj"])
    with pytest.raises(ValueError, match="no module"):
        apply_qlora(model, ["nope_proj"])
    with pytest.raises(TypeError, match="LlamaRMSNorm"):
        apply_qlora(model, ["input_layernorm"])
    with pytest.raises(ValueError, match="blocksize"):
        apply_qlora(model, TARGETS, blocksize=100)
    with pytest.raises(ValueError, match="r must be"):
        apply_qlora(model, TARGETS, r=0)
    assert not qlora_modules(model)
    assert all(p.requires_grad for p in model.parameters())
    apply_qlora(model, ["q_proj"])
    with pytest.raises(TypeError, match="already"):
        apply_qlora(model, ["q_proj"])
