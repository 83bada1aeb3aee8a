"""apply_prefix_tuning / PrefixEncoder behaviour: layout, training set-ups, positions, bad input (CPU path).

PEFT parity of values and gradients is in test_prefix_tuning_peft_parity.py;
here each feature is checked against the model itself: gradient checkpointing
and torch.compile against eager, changing batch sizes against one sample at a
time, cached decoding against full forwards, and every bad argument raises
before the model changes.
"""
from __future__ import annotations

import copy

import pytest
import torch
from models import tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_llama_head_dim, tiny_roberta_classifier, token_ids
from numerics import rel_err
from peft import PrefixTuningConfig, get_peft_model
from torch import nn

from fastpeft.injection._prefix_attention_function import (ATTN_IMPLEMENTATION, _attention_with_dropout,
                                                            _padding_mask_function, prefix_attention_forward)
from fastpeft.injection.prefix_tuning import apply_prefix_tuning, prefix_encoder
from fastpeft.injection.prompt_learning import prompt_parameters
from fastpeft.nn.prefix_encoder import PrefixEncoder
from fastpeft.nn.prompt_learning import PROMPT_MODULE_NAME, prompt_learning_layer
from fastpeft.ops.prefix_attention import prefix_attention

P = 3
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert_classifier": tiny_bert_classifier}


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def _prefixed(builder, projected=True, seed=3, **kwargs):
    model = apply_prefix_tuning(builder(), P, projected, 16 if projected else None, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prefix_encoder(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _batch(batch=2, seq=6, left_pad=2):
    ids = token_ids(batch, seq, seed=4)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :left_pad] = 0
    return ids, mask


def _logits_and_grads(model, ids, mask, call=None):
    encoder = prefix_encoder(model)
    encoder.zero_grad()
    out = (model if call is None else call)(input_ids=ids, attention_mask=mask).logits
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in encoder.parameters()]


# ---------------------------------------------------------------------------------------------------- the layer

def test_layer_key_value_is_pefts_cache_layout():
    """Layer i's [1, Hkv, P, hd] keys/values are what PEFT's get_prompt puts in its cache (GQA, explicit head_dim)."""
    peft_model = get_peft_model(tiny_llama_head_dim(), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=16))
    with torch.no_grad():
        for p in peft_model.prompt_encoder["default"].parameters():
            p.normal_()
    encoder = PrefixEncoder(P, num_layers=2, num_kv_heads=2, head_dim=24, prefix_projection=True,
                            encoder_hidden_size=16)
    encoder.load_state_dict(peft_model.prompt_encoder["default"].state_dict())
    cache = peft_model.get_prompt(batch_size=1)
    for layer in range(2):
        k, v = encoder.layer_key_value(layer)
        assert k.shape == v.shape == (1, 2, P, 24)
        torch.testing.assert_close(k, cache.layers[layer].keys, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v, cache.layers[layer].values, rtol=1e-6, atol=1e-6)
    assert encoder.layer_key_value(0, torch.bfloat16)[0].dtype == torch.bfloat16


