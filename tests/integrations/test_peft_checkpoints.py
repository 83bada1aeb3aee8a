"""``fastpeft.load_peft`` / ``save_peft`` against HF PEFT, both ways, for every supported ``peft_type``.

PEFT is the oracle: a checkpoint PEFT saved, loaded by fastpeft, gives PEFT's
outputs (float32 budget relative to PEFT's own float32 error against a float64
run of PEFT on the same checkpoint, docs/architecture.md "Numerics and tests");
a checkpoint fastpeft saved loads in ``PeftModel.from_pretrained`` with the
same tensors and outputs. Rejected checkpoints leave the model untouched.
"""
import json
import os

import pytest
import torch
from models import tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_llama_head_dim, token_ids
from numerics import assert_close_to_ref
from peft import (LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType,
                  get_peft_model)
from safetensors.torch import load_file, save_file

from fastpeft.injection.lora import apply_lora
from fastpeft.nn.modules_to_save import saved_modules
from fastpeft.injection.prefix_tuning import apply_prefix_tuning
from fastpeft._peft_task_type import infer_task_type
from fastpeft.injection.prompt_learning import prompt_parameters
from fastpeft.injection.prompt_tuning import apply_prompt_tuning
from fastpeft.integrations.peft.checkpoints import SUPPORTED_PEFT_TYPES, load_peft, save_peft
from fastpeft.nn.prompt_learning import PROMPT_MODULE_NAME, prompt_learning_layer

P = 4
MODEL_TINY = 2e-6  # a few fp32 ulp of whole-model outputs (see tests/integrations/test_peft_backend.py)
FAMILIES = {"llama": (tiny_llama, TaskType.CAUSAL_LM), "gpt2": (tiny_gpt2, TaskType.CAUSAL_LM),
            "bert": (tiny_bert_classifier, TaskType.SEQ_CLS)}
METHODS = {
    "prefix": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=P),
    "prefix_projected": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=True,
                                                        encoder_hidden_size=24),
    "prompt": lambda task: PromptTuningConfig(task_type=task, num_virtual_tokens=P),
    "p_tuning_mlp": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=24),
    "p_tuning_lstm": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=24,
                                                      encoder_reparameterization_type="LSTM"),
}


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def _batch(family: str):
    """Token ids with padding: left for the causal LMs (generation layout), right for BERT."""
    ids = token_ids(batch=2, seq=7, seed=3)
    mask = torch.ones_like(ids)
    if family == "bert":
        mask[1, 5:] = 0
    else:
        mask[1, :2] = 0
    return ids, mask


def _outputs(model, family):
    ids, mask = _batch(family)
    return model(input_ids=ids, attention_mask=mask).logits


def _peft_outputs(peft_model, family, method):
    """PEFT's logits. PEFT 0.21.2's classifier refuses prefix tuning on transformers 5 (it looks for a
    ``past_key_values`` parameter, now ``cache``): there the rest of its forward runs by hand, as in
    tests/injection/test_prefix_tuning_peft_parity.py (which shows that path equals PEFT's forward)."""
    if not (family == "bert" and method.startswith("prefix")):
        return _outputs(peft_model, family)
    ids, mask = _batch(family)
    full_mask = torch.cat((torch.ones(ids.shape[0], P, dtype=mask.dtype), mask), dim=1)
    return peft_model.base_model(input_ids=ids, attention_mask=full_mask,
                                 past_key_values=peft_model.get_prompt(ids.shape[0])).logits


def _real_positions(logits, family, method):
    """Causal-LM logits at the real tokens' positions (PEFT's prompt tuning adds P virtual ones in front)."""
    if family == "bert":
        return logits
    _, mask = _batch(family)
    if method.startswith("prompt") or method.startswith("p_tuning"):
        logits = logits[:, P:]
    return logits[mask.bool()]


def _peft_checkpoint(tmp_path, family, method, seed=5):
    build, task = FAMILIES[family]
    peft_model = get_peft_model(build(), METHODS[method](task))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the prompt and, for a classifier, PEFT's trainable copy of its head
        for p in [p for p in peft_model.parameters() if p.requires_grad]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    directory = tmp_path / f"peft-{family}-{method}"
    peft_model.save_pretrained(directory)
    return directory


def _peft_loaded(directory, family, dtype=torch.float32):
    build, _ = FAMILIES[family]
    return PeftModel.from_pretrained(build(dtype=dtype), directory).eval()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_peft_gives_peft_outputs(tmp_path, family, method):
    directory = _peft_checkpoint(tmp_path, family, method)
    with torch.no_grad():
        expected = _peft_outputs(_peft_loaded(directory, family), family, method)
        reference = _peft_outputs(_peft_loaded(directory, family, torch.float64), family, method)
        model = load_peft(FAMILIES[family][0](), directory)
        got = _outputs(model, family)
    assert got.shape == expected.shape
    pick = lambda t: _real_positions(t, family, method)  # noqa: E731
    assert_close_to_ref(pick(got), pick(reference), pick(expected), tiny=MODEL_TINY, what=f"{family} {method} logits")
    layer = prompt_learning_layer(model)
    saved = load_file(directory / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(layer.prompt_embeddings(), saved)
    assert not any(p.requires_grad for p in model.parameters())  # PEFT's loaded form: frozen
    heads = [name for name, _ in saved_modules(model)]
    assert heads == (["classifier"] if family == "bert" else [])


def _fastpeft_model(family, method, seed=7):
    build, _ = FAMILIES[family]
    model = build()
    if method.startswith("prefix"):
        apply_prefix_tuning(model, P, prefix_projection=method == "prefix_projected",
                            encoder_hidden_size=24 if method == "prefix_projected" else None)
    elif method == "prompt":
        apply_prompt_tuning(model, P)
    else:
        apply_prompt_tuning(model, P, encoder=method.rsplit("_", 1)[1], encoder_hidden_size=24)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prompt_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_save_peft_loads_in_peft(tmp_path, family, method):
    model = _fastpeft_model(family, method)
    save_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == FAMILIES[family][1].value
    peft_model = _peft_loaded(tmp_path, family)
    with torch.no_grad():
        ours = _outputs(model, family)
        theirs = _peft_outputs(peft_model, family, method)
        reference = _peft_outputs(_peft_loaded(tmp_path, family, torch.float64), family, method)
        saved = prompt_learning_layer(model).prompt_embeddings()
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight.detach(), saved)
    pick = lambda t: _real_positions(t, family, method)  # noqa: E731
    assert_close_to_ref(pick(ours), pick(reference), pick(theirs), tiny=MODEL_TINY, what=f"{family} {method} logits")


