"""The one adapter-directory reader (fastpeft.integrations.adapter_directory) and its pickle policy, through every
format that uses it: safetensors first; a legacy torch file only as torch.load(weights_only=True) reads it, so a
pickle that would run code is refused before it runs."""
import pytest
import torch
from models import tiny_bert, tiny_llama
from safetensors.torch import save_file

from fastpeft import apply_adapter, apply_lora, apply_prompt_tuning, load_adapter, load_lora, load_peft
from fastpeft import save_adapter, save_lora, save_peft
from fastpeft.integrations.adapter_directory import read_weights


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _malicious(path, marker):
    torch.save({"lora_A": torch.zeros(1), "evil": _Payload(marker)}, path)


def test_malicious_pickle_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    _malicious(tmp_path / "adapter_model.bin", marker)
    with pytest.raises(ValueError, match="weights_only=True"):
        read_weights(tmp_path, "adapter_model.safetensors", "adapter_model.bin")
    assert not marker.exists()
    torch.load(tmp_path / "adapter_model.bin", weights_only=False)  # the payload is live: plain pickle runs it
    assert marker.exists()


def test_weights_only_pickle_is_read_and_safetensors_comes_first(tmp_path):
    state = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    torch.save(state, tmp_path / "w.bin")
    got = read_weights(tmp_path, "w.safetensors", "w.bin")
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    save_file({"a": torch.ones(1)}, str(tmp_path / "w.safetensors"))
    assert list(read_weights(tmp_path, "w.safetensors", "w.bin")) == ["a"]


def test_pickle_of_something_else_than_a_dict_of_tensors_is_refused(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "w.bin")
    with pytest.raises(ValueError, match="not a dict of tensors"):
        read_weights(tmp_path, "w.safetensors", "w.bin")
    with pytest.raises(FileNotFoundError, match="neither w.safetensors nor w.other"):
        read_weights(tmp_path, "w.safetensors", "w.other")
    with pytest.raises(TypeError, match="directory"):
        read_weights(3, "w.safetensors", "w.bin")


def _lora_dir(path):
    save_lora(apply_lora(tiny_llama(), ["q_proj"], r=2), path)
    return "adapter_model.safetensors", "adapter_model.bin", lambda d: load_lora(tiny_llama(), d)


def _prompt_dir(path):
    save_peft(apply_prompt_tuning(tiny_llama(), 3), path)
    return "adapter_model.safetensors", "adapter_model.bin", lambda d: load_peft(tiny_llama(), d)


def _adapterhub_dir(path):
    model = tiny_bert()
    apply_adapter(model, "seq_bn", name="a")
    save_adapter(model, path, "a")
    return "adapter.safetensors", "pytorch_adapter.bin", lambda d: load_adapter(tiny_bert(), d)


@pytest.mark.parametrize("make", [_lora_dir, _prompt_dir, _adapterhub_dir], ids=lambda f: f.__name__[1:])
def test_every_format_refuses_a_malicious_pickle(tmp_path, make):
    directory = tmp_path / "adapter"
    safe_name, pickle_name, load = make(directory)
    (directory / safe_name).unlink()
    marker = tmp_path / "ran"
    _malicious(directory / pickle_name, marker)
    with pytest.raises(ValueError, match="weights_only=True"):
        load(directory)
    assert not marker.exists()