def test_encoder_parameters_and_inference_mode():
    plain = PrefixEncoder(5, 3, 2, 8)
    assert [n for n, _ in plain.named_parameters()] == ["embedding.weight"]
    assert plain.embedding.weight.shape == (5, 2 * 3 * 16)
    projected = PrefixEncoder(5, 3, 2, 8, prefix_projection=True, encoder_hidden_size=12)
    assert [tuple(p.shape) for p in projected.parameters()] == [(5, 16), (12, 16), (12,), (96, 12), (96,)]
    assert len(projected.peft_parameters()) == 5
    frozen = PrefixEncoder(5, 3, 2, 8, prefix_projection=True, encoder_hidden_size=12, inference_mode=True)
    assert not hasattr(frozen, "transform") and frozen.embedding.weight.shape == (5, 96)
    assert frozen.peft_parameters() == []
    frozen.load_prompt_embeddings(projected.prompt_embeddings())
    for layer in range(3):
        for a, b in zip(frozen.layer_key_value(layer), projected.layer_key_value(layer)):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="inference_mode"):
        projected.load_prompt_embeddings(projected.prompt_embeddings())
    with pytest.raises(ValueError, match="shape"):
        frozen.load_prompt_embeddings(torch.zeros(4, 96))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_virtual_tokens": 0}, ValueError, "num_virtual_tokens"),
    ({"num_virtual_tokens": 2.0}, TypeError, "num_virtual_tokens"),
    ({"num_layers": -1}, ValueError, "num_layers"),
    ({"head_dim": True}, TypeError, "head_dim"),
    ({"prefix_projection": True}, ValueError, "encoder_hidden_size"),
    ({"prefix_projection": 1}, TypeError, "prefix_projection"),
    ({"encoder_hidden_size": 0}, ValueError, "encoder_hidden_size"),
])
def test_encoder_bad_arguments(kwargs, error, match):
    args = {"num_virtual_tokens": 4, "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, **kwargs}
    with pytest.raises(error, match=match):
        PrefixEncoder(**args)


# ---------------------------------------------------------------------------------------------------- apply

@pytest.mark.parametrize("family", list(BUILDERS))
def test_apply_freezes_base_and_registers_one_layer(family):
    model = BUILDERS[family]()
    trainable_before = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable_before
    assert apply_prefix_tuning(model, P, True, 16) is model
    encoder = prompt_learning_layer(model)
    assert encoder is getattr(model, PROMPT_MODULE_NAME) is prefix_encoder(model)
    assert (encoder.peft_kind, encoder.peft_type) == ("prefix", "PREFIX_TUNING")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    heads = [n for n in trainable if ".modules_to_save." in n]  # PEFT trains a sequence classifier's head
    assert bool(heads) == family.endswith("classifier")
    assert trainable and all(n.startswith(PROMPT_MODULE_NAME + ".") for n in trainable if n not in heads)
    assert {id(p) for p in prompt_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    # the attention modules reference the encoder without registering it again
    assert sum(1 for m in model.modules() if m is encoder) == 1


def test_lora_applied_before_stays_trainable():
    from fastpeft.injection.lora import apply_lora

    model = apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=2, init_lora_weights=False)
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    apply_prefix_tuning(model, P)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == lora + [f"{PROMPT_MODULE_NAME}.embedding.weight"]
    ids, mask = _batch()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def _snapshot(model):
    return ({n: p.requires_grad for n, p in model.named_parameters()}, model.config._attn_implementation,
            [(type(m).__name__, len(m._forward_pre_hooks)) for m in model.modules()],
            hasattr(model, PROMPT_MODULE_NAME))


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((0,), {}, ValueError, "num_virtual_tokens"),
    ((-2,), {}, ValueError, "num_virtual_tokens"),
    ((2.5,), {}, TypeError, "num_virtual_tokens"),
    ((True,), {}, TypeError, "num_virtual_tokens"),
    ((P, True), {}, ValueError, "encoder_hidden_size"),
    ((P, True, 0), {}, ValueError, "encoder_hidden_size"),
    ((P, "yes", 8), {}, TypeError, "prefix_projection"),
    ((P,), {"shift_positions": None}, TypeError, "shift_positions"),
    ((P,), {"inference_mode": 1}, TypeError, "inference_mode"),
])
def test_bad_arguments_raise_before_any_change(args, kwargs, error, match):
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        apply_prefix_tuning(model, *args, **kwargs)
    assert _snapshot(model) == before


def test_unsupported_models_raise_type_error_listing_families():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        apply_prefix_tuning("llama", P)
    with pytest.raises(TypeError, match=r"llama.*gpt2.*bert.*roberta"):
        apply_prefix_tuning(nn.Linear(4, 4), P)
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    before = _snapshot(opt)
    with pytest.raises(TypeError, match=r"model_type 'opt'"):
        apply_prefix_tuning(opt, P)
    assert _snapshot(opt) == before


def test_transformers_4_is_rejected_before_any_change(monkeypatch):
    import transformers

    model = tiny_llama()
    before = _snapshot(model)
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(RuntimeError, match="transformers >= 5.0"):
        apply_prefix_tuning(model, P)
    assert _snapshot(model) == before


def test_sliding_window_attention_is_rejected_before_any_change():
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               sliding_window=8))
    before = _snapshot(mistral)
    with pytest.raises(ValueError, match="sliding_window = None"):
        apply_prefix_tuning(mistral, P)
    assert _snapshot(mistral) == before
    mistral.config.sliding_window = None
    assert prefix_encoder(apply_prefix_tuning(mistral, P)).num_kv_heads == 1