def test_saved_config_is_peft_s_own(tmp_path):
    """save_peft writes the method fields PEFT writes for the same model and method."""
    model = _fastpeft_model("llama", "prefix_projected")
    save_peft(model, tmp_path / "ours")
    get_peft_model(tiny_llama(), METHODS["prefix_projected"](TaskType.CAUSAL_LM)).save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    theirs.pop("peft_version", None)
    assert {k: ours.get(k) for k in theirs} == theirs


def test_lora_round_trip_through_load_and_save_peft(tmp_path):
    model = apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    save_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    loaded = load_peft(tiny_llama(), tmp_path)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        peft_logits = PeftModel.from_pretrained(tiny_llama(), tmp_path)(ids).logits
    assert torch.allclose(peft_logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_infer_task_type():
    assert infer_task_type(tiny_llama()) == "CAUSAL_LM"
    assert infer_task_type(tiny_gpt2()) == "CAUSAL_LM"
    assert infer_task_type(tiny_bert_classifier()) == "SEQ_CLS"
    assert infer_task_type(torch.nn.Linear(2, 2)) == "FEATURE_EXTRACTION"


# --------------------------------------------------------------------------- rejected input, model untouched
def _snapshot(model):
    return ({n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            [n for n, _ in model.named_modules()])


def _assert_untouched(model, snapshot):
    params, modules = snapshot
    assert [n for n, _ in model.named_modules()] == modules
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for name, (value, requires_grad) in params.items():
        assert torch.equal(now[name], value) and now[name].requires_grad == requires_grad, name
    assert prompt_learning_layer(model) is None


def _rewrite_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unsupported_peft_type_lists_the_supported(tmp_path):
    directory = _peft_checkpoint(tmp_path, "llama", "prefix")
    _rewrite_config(directory, peft_type="IA3")
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="IA3") as info:
        load_peft(model, directory)
    assert all(t in str(info.value) for t in SUPPORTED_PEFT_TYPES)
    _assert_untouched(model, before)


def _narrow_llama():
    """A Llama whose hidden size (48) differs from the tiny models' 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("method", ["prefix", "prompt", "p_tuning_mlp"])
def test_checkpoint_of_another_model_is_rejected_untouched(tmp_path, method):
    directory = _peft_checkpoint(tmp_path, "llama", method)
    model = tiny_llama_head_dim() if method == "prefix" else _narrow_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="token_dim|shape|model"):
        load_peft(model, directory)
    _assert_untouched(model, before)


def test_tensor_shape_not_matching_its_config_is_rejected_untouched(tmp_path):
    directory = _peft_checkpoint(tmp_path, "llama", "prompt")
    path = directory / "adapter_model.safetensors"
    save_file({"prompt_embeddings": torch.randn(P + 1, 64)}, str(path))
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="prompt_embeddings"):
        load_peft(model, directory)
    _assert_untouched(model, before)


@pytest.mark.parametrize("bad", [0, -3, 2.5, None, True])
def test_bad_num_virtual_tokens_in_config(tmp_path, bad):
    directory = _peft_checkpoint(tmp_path, "llama", "prompt")
    _rewrite_config(directory, num_virtual_tokens=bad)
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        load_peft(model, directory)
    _assert_untouched(model, before)


def test_extra_tensors_and_pickle_only_are_rejected(tmp_path):
    directory = _peft_checkpoint(tmp_path, "llama", "prompt")
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({**tensors, "extra": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="neither 'prompt_embeddings'"):
        load_peft(tiny_llama(), directory)
    os.remove(path)
    (directory / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        load_peft(tiny_llama(), directory)


def test_second_method_and_empty_save_are_rejected(tmp_path):
    directory = _peft_checkpoint(tmp_path, "llama", "prompt")
    model = load_peft(tiny_llama(), directory)
    with pytest.raises(ValueError, match="already has"):
        load_peft(model, directory)
    with pytest.raises(ValueError, match="no adapter"):
        save_peft(tiny_llama(), tmp_path / "empty")
    both = apply_lora(_fastpeft_model("llama", "prompt"), ["q_proj"], r=2)
    with pytest.raises(ValueError, match="both LoRA"):
        save_peft(both, tmp_path / "both")
    with pytest.raises(TypeError, match="task_type"):
        save_peft(model, tmp_path / "x", task_type=3)
