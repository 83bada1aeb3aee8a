"""DoRA on whole models against HF PEFT: checkpoints both ways, a 3-step training lockstep, merge/unload,
the PEFT backend, and the errors raised before anything changes."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import fastpeft
from fastpeft.nn.lora import LoRALinear
from models import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama, token_ids

pytestmark = pytest.mark.usefixtures("cpu_backend")
CASES = {"llama": (tiny_llama, LLAMA_TARGETS), "gpt2": (tiny_gpt2, GPT2_TARGETS)}


@pytest.fixture
def cpu_backend(monkeypatch):
    """Whole models on the CPU path (both backends are checked against PEFT layer by layer)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def randomise(model: nn.Module, seed: int = 3) -> None:
    """Non-zero B and magnitudes away from the row norms, so every DoRA term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_loads_what_we_save_and_we_load_what_peft_saves(tmp_path, case):
    build, targets = CASES[case]
    ids = token_ids()
    ours = fastpeft.apply_lora(build(), targets, r=4, lora_alpha=8, use_dora=True)
    randomise(ours)
    fastpeft.save_lora(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    assert theirs.peft_config["default"].use_dora
    torch.testing.assert_close(logits(theirs, ids), logits(ours.eval(), ids), rtol=1e-5, atol=1e-5)

    theirs.save_pretrained(tmp_path / "theirs")
    loaded = fastpeft.load_lora(build(), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(loaded, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)
    for name, tensor in load_file(tmp_path / "theirs" / "adapter_model.safetensors").items():
        assert torch.equal(loaded.get_parameter(name.removeprefix("base_model.model.")), tensor), name


def test_three_training_steps_in_lockstep_with_peft():
    ids = token_ids(batch=2, seq=9)
    ours = fastpeft.apply_lora(tiny_llama(), LLAMA_TARGETS, r=4, lora_alpha=8, use_dora=True)
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                     use_dora=True))
    randomise(ours)
    peft_params = dict(theirs.base_model.model.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                key = name.replace(".weight", ".default.weight") if "lora_" in name and "magnitude" not in name \
                    else name.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
                peft_params[key].copy_(p)
    ours.train()
    theirs.train()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss_ours = ours(ids, labels=ids).loss
        loss_theirs = theirs(ids, labels=ids).loss
        assert abs(loss_ours.item() - loss_theirs.item()) <= 1e-5 * abs(loss_theirs.item()), step
        for opt, loss in ((opt_ours, loss_ours), (opt_theirs, loss_theirs)):
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_unload_match_the_unmerged_model(case):
    build, targets = CASES[case]
    ids = token_ids()
    model = fastpeft.apply_lora(build(), targets, r=4, use_dora=True)
    randomise(model)
    expected = logits(model, ids)
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    fastpeft.merge_lora(model)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    fastpeft.unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-6, atol=1e-6)
    merged = fastpeft.merge_lora(copy.deepcopy(model), unload=True)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)


def test_merged_weight_equals_peft_merge():
    ours = fastpeft.apply_lora(tiny_llama(), ["q_proj"], r=4, use_dora=True)
    randomise(ours)
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with torch.no_grad():
        for name, p in theirs.base_model.model.named_parameters():
            if "lora_" in name:
                src = name.replace(".default.weight", ".weight").replace("lora_magnitude_vector.weight",
                                                                       "lora_magnitude_vector")
                p.copy_(ours.get_parameter(src))
    fastpeft.merge_lora(ours)
    merged_theirs = theirs.merge_and_unload()
    for name, module in ours.named_modules():
        if isinstance(module, LoRALinear):
            torch.testing.assert_close(module.base_layer.weight, merged_theirs.get_submodule(name).weight,
                                       rtol=1e-6, atol=1e-6)


def test_use_dora_on_an_unsupported_layer_raises_before_any_change():
    model = nn.Sequential(nn.Linear(8, 8), nn.Embedding(10, 8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="use_dora"):
        fastpeft.apply_lora(model, ["0", "1"], use_dora=True)
    assert isinstance(model[0], nn.Linear) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="use_dora"):
        fastpeft.apply_lora(nn.Sequential(nn.Linear(8, 8)), ["0"], use_dora=1)


def test_magnitude_of_the_wrong_shape_is_rejected_before_any_change(tmp_path):
    model = fastpeft.apply_lora(tiny_llama(), ["q_proj"], r=4, use_dora=True)
    fastpeft.save_lora(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, path)
    plain = tiny_llama()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        fastpeft.load_lora(plain, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    existing = fastpeft.apply_lora(tiny_llama(), ["q_proj"], r=4, use_dora=True)
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        fastpeft.load_lora(existing, tmp_path)
    plain_lora = fastpeft.apply_lora(tiny_llama(), ["q_proj"], r=4)
    with pytest.raises(ValueError, match="dora"):
        fastpeft.load_lora(plain_lora, tmp_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_backend_runs_fastpeft_dora_with_peft_results(case, monkeypatch):
    from fastpeft.integrations.peft import backend

    build, targets = CASES[case]
    ids = token_ids()
    config = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    fused = get_peft_model(build(), backend.fastpeft_lora_config(**config))
    plain = get_peft_model(build(), LoraConfig(**config))
    layers = [m for m in fused.modules() if isinstance(m, backend.FastLoraLinear)]
    assert layers and all("default" in m.lora_variant for m in layers)
    randomise(fused)
    plain.load_state_dict(fused.state_dict())
    calls = []
    monkeypatch.setattr(backend, "dora_linear", lambda *a, **k: calls.append(1) or fastpeft.ops.dora_linear(*a, **k))
    loss_fused = fused(ids, labels=ids).loss
    loss_plain = plain(ids, labels=ids).loss
    assert len(calls) == len(layers)
    torch.testing.assert_close(loss_fused, loss_plain, rtol=1e-5, atol=1e-6)
    loss_fused.backward()
    loss_plain.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for n, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
