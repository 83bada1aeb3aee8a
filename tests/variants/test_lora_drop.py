"""LoRA-drop (fastpeft.lora_drop): the importance and selection against a direct computation with the dense ΔW,
the plan keeps the layers that matter, shared layers hold one parameter set whose gradient is the sum of theirs,
the checkpoint is PEFT LoRA both ways, and errors before anything changes."""
import copy

import pytest
import torch
from peft import PeftModel

import fastpeft
from fastpeft.injection.lora import lora_modules
from models import LLAMA_TARGETS, tiny_llama, token_ids

pytestmark = pytest.mark.usefixtures("cpu_backend")


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def lora_model(seed=3):
    model = fastpeft.apply_lora(tiny_llama(), LLAMA_TARGETS, r=4, lora_alpha=8, init_lora_weights=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # importances spread over orders of magnitude
        for i, (_, layer) in enumerate(lora_modules(model)):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3 ** (i % 5))
    return model


def sample():
    return [token_ids(batch=2, seq=7, seed=s) for s in (1, 2)]


def direct_importance(model, batches):
    """Mean over tokens of ‖x ΔWᵀ‖² with the dense ΔW = s·BA in float64, from each layer's captured inputs."""
    inputs = {name: [] for name, _ in lora_modules(model)}
    handles = [layer.register_forward_hook(lambda mod, args, out, name=name: inputs[name].append(args[0]))
               for name, layer in lora_modules(model)]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    raw = {}
    for name, layer in lora_modules(model):
        delta = layer.delta_weight_out_in(torch.float64)
        x = torch.cat([t.reshape(-1, layer.in_features) for t in inputs[name]]).double()
        raw[name] = (x @ delta.t()).square().sum(1).mean().item()
    total = sum(raw.values())
    return {name: v / total for name, v in raw.items()}


def test_importance_and_selection_match_a_direct_computation():
    model = lora_model().eval()
    want = direct_importance(model, sample())
    order = sorted(want, key=want.get, reverse=True)
    cumulative = torch.tensor([want[n] for n in order], dtype=torch.float64).cumsum(0)
    n_kept = int((cumulative < 0.9).sum()) + 1  # the first prefix reaching 0.9
    plan = fastpeft.lora_drop(model, sample(), threshold=0.9)
    assert plan.importance.keys() == want.keys()
    for name in want:
        assert plan.importance[name] == pytest.approx(want[name], rel=1e-5), name
    assert plan.kept == order[:n_kept]
    assert 0 < n_kept < len(order)
    dropped = set(order[n_kept:])
    assert {n for owner, sharers in plan.shared.items() for n in [owner, *sharers]} == dropped


def test_plan_keeps_the_layers_that_matter():
    model = fastpeft.apply_lora(tiny_llama(), LLAMA_TARGETS, r=4, init_lora_weights=False)
    matter = {"model.layers.1.mlp.gate_proj", "model.layers.0.self_attn.v_proj"}
    with torch.no_grad():
        for name, layer in lora_modules(model):
            layer.lora_B.weight.mul_(1.0 if name in matter else 1e-2)
    plan = fastpeft.lora_drop(model, sample(), threshold=0.99)
    assert set(plan.kept) == matter


def test_shared_layers_hold_one_pair_whose_gradient_is_the_sum():
    model = lora_model()
    n_before = sum(p.numel() for p in fastpeft.lora_parameters(model))
    unshared = copy.deepcopy(model)
    plan = fastpeft.lora_drop(model, sample(), threshold=0.8)
    layers = dict(lora_modules(model))
    owner, sharers = next((o, s) for o, s in plan.shared.items() if s)
    for name in sharers:
        assert layers[name].lora_A is layers[owner].lora_A and layers[name].lora_B is layers[owner].lora_B
    params = fastpeft.lora_parameters(model)
    assert len(params) == len({id(p) for p in params})
    assert sum(p.numel() for p in params) < n_before
    # the same model with every dropped layer holding its own copy of the shared values
    copies = dict(lora_modules(unshared))
    for o, group in plan.shared.items():
        for name in group:
            copies[name].lora_A.load_state_dict(layers[o].lora_A.state_dict())
            copies[name].lora_B.load_state_dict(layers[o].lora_B.state_dict())
    ids = token_ids(batch=2, seq=9)
    for m in (model, unshared):
        m.train()
        m(ids, labels=ids).loss.backward()
    for weight in ("lora_A", "lora_B"):
        want = sum(getattr(copies[n], weight).weight.grad for n in [owner, *sharers])
        torch.testing.assert_close(getattr(layers[owner], weight).weight.grad, want, rtol=1e-5, atol=1e-7)


def test_checkpoint_is_peft_lora_both_ways(tmp_path):
    model = lora_model()
    fastpeft.lora_drop(model, sample(), threshold=0.8)
    fastpeft.save_lora(model, tmp_path / "ours")
    ids = token_ids()
    with torch.no_grad():
        want = model.eval()(ids).logits
        theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
        torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-5, atol=1e-5)
        loaded = fastpeft.load_lora(tiny_llama(), tmp_path / "ours").eval()
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(batches=[]), ValueError, "batches"),
    (dict(threshold=0.0), ValueError, "threshold"),
    (dict(threshold=1.5), ValueError, "threshold"),
    (dict(threshold="0.9"), TypeError, "threshold"),
])
def test_bad_input_raises_before_any_change(kwargs, error, match):
    model = lora_model()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(error, match=match):
        fastpeft.lora_drop(model, **({"batches": sample()} | kwargs))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert len({id(layer.lora_A) for _, layer in lora_modules(model)}) == len(lora_modules(model))


def test_model_without_lora_or_with_zero_updates_is_refused():
    with pytest.raises(ValueError, match="LoRA layers"):
        fastpeft.lora_drop(tiny_llama(), sample())
    with pytest.raises(ValueError, match="B non-zero"):
        fastpeft.lora_drop(fastpeft.apply_lora(tiny_llama(), LLAMA_TARGETS, r=4), sample())
