"""apply_prompt_tuning on tiny transformers models: what the hook does to a call, generation, inits, bad input.

References are float64 copies of the base model called directly with the
prompt prepended by hand (docs/architecture.md, "Numerics and tests"); HF PEFT
parity is in test_prompt_tuning_peft_parity.py.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import VOCAB, tiny_bert, tiny_bert_classifier, tiny_gpt2, tiny_llama
from numerics import assert_close_to_ref
from torch import nn

from fastpeft.injection.prompt_tuning import apply_prompt_tuning
from fastpeft.nn.prompt_encoder import PromptEmbedding, PromptEncoder
from fastpeft.nn.prompt_learning import PROMPT_MODULE_NAME, prompt_learning_layer

P = 4
MODEL_TINY = 2e-6  # whole-model fp32 floor, as in test_peft_backend.py
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert_cls": tiny_bert_classifier, "bert": tiny_bert}
KEY = {"llama": "logits", "gpt2": "logits", "bert_cls": "logits", "bert": "last_hidden_state"}


def _ids(batch=3, seq=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g, device="cpu").to(torch.get_default_device())
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def _prompted(name, seed=0, **kwargs):
    model = apply_prompt_tuning(BUILDERS[name](seed=seed), P, **kwargs)
    with torch.no_grad():  # prompts of the word embeddings' scale (the MLP output is tiny otherwise)
        for p in prompt_learning_layer(model).parameters():
            p.mul_(0.5)
    return model


def _by_hand(base, prompts, ids, mask, **kwargs):
    """The base model called with the prompt prepended by hand (the semantics under test)."""
    embeds = base.get_input_embeddings()(ids)
    embeds = torch.cat((prompts.to(embeds.dtype).expand(ids.shape[0], -1, -1), embeds), 1)
    mask = torch.cat((torch.ones(ids.shape[0], P, dtype=mask.dtype), mask), 1)
    return base(inputs_embeds=embeds, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("encoder", [None, "mlp", "lstm"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_forward_and_prompt_grads_match_float64_reference(name, encoder):
    model = _prompted(name, encoder=encoder, encoder_hidden_size=None if encoder is None else 20)
    layer = prompt_learning_layer(model)
    base32 = BUILDERS[name]()
    base64 = BUILDERS[name]().double()
    layer64 = copy.deepcopy(layer).double()
    ids, mask = _ids()
    key = KEY[name]
    out = model(input_ids=ids, attention_mask=mask)[key]
    with torch.no_grad():
        torch_out = _by_hand(base32, layer.prompts(), ids, mask)[key]
    ref = _by_hand(base64, layer64.prompts(), ids, mask)[key]
    assert out.shape == ref.shape
    if name != "bert_cls":
        assert out.shape[1] == P + ids.shape[1]
    assert_close_to_ref(out, ref, torch_out, what=key, tiny=MODEL_TINY)

    layer32 = copy.deepcopy(layer)
    torch_out = _by_hand(base32, layer32.prompts(), ids, mask)[key]
    weights = torch.randn(out.shape, dtype=torch.float64)
    for o in (out, ref, torch_out):
        (o * weights.to(o.dtype)).sum().backward()
    ref_params, torch_params = dict(layer64.named_parameters()), dict(layer32.named_parameters())
    for pname, p in layer.named_parameters():
        assert_close_to_ref(p.grad, ref_params[pname].grad, torch_params[pname].grad, what=pname, tiny=MODEL_TINY)
    head = ".modules_to_save." if name == "bert_cls" else None  # PEFT trains a classifier's head
    assert all(p.grad is None for n, p in model.named_parameters()
               if not n.startswith(PROMPT_MODULE_NAME) and not (head and head in n))


def test_causal_lm_labels_ignore_virtual_tokens():
    model = _prompted("llama")
    ids, mask = _ids()
    labels = ids.clone()
    labels[mask == 0] = -100
    out = model(ids, mask, labels=labels)
    # Shifted CE: the last virtual position predicts the first real token; virtual labels are ignored.
    expected = F.cross_entropy(out.logits[:, P - 1:-1].reshape(-1, VOCAB).double(), labels.reshape(-1),
                               ignore_index=-100)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=0)


def test_positional_inputs_and_inputs_embeds_give_the_same_output():
    model = _prompted("llama", encoder="mlp")
    ids, mask = _ids()
    by_name = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(model(ids, mask).logits, by_name, rtol=0, atol=0)
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits, by_name, rtol=0, atol=0)
    gpt2 = _prompted("gpt2")  # its second positional parameter is the cache, not the mask
    torch.testing.assert_close(gpt2(ids).logits, gpt2(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        model(attention_mask=mask)
    with pytest.raises(TypeError, match="multiple values"):
        model(ids, input_ids=ids)


def test_batch_size_may_change_between_calls():
    model = _prompted("gpt2", encoder="lstm")
    ids, _ = _ids(batch=4)
    full = model(ids).logits
    for batch in (1, 3, 4):
        torch.testing.assert_close(model(ids[:batch]).logits, full[:batch], rtol=1e-5, atol=1e-6)


def test_token_type_ids_and_position_ids_follow_peft():
    ids, mask = _ids()
    types = torch.ones_like(ids)
    cls = _prompted("bert_cls")
    base = tiny_bert_classifier()
    with torch.no_grad():
        expected = _by_hand(base, prompt_learning_layer(cls).prompts(), ids, mask,
                            token_type_ids=torch.cat((torch.zeros(3, P, dtype=torch.long), types), 1)).logits
        torch.testing.assert_close(cls(ids, mask, types).logits, expected, rtol=1e-6, atol=1e-6)
        bert = _prompted("bert")  # feature extraction: PEFT drops token_type_ids, with a warning
        with pytest.warns(UserWarning, match="token_type_ids are ignored"):
            dropped = bert(ids, mask, types).last_hidden_state
        torch.testing.assert_close(dropped, bert(ids, mask).last_hidden_state, rtol=0, atol=0)
        llama = _prompted("llama")
        with pytest.warns(UserWarning, match="position_ids are ignored"):
            shifted = llama(ids, mask, position_ids=torch.arange(6).expand(3, -1) + 5).logits
        torch.testing.assert_close(shifted, llama(ids, mask).logits, rtol=0, atol=0)


def test_only_prompt_parameters_train():
    model = _prompted("llama", encoder="mlp").train()
    layer = prompt_learning_layer(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{PROMPT_MODULE_NAME}.{n}" for n, _ in layer.named_parameters()}
    assert [id(p) for p in layer.peft_parameters()] == [id(p) for p in layer.parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, mask = _ids()
    model(ids, mask, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_classifier_head_trains_as_in_peft_unless_told_otherwise():
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from fastpeft.injection.prompt_learning import prompt_parameters

    peft_model = get_peft_model(tiny_bert_classifier(), PromptTuningConfig(task_type=TaskType.SEQ_CLS,
                                                                           num_virtual_tokens=P))
    peft_trainable = {n.replace("base_model.", "", 1).replace("prompt_encoder.default.", f"{PROMPT_MODULE_NAME}.")
                      for n, p in peft_model.named_parameters() if p.requires_grad}
    model = apply_prompt_tuning(tiny_bert_classifier(), P)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == peft_trainable
    assert {id(p) for p in prompt_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    frozen_head = apply_prompt_tuning(tiny_bert_classifier(), P, modules_to_save=[])
    assert {n for n, p in frozen_head.named_parameters() if p.requires_grad} == {
        f"{PROMPT_MODULE_NAME}.embedding.weight"}
    loaded_form = apply_prompt_tuning(tiny_bert_classifier(), P, inference_mode=True)
    assert not any(p.requires_grad for p in loaded_form.parameters())


def test_lora_applied_before_stays_trainable():
    from fastpeft.injection.lora import apply_lora, lora_parameters

    model = apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=2)
    lora = {id(p) for p in lora_parameters(model)}
    assert lora and all(p.requires_grad for p in lora_parameters(model))
    apply_prompt_tuning(model, P)
    prompt = {id(p) for p in prompt_learning_layer(model).parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == lora | prompt


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(5)  # the same encoder weights both times
        model = _prompted("llama", encoder="mlp").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_activation_checkpointing
        ids, mask = _ids()
        model(ids, mask, labels=ids).loss.backward()
        grads.append([p.grad for p in prompt_learning_layer(model).parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_torch_compile_fullgraph_traces_the_hook():
    """Dynamo traces the pre-hook with the model in one graph (aot_eager: no codegen, same numbers as eager)."""
    torch.manual_seed(6)
    model = _prompted("llama", encoder="mlp")
    ids, mask = _ids()
    eager = model(ids, mask, labels=ids)
    eager.loss.backward()
    eager_grads = [p.grad.clone() for p in prompt_learning_layer(model).parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, mask, labels=ids)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=0, atol=0)
    compiled.loss.backward()
    for p, g in zip(prompt_learning_layer(model).parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-9)


def _greedy_without_cache(model, ids, mask, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids, mask).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("encoder", [None, "mlp"])
def test_generate_prepends_once_and_decode_steps_see_the_prompt(encoder):
    model = _prompted("llama", encoder=encoder)
    calls = []
    model.model.register_forward_pre_hook(
        lambda m, a, k: calls.append(tuple(k["inputs_embeds"].shape) if k.get("inputs_embeds") is not None
                                     else ("ids", tuple(k["input_ids"].shape), tuple(k["attention_mask"].shape))),
        with_kwargs=True)
    ids, mask = _ids(batch=3, seq=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generate's position_ids are dropped, as PEFT does
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    # Prefill: P + 5 embeddings; decode steps: one token id, the mask covering P + everything so far.
    assert calls == [(3, P + 5, 64)] + [("ids", (3, 1), (3, P + 5 + i)) for i in range(1, 4)]
    expected = _greedy_without_cache(model, ids, mask, 4)
    assert torch.equal(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        no_cache = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(no_cache, expected)


def test_beam_search_with_cache_equals_without():
    model = _prompted("llama", encoder="lstm")
    ids, mask = _ids(batch=2, seq=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False,
                                  use_cache=False)
    assert cached.shape == (2, 9) and torch.equal(cached, uncached)


def test_generate_from_inputs_embeds():
    model = _prompted("llama", encoder="mlp")
    ids, mask = _ids(batch=2, seq=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_ids = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                                     max_new_tokens=4, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 5:])


def test_mlp_encoder_ignores_encoder_num_layers_with_a_warning_as_peft():
    with pytest.warns(UserWarning, match="encoder_num_layers=3 is ignored"):
        model = apply_prompt_tuning(tiny_llama(), P, encoder="mlp", encoder_num_layers=3)
    layer = prompt_learning_layer(model)
    assert [type(m) for m in layer.mlp_head] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert layer.peft_config()["encoder_num_layers"] == 3


def test_bf16_model_trains_fp32_prompt_and_generates():
    model = apply_prompt_tuning(tiny_llama(dtype=torch.bfloat16), P, encoder="lstm")
    layer = prompt_learning_layer(model)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    base_bf16 = tiny_llama(dtype=torch.bfloat16)
    base64 = copy.deepcopy(base_bf16).double()  # the bf16 weights, exactly
    layer64 = copy.deepcopy(layer).double()
    ids, mask = _ids()
    out = model(ids, mask).logits
    assert out.dtype == torch.bfloat16
    ref = _by_hand(base64, layer64.prompts(), ids, mask).logits
    with torch.no_grad():
        torch_out = _by_hand(base_bf16, layer.prompts(), ids, mask).logits
    assert_close_to_ref(out, ref, torch_out, what="bf16 logits")
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert got.shape == (3, 9)
    # The first new token comes from the prefill, the same computation as a full forward.
    assert torch.equal(got[:, 6], out[:, -1].argmax(-1))


def test_inits_sample_vocab_and_text():
    model = apply_prompt_tuning(tiny_llama(), 6, init="sample_vocab")
    vocab_rows = model.get_input_embeddings().weight
    prompt = prompt_learning_layer(model).embedding.weight
    assert all(any(torch.equal(row, v) for v in vocab_rows) for row in prompt)

    class Tokenizer:  # a tokenizer's call signature; the real one is in the PEFT parity test
        name_or_path = "local/tok"

        def __call__(self, text):
            return {"input_ids": [7, 9, 11]}

    for count, ids in ((8, [7, 9, 11, 7, 9, 11, 7, 9]), (2, [7, 9])):
        model = apply_prompt_tuning(tiny_llama(), count, init="text", init_text="hello", tokenizer=Tokenizer())
        layer = prompt_learning_layer(model)
        assert torch.equal(layer.embedding.weight, model.get_input_embeddings().weight[ids])
        assert layer.peft_config()["tokenizer_name_or_path"] == "local/tok"
        assert layer.peft_config()["prompt_tuning_init"] == "TEXT"


def test_inference_mode_and_loading_the_saved_embeddings():
    trained = _prompted("llama", encoder="lstm", encoder_dropout=0.3, encoder_num_layers=2).train()
    layer = prompt_learning_layer(trained)
    saved = layer.prompt_embeddings()
    assert layer.training and not saved.requires_grad
    torch.testing.assert_close(saved, layer.prompt_embeddings(), rtol=0, atol=0)  # no dropout in the saved form
    loaded = apply_prompt_tuning(tiny_llama(), P, encoder="lstm", encoder_dropout=0.3, inference_mode=True)
    inference = prompt_learning_layer(loaded)
    assert inference.lstm_head is None and inference.mlp_head is None and inference.peft_parameters() == []
    assert inference.peft_config() == layer.peft_config()
    inference.load_prompt_embeddings(saved)
    ids, mask = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask).logits, trained.eval()(ids, mask).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="inference_mode"):
        layer.load_prompt_embeddings(saved)
    text = apply_prompt_tuning(tiny_llama(), P, init="text", init_text="hi", tokenizer="org/tok", inference_mode=True)
    assert prompt_learning_layer(text).peft_config()["tokenizer_name_or_path"] == "org/tok"


def test_deepcopy_keeps_an_independent_working_copy():
    model = _prompted("gpt2", encoder="mlp")
    clone = copy.deepcopy(model)
    ids, _ = _ids()
    torch.testing.assert_close(clone(ids).logits, model(ids).logits, rtol=0, atol=0)
    with torch.no_grad():
        prompt_learning_layer(clone).embedding.weight.add_(1.0)
    assert not torch.equal(clone(ids).logits, model(ids).logits)


class _Tok:
    name_or_path = "t"

    def __call__(self, text):
        return {"input_ids": [VOCAB + 3]}


BAD = [
    (dict(num_virtual_tokens=0), ValueError, "num_virtual_tokens"),
    (dict(num_virtual_tokens=-2), ValueError, "num_virtual_tokens"),
    (dict(num_virtual_tokens=2.0), TypeError, "num_virtual_tokens"),
    (dict(num_virtual_tokens=True), TypeError, "num_virtual_tokens"),
    (dict(init="zeros"), ValueError, "init"),
    (dict(init=3), TypeError, "init"),
    (dict(encoder="gru"), ValueError, "encoder"),
    (dict(init="text", init_text="hi"), ValueError, "tokenizer"),
    (dict(init="text", tokenizer=_Tok()), ValueError, "init_text"),
    (dict(init="text", init_text="", tokenizer=_Tok()), ValueError, "init_text"),
    (dict(init="text", init_text="hi", tokenizer=_Tok()), ValueError, "vocabulary"),
    (dict(init="text", init_text="hi", tokenizer="org/tok"), TypeError, "tokenizer"),
    (dict(init="text", init_text="hi", tokenizer=42), TypeError, "tokenizer"),
    (dict(init_text="hi"), ValueError, "init_text"),
    (dict(encoder="mlp", encoder_hidden_size=0), ValueError, "encoder_hidden_size"),
    (dict(encoder="mlp", encoder_hidden_size=1.5), TypeError, "encoder_hidden_size"),
    (dict(encoder="lstm", encoder_num_layers=0), ValueError, "encoder_num_layers"),
    (dict(encoder="lstm", encoder_dropout=1.0), ValueError, "encoder_dropout"),
    (dict(encoder="lstm", encoder_dropout="0.1"), TypeError, "encoder_dropout"),
    (dict(encoder="mlp", init="sample_vocab"), ValueError, "init"),
    (dict(encoder_hidden_size=8), ValueError, "encoder"),
    (dict(inference_mode=1), TypeError, "inference_mode"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD)
def test_bad_arguments_raise_before_the_model_changes(kwargs, exc, match):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"num_virtual_tokens": P, **kwargs}
    with pytest.raises(exc, match=match):
        apply_prompt_tuning(model, **kwargs)
    assert prompt_learning_layer(model) is None and not hasattr(model, PROMPT_MODULE_NAME)
    assert not model._forward_pre_hooks
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bare_decoder_is_feature_extraction():
    model = apply_prompt_tuning(tiny_llama().model, P)
    assert prompt_learning_layer(model).task_type == "FEATURE_EXTRACTION"
    ids, mask = _ids()
    assert model(ids, mask).last_hidden_state.shape == (3, P + 6, 64)


def test_unsupported_models_and_applying_twice():
    from transformers import BertConfig, BertForMaskedLM

    with pytest.raises(TypeError, match="model"):
        apply_prompt_tuning("model", P)
    with pytest.raises(ValueError, match="model"):
        apply_prompt_tuning(nn.Linear(4, 4), P)
    mlm = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32))
    with pytest.raises(ValueError, match="not supported"):
        apply_prompt_tuning(mlm, P)
    model = apply_prompt_tuning(tiny_llama(), P)
    hooks = dict(model._forward_pre_hooks)
    with pytest.raises(ValueError, match="already has PROMPT_TUNING"):
        apply_prompt_tuning(model, P, encoder="mlp")
    assert dict(model._forward_pre_hooks) == hooks
    assert isinstance(prompt_learning_layer(model), PromptEmbedding)


def test_four_d_attention_mask_is_refused():
    model = _prompted("llama")
    ids, _ = _ids()
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, torch.ones(3, 1, 6, 6))


class _Prompts(nn.Module):
    """Wraps a layer so that functional_call can feed ``prompts()`` its parameters."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self):
        return self.layer.prompts()


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_prompt_encoder_gradcheck_float64(encoder):
    wrapped = _Prompts(PromptEncoder(3, 5, encoder=encoder, encoder_hidden_size=4).double())
    names = [n for n, _ in wrapped.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in wrapped.parameters())

    def prompts(*values):
        return torch.func.functional_call(wrapped, dict(zip(names, values)), ())

    assert torch.autograd.gradcheck(prompts, params)
