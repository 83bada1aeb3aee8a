"""AdapterHub directory format in fastpeft alone (no side env): round trips, head/no-head keys, .bin, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from models import tiny_bert, tiny_llama, token_ids
from safetensors.torch import load_file, save_file

from fastpeft.injection.adapter import adapter_layers, apply_adapter, apply_adapter_fusion
from fastpeft.integrations.adapterhub import (load_adapter, load_adapter_fusion, read_adapter_config, save_adapter,
                                             save_adapter_fusion)


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def _perturb(model, marker):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if marker in n:
                p.add_(0.1 * torch.randn_like(p))


def _logits(model):
    r = model(input_ids=token_ids())
    return r.logits if hasattr(r, "logits") else r.last_hidden_state


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {n: p.requires_grad for n, p in model.named_parameters()}


def test_round_trip_with_layernorms_gate_and_learned_scaling(tmp_path):
    src = tiny_bert()
    apply_adapter(src, "seq_bn", name="x", ln_before=True, ln_after=True, use_gating=True, scaling="channel")
    _perturb(src, ".adapters.x.")
    save_adapter(src, tmp_path / "x", "x")
    meta = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert (meta["name"], meta["model_type"], meta["hidden_size"], meta["model_class"]) == ("x", "bert", 64, "BertModel")
    assert meta["version"].startswith("adapters.") and meta["config"]["ln_before"] is True
    keys = set(load_file(str(tmp_path / "x" / "adapter.safetensors")))
    assert "encoder.layer.0.output.adapters.x.adapter_norm_before.weight" in keys
    assert "encoder.layer.0.output.adapters.x.adapter_down.0.weight" in keys  # same LayerNorm, AdapterHub's 2 names
    assert "encoder.layer.1.output.adapters.x.adapter_down.1.weight" in keys
    dst = tiny_bert()
    assert load_adapter(dst, tmp_path / "x", load_as="y") == "y"
    with torch.no_grad():
        assert torch.equal(_logits(dst), _logits(src))
    assert all(".adapters.y." in n for n, p in dst.named_parameters() if p.requires_grad)


def test_head_model_keys_load_into_base_model_and_back(tmp_path):
    src = tiny_llama()  # LlamaForCausalLM: keys start with "model."
    apply_adapter(src, "par_bn", name="p")
    _perturb(src, ".adapters.p.")
    save_adapter(src, tmp_path / "p", "p")
    assert all(k.startswith("model.layers.") for k in load_file(str(tmp_path / "p" / "adapter.safetensors")))
    base = tiny_llama().model  # LlamaModel: no prefix
    load_adapter(base, tmp_path / "p")
    save_adapter(base, tmp_path / "q", "p")
    assert all(k.startswith("layers.") for k in load_file(str(tmp_path / "q" / "adapter.safetensors")))
    again = tiny_llama()
    load_adapter(again, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(_logits(again), _logits(src))


def test_pytorch_adapter_bin_is_read_with_weights_only(tmp_path):
    src = tiny_bert()
    apply_adapter(src, "double_seq_bn", name="h")
    _perturb(src, ".adapters.h.")
    save_adapter(src, tmp_path / "h", "h")
    state = load_file(str(tmp_path / "h" / "adapter.safetensors"))
    (tmp_path / "h" / "adapter.safetensors").unlink()
    torch.save(state, tmp_path / "h" / "pytorch_adapter.bin")
    dst = tiny_bert()
    load_adapter(dst, tmp_path / "h")
    with torch.no_grad():
        assert torch.equal(_logits(dst), _logits(src))


def test_legacy_config_without_version_renames_gelu_as_adapterhub(tmp_path):
    src = tiny_bert()
    apply_adapter(src, "seq_bn", name="g", non_linearity="gelu_new")
    save_adapter(src, tmp_path / "g", "g")
    meta = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    del meta["version"]
    meta["config"]["non_linearity"] = "gelu"  # adapter-transformers v1/v2 spelling of the tanh GELU
    (tmp_path / "g" / "adapter_config.json").write_text(json.dumps(meta))
    assert read_adapter_config(tmp_path / "g")[0].non_linearity == "gelu_new"


def test_fusion_round_trip(tmp_path):
    src = tiny_bert()
    apply_adapter(src, "seq_bn", name="a")
    apply_adapter(src, "seq_bn", name="b")
    apply_adapter_fusion(src, ["a", "b"], "dynamic", residual_before=True)
    _perturb(src, ".adapters.")
    _perturb(src, ".adapter_fusion_layer.")
    for n in "ab":
        save_adapter(src, tmp_path / n, n)
    save_adapter_fusion(src, tmp_path / "f", "a,b")
    meta = json.loads((tmp_path / "f" / "adapter_fusion_config.json").read_text())
    assert meta["adapter_names"] == ["a", "b"] and meta["config"]["residual_before"] is True
    dst = tiny_bert()
    load_adapter(dst, tmp_path / "a")
    load_adapter(dst, tmp_path / "b")
    assert load_adapter_fusion(dst, tmp_path / "f") == "a,b"
    with torch.no_grad():
        assert torch.equal(_logits(dst), _logits(src))
    assert all(".adapter_fusion_layer.a,b." in n for n, p in dst.named_parameters() if p.requires_grad)


def _saved(tmp_path, name="x"):
    src = tiny_bert()
    apply_adapter(src, "seq_bn", name=name)
    save_adapter(src, tmp_path / name, name)
    return tmp_path / name


def test_rejections_leave_the_model_untouched(tmp_path):
    d = _saved(tmp_path)
    weights = d / "adapter.safetensors"
    state = load_file(str(weights))
    model = tiny_bert()
    before = _snapshot(model)

    first = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != first}, str(weights))
    with pytest.raises(ValueError, match="missing"):
        load_adapter(model, d)
    save_file(dict(state, **{"encoder.layer.0.output.adapters.x.extra": torch.zeros(1)}), str(weights))
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter(model, d)
    save_file(dict(state, **{first: torch.zeros(3)}), str(weights))
    with pytest.raises(ValueError, match="shape"):
        load_adapter(model, d)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="saved from a 'bert' model"):
        load_adapter(tiny_llama(), d)
    meta = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(dict(meta, config=dict(meta["config"], phm_layer=True))))
    with pytest.raises(ValueError, match="phm_layer"):
        load_adapter(model, d)
    (d / "adapter_config.json").write_text(json.dumps(dict(meta, config=dict(meta["config"], bogus=1))))
    with pytest.raises(ValueError, match="bogus"):
        load_adapter(model, d)
    (d / "adapter_config.json").write_text(json.dumps(dict(meta, hidden_size=32)))
    with pytest.raises(ValueError, match="hidden_size"):
        load_adapter(model, d)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path / "nowhere")
    weights.unlink()
    (d / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="adapter.safetensors"):
        load_adapter(model, d)
    assert _snapshot(model) == before
    assert not adapter_layers(model)


def test_save_errors(tmp_path):
    model = tiny_bert()
    with pytest.raises(ValueError, match="no adapter called"):
        save_adapter(model, tmp_path / "n", "nope")
    apply_adapter(model, "seq_bn", name="a")
    with pytest.raises(ValueError, match="no AdapterFusion called"):
        save_adapter_fusion(model, tmp_path / "f", "a,b")
