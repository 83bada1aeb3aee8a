"""save_lora / load_lora against HF PEFT's own save_pretrained / from_pretrained.

Outputs of the two sides are compared with a float64 copy of the PEFT model as
reference and the float32 PEFT model as the budget (docs/architecture.md, "Numerics and tests").
"""
import copy
import json
import os

import pytest
import torch
from models import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama, token_ids
from numerics import assert_close_to_ref
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastpeft.injection import apply_lora, lora_parameters, merge_lora
from fastpeft.nn import LoRALinear
from fastpeft.integrations.peft.lora_format import load_lora, save_lora
# Whole-model fp32 outputs differ from the float64 reference by a few ulp for both
# sides; their ratio is noise, so model-level checks add a floor of ~16 fp32 ulp
# (a real bug, e.g. a wrong scaling, is off by 1e-2 or more).
MODEL_TINY = 2e-6


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_same_outputs(ours, peft_model, what):
    ids = token_ids(batch=2, seq=6)
    ref = _logits(copy.deepcopy(peft_model).double(), ids)
    assert_close_to_ref(_logits(ours, ids), ref, _logits(peft_model, ids), what=what, tiny=MODEL_TINY)


def _random_lora_(model):
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def _peft_saved(tmp_path, build, **config):
    """A PEFT model with random (non-zero) LoRA weights, saved by PEFT into tmp_path/peft."""
    model = get_peft_model(build(), LoraConfig(init_lora_weights=False, **config)).eval()
    directory = tmp_path / "peft"
    model.save_pretrained(directory)
    return model, directory


def _ours_saved(tmp_path):
    model = _random_lora_(apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=3, lora_alpha=5))
    save_lora(model, tmp_path / "ours")
    return model, tmp_path / "ours"


@pytest.mark.parametrize("case", ["llama_patterns", "llama_rslora_dropout", "gpt2"])
def test_load_directory_saved_by_peft(tmp_path, case):
    if case == "llama_patterns":
        config = dict(r=4, lora_alpha=6, target_modules=LLAMA_TARGETS,
                      rank_pattern={"v_proj": 2, "model.layers.1.mlp.up_proj": 5}, alpha_pattern={"q_proj": 3})
        build = tiny_llama
    elif case == "llama_rslora_dropout":
        config = dict(r=8, lora_alpha=4, target_modules=["q_proj", "down_proj"], use_rslora=True, lora_dropout=0.2,
                      task_type="CAUSAL_LM")
        build = tiny_llama
    else:
        config = dict(r=3, lora_alpha=9, target_modules=GPT2_TARGETS, fan_in_fan_out=True)
        build = tiny_gpt2
    peft_model, directory = _peft_saved(tmp_path, build, **config)
    ours = load_lora(build(), directory).eval()

    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert set(layers) == set(peft_model.base_model.targeted_module_names)
    for name, layer in layers.items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert layer.r == peft_layer.r["default"], name
        assert layer.scaling == pytest.approx(peft_layer.scaling["default"]), name
        assert layer.lora_dropout == config.get("lora_dropout", 0.0)
    assert all(p.requires_grad == ("lora_" in n) for n, p in ours.named_parameters())
    _assert_same_outputs(ours, peft_model, f"{case}: load_lora vs PEFT")


