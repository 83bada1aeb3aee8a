"""PEFT's targeting conventions in apply_lora / apply_qlora / load_lora (all-linear, exclude_modules,
layers_to_transform / layers_pattern, modules_to_save, full-match regexes), checked against PEFT itself;
and validation before conversion (no half-converted model, no targets inside fastpeft's own layers)."""
import bitsandbytes as bnb  # a test dependency: missing means fail, not skip
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import fastpeft
from fastpeft.nn.modules_to_save import ModulesToSave
from fastpeft.injection.targets import find_target_modules, replace_modules
from fastpeft.nn import LoRALinear, QLoRALinear
from models import LLAMA_TARGETS, tiny_gpt2, tiny_llama, token_ids

PEFT_PREFIX = "base_model.model."


def _peft_targets(model, **config):
    peft_model = get_peft_model(model, LoraConfig(r=2, **config))
    return sorted(n[len(PEFT_PREFIX):] for n, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict))


SELECTIONS = {
    "all-linear": dict(target_modules="all-linear"),
    "ALL-LINEAR": dict(target_modules="ALL-LINEAR"),
    "all-linear minus mlp": dict(target_modules="all-linear", exclude_modules=["gate_proj", "up_proj", "down_proj"]),
    "regex": dict(target_modules=r".*\.(q|v)_proj"),
    "exclude regex": dict(target_modules=LLAMA_TARGETS, exclude_modules=r".*layers\.0\..*"),
    "layer 1": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1),
    "layers [0] with pattern": dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[0],
                                    layers_pattern="layers"),
    "pattern list": dict(target_modules=["k_proj"], layers_to_transform=[1], layers_pattern=["blocks", "layers"]),
    "modules_to_save excluded": dict(target_modules="all-linear", modules_to_save=["o_proj"]),
}


@pytest.mark.parametrize("selection", list(SELECTIONS.values()), ids=list(SELECTIONS))
def test_selection_equals_peft(selection):
    expected = _peft_targets(tiny_llama(), **selection)
    ours = fastpeft.apply_lora(tiny_llama(), **selection, r=2)
    assert sorted(n for n, _ in fastpeft.injection.lora_modules(ours)) == expected
    assert "lm_head" not in expected


def test_all_linear_on_gpt2_takes_conv1d_and_leaves_the_head():
    expected = _peft_targets(tiny_gpt2(), target_modules="all-linear")
    names = find_target_modules(tiny_gpt2(), "all-linear")
    assert sorted(names) == expected and all(not n.endswith("lm_head") for n in names)


def test_a_string_that_matches_nothing_says_it_is_a_full_match_regex():
    with pytest.raises(ValueError, match=r"full module name \(re.fullmatch, as in PEFT\).*\['q_proj'\]"):
        fastpeft.apply_lora(tiny_llama(), "q_proj")
    with pytest.raises(ValueError, match="no module of the model matches \\['nope'\\]"):
        fastpeft.apply_lora(tiny_llama(), ["q_proj", "nope"])


def test_help_documents_string_targets_as_full_match_regexes():
    for fn in (fastpeft.apply_lora, fastpeft.apply_qlora):
        assert "full-match regex" in fn.__doc__ or "FULL module name" in fn.__doc__
    assert "re.fullmatch" in fastpeft.apply_lora.__doc__ and "all-linear" in fastpeft.apply_lora.__doc__


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(target_modules=".*q_proj", layers_to_transform=0), ValueError, "cannot be used when target_modules is a str"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), ValueError, "layers_pattern needs layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_to_transform="0"), TypeError, "layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_to_transform=[0.5]), TypeError, "layers_to_transform"),
    (dict(target_modules=["q_proj"], exclude_modules=3), TypeError, "exclude_modules"),
    (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), ValueError, "leave none of them"),
    (dict(target_modules=["q_proj"], modules_to_save="lm_head"), TypeError, "modules_to_save"),
    (dict(target_modules=["q_proj"], modules_to_save=["no_such_head"]), ValueError, "modules_to_save"),
    (dict(target_modules=["q_proj"], layers_to_transform=[7]), ValueError, "leave none of them"),
])
def test_bad_selection_arguments(kwargs, exc, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        fastpeft.apply_lora(model, **kwargs)
    assert set(model.state_dict()) == set(before)


# --------------------------------------------------------------------------- modules_to_save
def _randomize(model):
    torch.manual_seed(8)
    for _, layer in fastpeft.injection.lora_modules(model):
        layer.reset_lora_parameters(False)
    for _, wrapper in fastpeft.nn.modules_to_save.saved_modules(model):
        with torch.no_grad():
            for p in wrapper.trainable_copy.parameters():
                p.add_(torch.randn_like(p))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_modules_to_save_is_a_trainable_copy_in_peft_layout():
    ours = fastpeft.apply_lora(tiny_llama(), ["q_proj"], modules_to_save=["lm_head"])
    peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(ours.lm_head, ModulesToSave)
    ours_keys = {k for k in ours.state_dict() if "lm_head" in k}
    peft_keys = {k[len(PEFT_PREFIX):] for k in peft_model.state_dict() if "lm_head" in k}
    assert ours_keys == peft_keys == {"lm_head.original_module.weight", "lm_head.modules_to_save.default.weight"}
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad and "lm_head" in n}
    peft_trainable = {n[len(PEFT_PREFIX):] for n, p in peft_model.named_parameters()
                      if p.requires_grad and "lm_head" in n}
    assert trainable == peft_trainable == {"lm_head.modules_to_save.default.weight"}
    assert len(fastpeft.lora_parameters(ours)) == 4  # the LoRA pairs; the copy trains too (requires_grad)