def test_applying_twice_raises_and_keeps_the_first():
    model = _prefixed(tiny_gpt2)
    first = prefix_encoder(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="already has PREFIX_TUNING"):
        apply_prefix_tuning(model, 5)
    assert prefix_encoder(model) is first and _snapshot(model) == before


def test_switching_the_attention_implementation_away_raises():
    model = _prefixed(tiny_gpt2)
    ids, mask = _batch()
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="prefix would be ignored"):
        model(input_ids=ids, attention_mask=mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model(input_ids=ids, attention_mask=mask)


def test_one_prompt_learning_method_per_model():
    from fastpeft.injection.prompt_tuning import apply_prompt_tuning

    model = apply_prompt_tuning(tiny_llama(), 2)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="already has PROMPT_TUNING"):
        apply_prefix_tuning(model, P)
    assert _snapshot(model) == before


def test_caches_other_than_dynamic_are_refused():
    """A StaticCache has empty slots after the real keys: the bottom-right causal mask would be wrong there."""
    from transformers import StaticCache

    model = _prefixed(tiny_llama)
    ids, mask = _batch()
    with pytest.raises(ValueError, match="DynamicCache"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match="DynamicCache"):
        model(input_ids=ids, attention_mask=mask, cache=StaticCache(config=model.config, max_cache_len=16))
    with pytest.raises(ValueError, match="DynamicCache only"):
        _padding_mask_function(2, 6, 16, attention_mask=mask.bool())
    assert _padding_mask_function(2, 1, 4, attention_mask=mask.bool()).tolist() == mask[:, :4].bool().tolist()


def test_unbound_attention_with_the_implementation_raises():
    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="no prefix bound"):
        prefix_attention_forward(attention, q, q[:, :2], q[:, :2], None)


# ---------------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_gradient_checkpointing_gives_the_same_grads(family, reentrant):
    ids, mask = _batch()
    plain = _prefixed(BUILDERS[family]).train()
    checkpointed = _prefixed(BUILDERS[family]).train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    out_a, grads_a = _logits_and_grads(plain, ids, mask)
    out_b, grads_b = _logits_and_grads(checkpointed, ids, mask)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b):
        assert b.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_torch_compile_fullgraph_forward_backward_and_new_batch_size():
    """fullgraph tracing (aot_eager: the graph without inductor's codegen time) equals eager, at two batch sizes."""
    torch._dynamo.reset()
    model = _prefixed(tiny_llama).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for batch in (2, 3):
        ids, mask = _batch(batch=batch)
        out_e, grads_e = _logits_and_grads(model, ids, mask)
        out_c, grads_c = _logits_and_grads(model, ids, mask, call=compiled)
        torch.testing.assert_close(out_c, out_e)
        for a, b in zip(grads_e, grads_c):
            torch.testing.assert_close(b, a)


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph():
    """The default backend (inductor's generated code) with fullgraph: forward and backward equal eager."""
    torch._dynamo.reset()
    model = _prefixed(tiny_llama).train()
    compiled = torch.compile(model, fullgraph=True)
    ids, mask = _batch()
    out_e, grads_e = _logits_and_grads(model, ids, mask)
    out_c, grads_c = _logits_and_grads(model, ids, mask, call=compiled)
    assert rel_err(out_c, out_e) < 1e-5
    for a, b in zip(grads_e, grads_c):
        assert rel_err(b, a) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_changing_batch_sizes_match_one_sample_at_a_time(family):
    model = _prefixed(BUILDERS[family])
    ids = token_ids(3, 5, seed=8)
    together = model(input_ids=ids).logits
    for i in range(3):
        alone = model(input_ids=ids[i:i + 1]).logits
        assert rel_err(alone, together[i:i + 1]) < 1e-6
    assert model(input_ids=ids[:1, :2]).logits.shape == (1, 2, 101)