@pytest.mark.parametrize("case", ["llama_mixed_ranks", "gpt2", "llama_one_layer"])
def test_peft_loads_directory_saved_by_save_lora(tmp_path, case):
    if case == "llama_mixed_ranks":
        build = tiny_llama
        model = apply_lora(build(), ["q_proj", "k_proj"], r=4, lora_alpha=8)
        apply_lora(model, ["v_proj", "down_proj"], r=2, lora_alpha=3)
        apply_lora(model, ["model.layers.1.mlp.up_proj"], r=5, lora_alpha=8, use_rslora=False)
    elif case == "gpt2":
        build = tiny_gpt2
        model = apply_lora(build(), GPT2_TARGETS, r=3, lora_alpha=7, use_rslora=True)
    else:
        build = tiny_llama
        model = apply_lora(build(), ["model.layers.0.self_attn.o_proj"], r=2, lora_alpha=4)
    _random_lora_(model)
    save_lora(model, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    ours_layers = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert set(peft_model.base_model.targeted_module_names) == ours_layers
    _assert_same_outputs(model.eval(), peft_model, f"{case}: PEFT from_pretrained vs ours")

    # Our file holds exactly the keys PEFT itself writes for the same adapter.
    peft_model.save_pretrained(tmp_path / "resaved")
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as f:
        ours_keys = set(f.keys())
    with safe_open(tmp_path / "resaved" / "adapter_model.safetensors", "pt") as f:
        assert ours_keys == set(f.keys())


def test_roundtrip_keeps_fp32_adapters_of_bf16_model(tmp_path):
    model = _random_lora_(apply_lora(tiny_llama(dtype=torch.bfloat16), ["q_proj"], r=2, lora_dtype=torch.float32))
    save_lora(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    loaded = load_lora(tiny_llama(dtype=torch.bfloat16), tmp_path, lora_dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and p1.dtype == p2.dtype and torch.equal(p1, p2)
    ids = token_ids()
    torch.testing.assert_close(_logits(model, ids), _logits(loaded, ids), rtol=0, atol=0)


def test_saved_config_fields(tmp_path):
    model, directory = _ours_saved(tmp_path)
    save_lora(model, directory, base_model_name_or_path="tiny-test-model")
    peft_config = LoraConfig.from_pretrained(directory)
    assert peft_config.peft_type.value == "LORA" and peft_config.base_model_name_or_path == "tiny-test-model"
    assert peft_config.r == 3 and set(peft_config.target_modules) == {"q_proj", "v_proj"}
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (3, 5, 0.0)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["use_rslora"] is False and config["fan_in_fan_out"] is False
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}


# ---- save_lora errors ------------------------------------------------------

def test_save_without_lora_layers(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora(tiny_llama(), tmp_path)


def test_save_merged_model(tmp_path):
    model = merge_lora(apply_lora(tiny_llama(), ["q_proj"]))
    with pytest.raises(ValueError, match="merged"):
        save_lora(model, tmp_path)


def test_save_mixed_dropout(tmp_path):
    model = apply_lora(tiny_llama(), ["q_proj"], lora_dropout=0.1)
    apply_lora(model, ["v_proj"], lora_dropout=0.2)
    with pytest.raises(ValueError, match="lora_dropout"):
        save_lora(model, tmp_path)


def test_save_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="model must be"):
        save_lora({"a": 1}, tmp_path)
    with pytest.raises(TypeError, match="base_model_name_or_path"):
        save_lora(apply_lora(tiny_llama(), ["q_proj"]), tmp_path, base_model_name_or_path=3)


# ---- load_lora errors ------------------------------------------------------

def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, match", [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"use_dora": True}, "lora_magnitude_vector"),  # DoRA loads, but this file has no magnitudes
    ({"bias": "all"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    # PEFT's targeting conventions are honoured (tests/injection/test_targets.py); here they disagree with the file:
    ({"modules_to_save": ["lm_head"]}, "modules_to_save 'lm_head' needs tensors"),
    ({"layers_to_transform": [0]}, "does not select"),
    ({"exclude_modules": ["q_proj"]}, "does not select"),
    ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights"),
    ({"target_modules": "all-linear"}, "lacks LoRA weights"),
    ({"target_modules": []}, "target_modules"),
    ({"rank_pattern": [1]}, "rank_pattern"),
    ({"r": 4}, "rank r=4"),
    ({"target_modules": ["q_proj"]}, "does not select"),
    ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, "lacks LoRA weights"),
])
def test_load_rejects_bad_config(tmp_path, changes, match):
    _, directory = _ours_saved(tmp_path)
    _edit_config(directory, **changes)
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        load_lora(model, directory)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_load_rejects_invalid_json(tmp_path):
    _, directory = _ours_saved(tmp_path)
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_lora(tiny_llama(), directory)


def test_load_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(tiny_llama(), tmp_path)
    _, directory = _ours_saved(tmp_path)
    os.remove(directory / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_lora(tiny_llama(), directory)
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04 not loaded")
    with pytest.raises(ValueError, match="pickle"):
        load_lora(tiny_llama(), directory)


def test_load_reads_peft_legacy_bin_with_weights_only(tmp_path):
    """PEFT's older adapter_model.bin (a plain state dict) loads as its safetensors twin does."""
    model, directory = _ours_saved(tmp_path)
    torch.save(load_file(directory / "adapter_model.safetensors"), directory / "adapter_model.bin")
    os.remove(directory / "adapter_model.safetensors")
    loaded = load_lora(tiny_llama(), directory)
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _edit_weights(directory, edit):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _key(module, which="lora_A"):
    return f"base_model.model.{module}.{which}.weight"


Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update({_key(Q0, "lora_magnitude_vector"): torch.ones(64)}), "not plain LoRA"),
    (lambda t: t.update({"base_model.model.lm_head.modules_to_save.weight": torch.ones(2)}), "not plain LoRA"),
    (lambda t: t.pop(_key(Q0, "lora_B")), "needs both lora_A and lora_B"),
    (lambda t: t.update({_key(Q0): torch.randn(3, 65)}), r"shape \(3, 65\)"),
    (lambda t: t.update({_key("model.layers.7.self_attn.q_proj"): torch.randn(3, 64),
                         _key("model.layers.7.self_attn.q_proj", "lora_B"): torch.randn(64, 3)}), "lacks"),
])
def test_load_rejects_bad_weights(tmp_path, edit, match):
    _, directory = _ours_saved(tmp_path)
    _edit_weights(directory, edit)
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        load_lora(model, directory)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_load_into_existing_lora_layers(tmp_path):
    saved, directory = _ours_saved(tmp_path)
    target = apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=3, lora_alpha=5)
    assert load_lora(target, directory) is target
    for (n1, p1), (n2, p2) in zip(saved.named_parameters(), target.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.requires_grad == p2.requires_grad
    ids = token_ids()
    torch.testing.assert_close(_logits(target, ids), _logits(saved, ids), rtol=0, atol=0)


@pytest.mark.parametrize("targets, kwargs, load_kwargs, match", [
    (["q_proj"], {"r": 3, "lora_alpha": 5}, {}, "lacks them"),
    (["q_proj", "v_proj", "k_proj"], {"r": 3, "lora_alpha": 5}, {}, "lacks LoRA weights"),
    (["q_proj", "v_proj"], {"r": 3, "lora_alpha": 6}, {}, "scaling"),
    (["q_proj", "v_proj"], {"r": 3, "lora_alpha": 5, "use_rslora": True}, {}, "scaling"),
    (["q_proj", "v_proj"], {"r": 3, "lora_alpha": 5, "lora_dropout": 0.1}, {}, "lora_dropout"),
    (["q_proj", "v_proj"], {"r": 3, "lora_alpha": 5}, {"lora_dtype": torch.float64}, "lora_dtype"),
])
def test_load_into_mismatched_lora_layers(tmp_path, targets, kwargs, load_kwargs, match):
    _, directory = _ours_saved(tmp_path)
    target = apply_lora(tiny_llama(), targets, **kwargs)
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    with pytest.raises(ValueError, match=match):
        load_lora(target, directory, **load_kwargs)
    assert all(torch.equal(p, before[n]) for n, p in target.named_parameters())


def test_load_into_existing_layers_not_selected_by_config(tmp_path):
    _, directory = _ours_saved(tmp_path)
    _edit_config(directory, target_modules=["k_proj"])
    with pytest.raises(ValueError, match="does not select the model's LoRA layers"):
        load_lora(apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=3, lora_alpha=5), directory)