def test_modules_to_save_round_trip_with_peft(tmp_path):
    ids = token_ids()
    ours = fastpeft.apply_lora(tiny_llama(), ["q_proj", "v_proj"], modules_to_save=["lm_head"])
    _randomize(ours)
    expected = _logits(ours, ids)
    fastpeft.save_lora(ours, tmp_path / "ours")
    loaded_by_peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded_by_peft, ids), expected, rtol=1e-5, atol=1e-5)  # PEFT's own math

    loaded_by_peft.save_pretrained(tmp_path / "peft")
    back = fastpeft.load_lora(tiny_llama(), tmp_path / "peft")
    assert isinstance(back.lm_head, ModulesToSave)
    assert back.lm_head.trainable_copy.weight.requires_grad and not back.lm_head.original_module.weight.requires_grad
    assert torch.equal(_logits(back, ids), expected)
    again = fastpeft.load_lora(fastpeft.apply_lora(tiny_llama(), ["q_proj", "v_proj"], modules_to_save=["lm_head"]),
                               tmp_path / "peft")  # into existing layers and wrappers
    assert torch.equal(_logits(again, ids), expected)


def test_load_lora_honours_layers_and_exclusions_from_a_peft_config(tmp_path):
    ids = token_ids()
    config = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "up_proj"], layers_to_transform=[1],
                        layers_pattern="layers", exclude_modules=["k_proj"], init_lora_weights=False)
    peft_model = get_peft_model(tiny_llama(), config)
    expected = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    ours = fastpeft.load_lora(tiny_llama(), tmp_path)
    assert sorted(n for n, _ in fastpeft.injection.lora_modules(ours)) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- validate first, then convert
def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_untouched(model, snapshot):
    types, state, flags = snapshot
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _bnb4(in_features, out_features, quant_type="nf4"):
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features), requires_grad=False,
                                     quant_type=quant_type, blocksize=64)
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


class _Mixed(nn.Module):
    def __init__(self, late):
        super().__init__()
        self.a_first = nn.Linear(64, 64)
        self.z_late = late


@pytest.mark.parametrize("late, match", [
    (lambda: _bnb4(64, 8, quant_type="fp4"), "only 'nf4' is supported"),
    (lambda: _bnb4(96, 8), "in_features divisible"),
    (lambda: nn.Linear(96, 8), "not divisible by blocksize"),
    (lambda: nn.Conv1d(4, 4, 1), "QLoRA wraps only"),
], ids=["fp4 Linear4bit", "Linear4bit K % blocksize", "Linear K % blocksize", "Conv1d"])
def test_apply_qlora_rejects_before_converting_anything(late, match):
    model = _Mixed(late())
    snapshot = _snapshot(model)
    with pytest.raises((TypeError, ValueError), match=match):
        fastpeft.apply_qlora(model, ["a_first", "z_late"])
    _assert_untouched(model, snapshot)


def test_apply_qlora_checks_double_quant_first():
    model = _Mixed(nn.Linear(64, 8))
    snapshot = _snapshot(model)
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        fastpeft.apply_qlora(model, ["a_first", "z_late"], double_quant="no")
    _assert_untouched(model, snapshot)


@pytest.mark.parametrize("late", [lambda: nn.Embedding(4, 4), lambda: _bnb4(64, 8)], ids=["Embedding", "Linear4bit"])
def test_apply_lora_rejects_before_converting_anything(late):
    model = _Mixed(late())
    snapshot = _snapshot(model)
    with pytest.raises(TypeError, match="z_late"):
        fastpeft.apply_lora(model, ["a_first", "z_late"])
    _assert_untouched(model, snapshot)


def test_replace_modules_puts_everything_back_when_a_replacement_fails():
    model = tiny_llama()
    snapshot = _snapshot(model)
    calls = []

    def make(name, module):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return LoRALinear.from_linear(module, r=2)  # freezes the base: must be undone too

    with pytest.raises(RuntimeError, match="boom"):
        replace_modules(model, LLAMA_TARGETS, make)
    assert len(calls) == 3
    _assert_untouched(model, snapshot)


@pytest.mark.parametrize("target", [["base_layer"], ["q_proj.lora_A"], r".*\.q_proj\.base_layer", "all-linear"])
def test_targets_inside_fastpeft_layers_are_refused(target):
    model = fastpeft.apply_lora(tiny_llama(), ["q_proj"], r=2)
    if target == "all-linear":  # all-linear skips the insides, as PEFT does, and wraps the rest
        fastpeft.apply_lora(model, target, r=2)
        assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
        assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, nn.Linear)
        return
    snapshot = _snapshot(model)
    with pytest.raises(TypeError, match="inside fastpeft's LoRALinear"):
        fastpeft.apply_lora(model, target, r=2)
    with pytest.raises(TypeError, match="inside fastpeft's LoRALinear"):
        fastpeft.apply_qlora(model, target, r=2)
    _assert_untouched(model, snapshot)


def test_qlora_targets_inside_qlora_layers_are_refused():
    model = fastpeft.apply_qlora(tiny_llama(), ["q_proj"], r=2)
    with pytest.raises(TypeError, match="inside fastpeft's QLoRALinear"):
        fastpeft.apply_lora(model, ["lora_B"], r=2)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QLoRALinear)
