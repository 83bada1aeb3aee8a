"""Checkpoints whose config disagrees with their tensors, or whose files are corrupt (issue 19, item 8).

A config's sizes are checked against the saved tensors before anything of
that size is built (``num_virtual_tokens=10**9`` once asked for a 128 GB
embedding); a truncated safetensors file, a config that is not UTF-8 or is
nested too deeply raise a ValueError naming the file, for every format
(PEFT's LoRA and prompt learning, AdapterHub), and the model is unchanged.
"""
import json

import pytest
import torch
from models import tiny_bert, tiny_llama

from fastpeft.injection import apply_adapter, apply_lora
from fastpeft.injection.prefix_tuning import apply_prefix_tuning
from fastpeft.injection.prompt_tuning import apply_prompt_tuning
from fastpeft.integrations.adapterhub.format import load_adapter, save_adapter
from fastpeft.integrations.peft import prompt_learning_format
from fastpeft.integrations.peft.checkpoints import load_peft, save_peft
from fastpeft.integrations.peft.lora_format import save_lora

P = 3


def _prompt(path):
    save_peft(apply_prompt_tuning(tiny_llama(), P), path)
    return "adapter_config.json", "adapter_model.safetensors", tiny_llama, load_peft


def _prefix(path):
    save_peft(apply_prefix_tuning(tiny_llama(), P), path)
    return "adapter_config.json", "adapter_model.safetensors", tiny_llama, load_peft


def _p_tuning(path):
    save_peft(apply_prompt_tuning(tiny_llama(), P, encoder="mlp", encoder_hidden_size=8), path)
    return "adapter_config.json", "adapter_model.safetensors", tiny_llama, load_peft


def _lora(path):
    save_lora(apply_lora(tiny_llama(), ["q_proj"], r=2), path)
    return "adapter_config.json", "adapter_model.safetensors", tiny_llama, load_peft


def _adapterhub(path):
    model = tiny_bert()
    apply_adapter(model, "seq_bn", name="a")
    save_adapter(model, path, "a")
    return "adapter_config.json", "adapter.safetensors", tiny_bert, load_adapter


FORMATS = [_prompt, _prefix, _p_tuning, _lora, _adapterhub]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    state = model.state_dict()
    return state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())


@pytest.mark.parametrize("make", [_prompt, _prefix, _p_tuning], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("tokens", [10 ** 9, P + 1])
def test_num_virtual_tokens_is_checked_against_the_file_before_building(tmp_path, monkeypatch, make, tokens):
    config_name, _, new_model, load = make(tmp_path)
    config = json.loads((tmp_path / config_name).read_text())
    config["num_virtual_tokens"] = tokens
    (tmp_path / config_name).write_text(json.dumps(config))

    def never(*args, **kwargs):
        raise AssertionError("a layer was built from the config before its size was checked against the file")
    for builder in ("prompt_tuning_layer", "prefix_tuning_layer"):
        monkeypatch.setattr(prompt_learning_format, builder, never)
    model = new_model()
    before = _state(model)
    with pytest.raises(ValueError, match=f"num_virtual_tokens={tokens}.*saves {P} virtual tokens"):
        load(model, tmp_path)
    assert _unchanged(model, before)


@pytest.mark.parametrize("make", FORMATS, ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("keep", [0.5, 0.99, 10])
def test_truncated_safetensors_names_the_file(tmp_path, make, keep):
    _, weights_name, new_model, load = make(tmp_path)
    path = tmp_path / weights_name
    data = path.read_bytes()
    path.write_bytes(data[:keep] if isinstance(keep, int) else data[:int(len(data) * keep)])
    model = new_model()
    before = _state(model)
    with pytest.raises(ValueError, match=weights_name.replace(".", r"\.")):
        load(model, tmp_path)
    assert _unchanged(model, before)


@pytest.mark.parametrize("make", FORMATS, ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("content", [b"\xff\xfe{\x00\"r\": 2}", b"{\"peft_type\": \"LORA\", \"x\": \"\xe9\"}",
                                     b"[" * 100_000 + b"]" * 100_000,
                                     b"{\"a\": " * 50_000 + b"1" + b"}" * 50_000],
                         ids=["utf16-bom", "latin1", "deep-list", "deep-object"])
def test_corrupt_config_names_the_file(tmp_path, make, content):
    config_name, _, new_model, load = make(tmp_path)
    (tmp_path / config_name).write_bytes(content)
    model = new_model()
    before = _state(model)
    with pytest.raises(ValueError, match=config_name.replace(".", r"\.")):
        load(model, tmp_path)
    assert _unchanged(model, before)
