"""apply_lora / replace_modules against HF PEFT's get_peft_model on tiny models.

Both sides hold the same non-zero LoRA weights; outputs and the gradient of
every LoRA parameter are compared with a float64 PEFT model as reference and
the float32 PEFT model as the "plain torch" budget (docs/architecture.md, "Numerics and tests").
"""
import copy

import pytest
import torch
from models import BERT_TARGETS, GPT2_TARGETS, LLAMA_TARGETS, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from numerics import assert_close_to_ref, rel_err
from peft import LoraConfig, get_peft_model
from torch import nn

from fastpeft.injection import (apply_lora, find_target_modules, lora_parameters, matches_target, merge_lora,
                                replace_modules, unmerge_lora)
from fastpeft.nn import LoRALinear

MODELS = {
    "llama": (tiny_llama, LLAMA_TARGETS),
    "gpt2": (tiny_gpt2, GPT2_TARGETS),
    "bert": (tiny_bert, BERT_TARGETS),
}
# Whole-model fp32 outputs differ from the float64 reference by a few ulp for both
# sides; their ratio is noise, so model-level checks add a floor of ~16 fp32 ulp
# (a real bug, e.g. a wrong scaling, is off by 1e-2 or more).
MODEL_TINY = 2e-6


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def _output(model, ids):
    out = model(input_ids=ids)
    if hasattr(out, "logits"):
        return out.logits
    # BERT: the pooler is a LoRA target too, so its output joins the comparison.
    return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])


def _randomize_lora(model):
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * 0.2)


def _peft_key(name):
    """Our ``<module>.lora_A.weight`` -> PEFT's parameter name (adapter "default")."""
    module, which, _ = name.rsplit(".", 2)
    return f"base_model.model.{module}.{which}.default.weight"


def _peft_twin(ours, build, targets, r, alpha, use_rslora, fan_in_fan_out):
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=use_rslora,
                        fan_in_fan_out=fan_in_fan_out, init_lora_weights=False)
    twin = get_peft_model(build(), config)
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                params[_peft_key(name)].copy_(p)
    return twin


@pytest.mark.parametrize("model_name", list(MODELS))
def test_apply_lora_matches_get_peft_model(model_name):
    build, targets = MODELS[model_name]
    r, alpha, use_rslora = 4, 12, model_name == "bert"
    ours = apply_lora(build(), targets, r=r, lora_alpha=alpha, use_rslora=use_rslora)
    _randomize_lora(ours)
    peft32 = _peft_twin(ours, build, targets, r, alpha, use_rslora, fan_in_fan_out=model_name == "gpt2")
    peft64 = copy.deepcopy(peft32).double()

    ours_trainable = {_peft_key(n) for n, p in ours.named_parameters() if p.requires_grad}
    peft_trainable = {n for n, p in peft32.named_parameters() if p.requires_grad}
    assert ours_trainable == peft_trainable
    assert len(ours_trainable) == 2 * len(find_target_modules(ours, targets))

    ids = token_ids(batch=2, seq=9)
    outs = [_output(m, ids) for m in (ours, peft32, peft64)]
    assert_close_to_ref(outs[0], outs[2], outs[1], what=f"{model_name} output", tiny=MODEL_TINY)

    weights = torch.randn(outs[0].shape, dtype=torch.float64)
    for out in outs:
        (out * weights.to(out.dtype)).sum().backward()
    grads32 = dict(peft32.named_parameters())
    grads64 = dict(peft64.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            key = _peft_key(name)
            assert_close_to_ref(p.grad, grads64[key].grad, grads32[key].grad, what=f"grad of {name}", tiny=MODEL_TINY)
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("targets", [
    ["q_proj", "v_proj"],
    ["self_attn.q_proj"],
    ["model.layers.1.mlp.down_proj"],
    r".*\.layers\.0\.self_attn\.(q|v)_proj",
    r".*_proj",
])
def test_target_matching_agrees_with_peft(targets):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=targets))
    expected = set(peft_model.base_model.targeted_module_names)
    found = find_target_modules(tiny_llama(), targets)
    assert set(found) == expected and len(found) == len(expected)
    assert all(matches_target(name, targets) for name in found)


def test_apply_lora_freezes_everything_else():
    model = apply_lora(tiny_llama(), ["q_proj", "down_proj"], r=3)
    lora_ids = {id(p) for p in lora_parameters(model)}
    assert len(lora_ids) == 2 * 2 * 2  # 2 targets x 2 layers x (A, B)
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in lora_ids), name
    assert isinstance(model.model.layers[1].mlp.down_proj, LoRALinear)
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)