def test_training_with_attention_dropout_uses_the_dropout_path():
    """BERT/GPT-2 default to attention dropout; training then concatenates the prefix and runs SDPA with dropout."""
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    pk, pv = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    mask = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    for causal in (False, True):
        expected = prefix_attention(q, k, v, pk, pv, causal=causal, key_padding_mask=mask, scale=0.3)
        got = _attention_with_dropout(q, k, v, pk, pv, mask, causal, 0.3, dropout=0.0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, attention_probs_dropout_prob=0.5,
                        hidden_dropout_prob=0.0)
    model = apply_prefix_tuning(BertForSequenceClassification(config), P)
    ids, mask = _batch()
    model.eval()
    evaluated = model(input_ids=ids, attention_mask=mask).logits
    model.train()
    trained = model(input_ids=ids, attention_mask=mask).logits
    trained.sum().backward()
    grad = prefix_encoder(model).embedding.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not torch.allclose(trained, evaluated)  # dropout really ran


# ---------------------------------------------------------------------------------------------------- positions, cache

def _position_inputs(module):
    """Positions a module receives: rotary_emb(x, position_ids=...) or a position nn.Embedding(ids)."""
    seen = []

    def hook(mod, args, kwargs, output):
        seen.append(kwargs["position_ids"] if "position_ids" in kwargs else args[-1])

    module.register_forward_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert_classifier"])
def test_shift_positions_option(family):
    """Default: the real tokens are numbered from P (PEFT). shift_positions=False: the model's own numbering."""
    pick = {"llama": lambda m: m.model.rotary_emb, "gpt2": lambda m: m.transformer.wpe,
            "bert_classifier": lambda m: m.bert.embeddings.position_embeddings}[family]
    ids = token_ids(2, 5, seed=9)
    seen = {}
    for shift in (True, False):
        model = _prefixed(BUILDERS[family], shift_positions=shift)
        captured = _position_inputs(pick(model))
        model(input_ids=ids)
        seen[shift] = captured[0]
    assert seen[False].flatten().tolist() == list(range(5))
    assert seen[True].flatten().tolist() == list(range(P, P + 5))


def test_roberta_padding_positions_stay_at_the_padding_index():
    model = _prefixed(tiny_roberta_classifier)
    ids = token_ids(2, 5, seed=9)
    ids[ids == 1] = 2
    ids[0, :2] = 1
    seen = []
    model.roberta.embeddings.position_embeddings.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    model(input_ids=ids, attention_mask=(ids != 1).long())
    assert seen[0].tolist() == [[1, 1, 2 + P, 3 + P, 4 + P], [2 + P, 3 + P, 4 + P, 5 + P, 6 + P]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_decoding_matches_full_forward_and_cache_holds_only_real_tokens(family):
    model = _prefixed(BUILDERS[family])
    ids, mask = _batch(seq=5)
    nxt = token_ids(2, 1, seed=10)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert out.cache.get_seq_length() == 5
    mask2 = torch.cat((mask, torch.ones(2, 1, dtype=mask.dtype)), 1)
    positions = torch.full((2, 1), 5) if family == "gpt2" else None
    step = model(input_ids=nxt, attention_mask=mask2, cache=out.cache, use_cache=True, position_ids=positions)
    full = model(input_ids=torch.cat((ids, nxt), 1), attention_mask=mask2).logits[:, -1:]
    assert rel_err(step.logits, full) < 1e-5


def test_deepcopy_reads_its_own_prefix():
    model = _prefixed(tiny_llama)
    twin = copy.deepcopy(model)
    assert prefix_encoder(twin) is not prefix_encoder(model)
    ids, mask = _batch()
    torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)
    with torch.no_grad():
        prefix_encoder(twin).embedding.weight.mul_(2.0)
    assert rel_err(twin(input_ids=ids, attention_mask=mask).logits,
                   model(input_ids=ids, attention_mask=mask).logits) > 1e-3


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_path_under_the_interpreter(backend, monkeypatch):
    """The Triton kernels take HF's transposed q/k/v views and the [1, Hkv, P, D] prefix views."""
    model = _prefixed(tiny_llama, projected=False)
    ids, mask = _batch(seq=4)
    out, grads = _logits_and_grads(model, ids, mask)
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")
    out_cpu, grads_cpu = _logits_and_grads(model, ids, mask)
    assert rel_err(out, out_cpu) < 1e-5
    for a, b in zip(grads, grads_cpu):
        assert rel_err(a, b) < 1e-5