def test_load_rank_mismatch_with_existing_layers(tmp_path):
    _, directory = _ours_saved(tmp_path)
    _edit_config(directory, r=2)
    with pytest.raises(ValueError, match="rank r=2"):
        load_lora(apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=2, lora_alpha=5), directory)


def test_qlora_model_saves_and_loads_peft_format(tmp_path):
    from fastpeft.injection.qlora import apply_qlora

    peft_model, directory = _peft_saved(tmp_path, tiny_llama, r=3, lora_alpha=5, target_modules=["q_proj", "o_proj"])
    qmodel = apply_qlora(tiny_llama(), ["q_proj", "o_proj"], r=3, lora_alpha=5)
    load_lora(qmodel, directory)
    peft_params = dict(peft_model.named_parameters())
    names = [n for n, p in qmodel.named_parameters() if "lora_" in n]
    assert len(names) == 8
    for name, p in qmodel.named_parameters():
        if "lora_" in name:
            module, which, _ = name.rsplit(".", 2)
            assert torch.equal(p, peft_params[f"base_model.model.{module}.{which}.default.weight"]), name

    save_lora(qmodel, tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (3, 5, ["o_proj", "q_proj"])
    original = load_file(directory / "adapter_model.safetensors")
    resaved = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert original.keys() == resaved.keys()
    assert all(torch.equal(original[k], resaved[k]) for k in original)


def test_load_bad_model(tmp_path):
    _, directory = _ours_saved(tmp_path)
    with pytest.raises(TypeError, match="model must be"):
        load_lora("model", directory)
