"""PEFT's checkpoint and workflow conventions in fastpeft, with HF PEFT as the oracle.

``load_peft``'s ``is_trainable`` rule (PEFT's default, one rule for every
``peft_type``), PEFT's SEQ_CLS ``modules_to_save`` list (names a model lacks
skipped), resuming prompt tuning (the next step equals PEFT's), one-call QLoRA
loading, merge-then-unload, ``merge_and_unload`` and ``print_trainable_parameters``.
"""
import copy

import pytest
import torch
from models import tiny_bert_classifier, tiny_llama, tiny_roberta_classifier, token_ids
from numerics import assert_close_to_ref
from peft import (LoraConfig, PeftModel, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model,
                  set_peft_model_state_dict)
from safetensors.torch import load_file

import fastpeft
from fastpeft.injection import trainable_parameter_counts
from fastpeft.injection.lora import apply_lora
from fastpeft.injection.qlora import apply_qlora
from fastpeft.integrations.peft.checkpoints import load_peft
from fastpeft.nn.modules_to_save import saved_modules
from fastpeft.nn.prompt_learning import prompt_learning_layer

MODEL_TINY = 2e-6  # a few fp32 ulp of whole-model outputs (as tests/integrations/test_peft_checkpoints.py)


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def tiny_llama_classifier(seed: int = 0, dtype: torch.dtype = torch.float32):
    """LlamaForSequenceClassification: PEFT's SEQ_CLS head is ``score``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=3,
                         pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).to(dtype).eval()


CLASSIFIERS = {"bert": (tiny_bert_classifier, ["query", "value"]),
               "roberta": (tiny_roberta_classifier, ["query", "value"]),
               "llama": (tiny_llama_classifier, ["q_proj", "v_proj"])}


def _randomize(module, names, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("family", list(CLASSIFIERS))
def test_peft_seq_cls_lora_checkpoint_loads_with_peft_logits(tmp_path, family):
    build, targets = CLASSIFIERS[family]
    peft_model = get_peft_model(build(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                                    target_modules=targets))
    _randomize(peft_model, ["lora_B", "modules_to_save"])
    peft_model.save_pretrained(tmp_path)
    ids = token_ids(batch=1, seq=7, seed=3).clamp(min=2)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(build(), tmp_path)(ids).logits
        reference = PeftModel.from_pretrained(build(dtype=torch.float64), tmp_path)(ids).logits
        model = load_peft(build(), tmp_path)
        got = model(ids).logits
    assert_close_to_ref(got, reference, expected, tiny=MODEL_TINY, what=f"{family} SEQ_CLS logits")
    head = "score" if family == "llama" else "classifier"
    assert [name for name, _ in saved_modules(model)] == [head]
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_is_trainable_is_one_rule_for_lora(tmp_path):
    model = apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    _randomize(model, ["lora_B"])
    fastpeft.save_peft(model, tmp_path)
    frozen = load_peft(tiny_llama().train(), tmp_path)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    trainable = load_peft(tiny_llama(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable_parameter_counts(trainable) == peft_model.get_nb_trainable_parameters()
    with pytest.raises(TypeError, match="is_trainable"):
        load_peft(tiny_llama(), tmp_path, is_trainable=1)


def test_print_trainable_parameters_is_peft_s(tmp_path, capsys):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.print_trainable_parameters()
    theirs = capsys.readouterr().out
    fastpeft.print_trainable_parameters(apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=4))
    assert capsys.readouterr().out == theirs


def _prompt_checkpoint(tmp_path, config):
    peft_model = get_peft_model(tiny_llama(), config)
    _randomize(peft_model, ["prompt_encoder"])
    peft_model.save_pretrained(tmp_path)
    return tmp_path


def _one_sgd_step(model, params):
    ids = token_ids(batch=2, seq=6, seed=4)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= 0.5 * p.grad
    return loss.detach()


def test_is_trainable_resumes_prompt_tuning_as_peft(tmp_path):
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    directory = _prompt_checkpoint(tmp_path, config)
    results = {}
    for dtype in (torch.float32, torch.float64):
        # PEFT's resume: a fresh trainable prompt, the saved state loaded into it.
        peft_model = get_peft_model(tiny_llama(dtype=dtype), copy.deepcopy(config))
        set_peft_model_state_dict(peft_model, load_file(directory / "adapter_model.safetensors"))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        results[dtype] = (_one_sgd_step(peft_model, params), params[0].detach().clone())
    model = load_peft(tiny_llama(), directory, is_trainable=True)
    layer = prompt_learning_layer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params == [layer.embedding.weight]
    loss = _one_sgd_step(model, params)
    assert_close_to_ref(loss, results[torch.float64][0], results[torch.float32][0], tiny=MODEL_TINY, what="loss")
    assert_close_to_ref(layer.prompt_embeddings(), results[torch.float64][1], results[torch.float32][1],
                        tiny=MODEL_TINY, what="prompt after one step")


def test_is_trainable_refuses_p_tuning_untouched(tmp_path):
    directory = _prompt_checkpoint(tmp_path, PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4,
                                                                 encoder_hidden_size=24))
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="encoder's output"):
        load_peft(model, directory, is_trainable=True)
    assert prompt_learning_layer(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_merge_then_unload_keeps_the_merge():
    model = apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=4)
    _randomize(model, ["lora_B"])
    ids = token_ids()
    with torch.no_grad():
        tuned = model(ids).logits
        fastpeft.merge_lora(model)
        fastpeft.unload_lora(model)
        assert not fastpeft.injection.lora_modules(model)
        assert_close_to_ref(model(ids).logits, tuned.double(), tuned, tiny=MODEL_TINY, what="merged then unloaded")
        assert not torch.allclose(model(ids).logits, tiny_llama()(ids).logits, atol=1e-3)


def test_merge_and_unload_alias_and_qlora_merge_then_unload_refused():
    model = apply_lora(tiny_llama(), ["q_proj"], r=4)
    _randomize(model, ["lora_B"])
    twin = copy.deepcopy(model)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(fastpeft.merge_and_unload(model)(ids).logits,
                           fastpeft.merge_lora(twin, unload=True)(ids).logits)
    qmodel = apply_qlora(tiny_llama(), ["q_proj"], r=4)
    fastpeft.merge_lora(qmodel)
    with pytest.raises(ValueError, match=r"merge_lora\(model, unload=True\)"):
        fastpeft.unload_lora(qmodel)
    assert fastpeft.injection.lora_modules(qmodel)


def test_load_qlora_takes_dropout_from_the_checkpoint(tmp_path):
    trained = apply_qlora(tiny_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.1)
    _randomize(trained, ["lora_B"])
    fastpeft.save_peft(trained, tmp_path)
    model = fastpeft.load_qlora(tiny_llama(), tmp_path)
    layers = dict(fastpeft.injection.lora_modules(model))
    assert sorted(layers) == sorted(n for n, _ in fastpeft.injection.lora_modules(trained))
    assert all(layer.lora_dropout == 0.1 for layer in layers.values())
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, trained.eval()(ids).logits)