def test_training_step_changes_only_lora_parameters():
    model = apply_lora(tiny_gpt2(), GPT2_TARGETS, r=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD(lora_parameters(model), lr=0.1)
    ids = token_ids()
    model.train()
    for _ in range(2):  # B is zero at init, so A moves only from the second step on
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    moved = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(torch.count_nonzero(m.lora_B.weight) > 0 for m in moved)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_merge_and_unmerge_model(model_name):
    build, targets = MODELS[model_name]
    model = apply_lora(build(), targets, r=4, lora_alpha=8)
    _randomize_lora(model)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = token_ids()
    with torch.no_grad():
        y = _output(model, ids)
        merge_lora(model)
        assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
        y_merged = _output(model, ids)
        unmerge_lora(model)
        y_unmerged = _output(model, ids)
    assert rel_err(y_merged, y) < 1e-5
    assert rel_err(y_unmerged, y) < 1e-5
    for n, p in model.named_parameters():
        assert rel_err(p, weights_before[n]) < 1e-6, n


def test_unknown_target_names_every_missing_entry():
    with pytest.raises(ValueError, match=r"no module of the model matches \['qproj', 'nothing'\]"):
        apply_lora(tiny_llama(), ["q_proj", "qproj", "nothing"])


def test_partial_name_does_not_match():
    # Matching is on "." boundaries: "proj" is not a suffix entry of "q_proj".
    with pytest.raises(ValueError, match="'proj'"):
        apply_lora(tiny_llama(), ["proj"])


def test_regex_matching_nothing():
    with pytest.raises(ValueError, match="matches"):
        apply_lora(tiny_llama(), r"q_proj")  # a str must match the full name


def test_non_linear_target_raises_and_leaves_model_untouched():
    model = tiny_llama()
    with pytest.raises(TypeError, match="'model.layers.0.self_attn' is a LlamaAttention"):
        apply_lora(model, ["q_proj", "self_attn"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_applying_twice_raises():
    model = apply_lora(tiny_llama(), ["q_proj"])
    with pytest.raises(TypeError, match="already is a LoRALinear"):
        apply_lora(model, ["q_proj"])


@pytest.mark.parametrize("targets, exc, match", [
    ([], ValueError, "target_modules is empty"),
    (5, TypeError, "target_modules must be"),
    ({"q_proj": 1}, TypeError, "target_modules must be"),
    (["q_proj", 3], TypeError, "target_modules entries"),
    (["q_proj", ""], TypeError, "target_modules entries"),
    ("(unclosed", ValueError, "target_modules is not a valid regular expression"),
])
def test_bad_target_modules(targets, exc, match):
    with pytest.raises(exc, match=match):
        apply_lora(tiny_llama(), targets)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"r": 0}, ValueError, "r must be"),
    ({"lora_alpha": None}, TypeError, "lora_alpha"),
    ({"lora_dropout": 1.5}, ValueError, "lora_dropout"),
    ({"init_lora_weights": "olora"}, ValueError, "init_lora_weights"),
])
def test_bad_hyperparameters_raise_before_any_change(kwargs, exc, match):
    model = tiny_llama()
    with pytest.raises(exc, match=match):
        apply_lora(model, ["q_proj"], **kwargs)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_bad_model():
    with pytest.raises(TypeError, match="model must be"):
        apply_lora("not a model", ["q_proj"])


def test_replace_modules_generic():
    model = nn.ModuleDict({"head": nn.Linear(3, 4), "outer": nn.Sequential(nn.Linear(4, 4), nn.ReLU())})
    seen = []

    def make(name, module):
        seen.append((name, type(module).__name__))
        return nn.Identity()

    names = replace_modules(model, ["outer", "outer.0"], make)
    assert sorted(names) == ["outer", "outer.0"]
    # The nested target is replaced first; its parent then wraps the new child.
    assert seen == [("outer.0", "Linear"), ("outer", "Sequential")]
    assert isinstance(model["outer"], nn.Identity) and isinstance(model["head"], nn.Linear)


def test_suffix_match_is_on_dot_boundaries():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    # "1" is the name "1" and a suffix of "1.1", never of "1.0".
    assert find_target_modules(model, ["1"]) == ["1", "1.1"]


def test_replace_modules_bad_factory():
    with pytest.raises(TypeError, match="make_replacement must be callable"):
        replace_modules(nn.Sequential(nn.Linear(2, 2)), ["0"], None)
    with pytest.raises(TypeError, match="make_replacement returned int"):
        replace_modules(nn.Sequential(nn.Linear(2, 2)), ["0"], lambda name, module: 3)
