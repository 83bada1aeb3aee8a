"""apply_prefix_tuning against HF PEFT's prefix tuning on the same weights (PEFT is the oracle).

For every family (Llama with GQA, Llama with an explicit head_dim, Mistral with
one KV head, Qwen2 (q/k/v biases), GPT-2, BERT, BERT and RoBERTa classifiers), plain and projected, with left and right
padding: logits and the gradients of every prefix parameter against PEFT in
float32, both measured against PEFT in float64 (docs/architecture.md,
"Numerics and tests"); PEFT's config fields, saved tensor and checkpoints;
greedy generation; bf16 models and fp32 models under bf16 autocast.

Two PEFT 0.21.2 + transformers 5.24 defects shape the oracles here:
- ``PeftModelForSequenceClassification`` raises "Model does not support past
  key values" for prefix tuning (it looks for a ``past_key_values`` parameter,
  which transformers renamed ``cache``). The classifier oracle is the rest of
  PEFT's ``_prefix_tuning_forward``: PEFT's ``get_prompt`` cache and the
  prefix-extended mask passed to the base model (``_peft_reference``);
  ``test_reference_path_is_pefts_forward`` shows it equals PEFT's own forward
  where that runs (``BertModel``).
- ``PeftModelForCausalLM.generate`` ignores the prefix (its injected
  ``past_key_values`` loses against the ``cache`` kwarg transformers passes), so
  greedy generation is compared with greedy decoding through PEFT's forward,
  with the position ids ``generate`` gives.
"""
from __future__ import annotations

import pytest
import torch
from models import (tiny_bert, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_llama_head_dim,
                    tiny_roberta_classifier, token_ids)
from numerics import assert_close_to_ref, rel_err
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fastpeft.injection.prefix_tuning import apply_prefix_tuning, prefix_encoder

P = 4
ENC = 24  # encoder_hidden_size of the projected variant
# Whole-model fp32 outputs differ from the float64 reference by a few ulp on both sides; their ratio is noise, so
# model-level checks add a floor of ~16 fp32 ulp (a wrong position, mask or prefix layout is off by 1e-2 or more).
MODEL_TINY = 2e-6



def _tiny_llama_family(config_cls, model_cls, **extra):
    def build(seed: int = 0, dtype: torch.dtype = torch.float32):
        config = config_cls(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False, **extra)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config)
        return model.to(dtype).eval()
    return build


tiny_mistral_mqa = _tiny_llama_family(MistralConfig, MistralForCausalLM, num_key_value_heads=1, sliding_window=None)
tiny_qwen2 = _tiny_llama_family(Qwen2Config, Qwen2ForCausalLM, num_key_value_heads=2)  # q/k/v biases

FAMILIES = {
    # name: (builder, PEFT task type, pad token id)
    "llama": (tiny_llama, "CAUSAL_LM", 0),
    "llama_head_dim": (tiny_llama_head_dim, "CAUSAL_LM", 0),
    "mistral_mqa": (tiny_mistral_mqa, "CAUSAL_LM", 0),
    "qwen2": (tiny_qwen2, "CAUSAL_LM", 0),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", 0),
    "bert": (tiny_bert, "FEATURE_EXTRACTION", 0),
    "bert_classifier": (tiny_bert_classifier, "SEQ_CLS", 0),
    "roberta_classifier": (tiny_roberta_classifier, "SEQ_CLS", 1),
}


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def _config(task, projected, **extra):
    return PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=projected,
                              encoder_hidden_size=ENC if projected else None, **extra)


def _peft_pair(family, projected, dtype=torch.float32, scale=1.0):
    """(PEFT model, fastpeft model) on two copies of one tiny model with the same random prefix weights."""
    builder, task, _ = FAMILIES[family]
    peft_model = get_peft_model(builder(dtype=dtype), _config(task, projected))
    encoder = peft_model.prompt_encoder["default"]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    ours = apply_prefix_tuning(builder(dtype=dtype), P, projected, ENC if projected else None)
    prefix_encoder(ours).load_state_dict(encoder.state_dict())
    return peft_model, ours


def _peft64(family, projected, peft_model):
    """PEFT on a float64 copy of the model, prefix encoder in float64 too: the reference."""
    builder, task, _ = FAMILIES[family]
    ref = get_peft_model(builder(dtype=torch.float64), _config(task, projected))
    ref.prompt_encoder["default"].double().load_state_dict(peft_model.prompt_encoder["default"].state_dict())
    return ref


def _inputs(family, padding, batch=2, seq=7):
    _, _, pad = FAMILIES[family]
    ids = token_ids(batch, seq, seed=3)
    ids[ids == pad] = pad + 1  # RoBERTa numbers positions by the pad id: real tokens must not be it
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding == "left":
        mask[0, :3] = 0
    elif padding == "right":
        mask[0, -3:] = 0
    ids[mask == 0] = pad
    return ids, mask


def _peft_reference(family, peft_model, ids, mask, **kwargs):
    """PEFT's output. Classifiers: PEFT's forward after its failing signature check (see module docstring)."""
    if FAMILIES[family][1] != "SEQ_CLS":
        return peft_model(input_ids=ids, attention_mask=mask, **kwargs)
    full_mask = torch.cat((torch.ones(ids.shape[0], P, dtype=mask.dtype), mask), dim=1)
    return peft_model.base_model(input_ids=ids, attention_mask=full_mask,
                                 past_key_values=peft_model.get_prompt(ids.shape[0]), **kwargs)


def _output(family, out, mask):
    if family == "bert":  # hidden states; PEFT and we agree on padded rows too, but they are not an output
        return out.last_hidden_state * mask[..., None].to(out.last_hidden_state.dtype)
    return out.logits


def _prefix_grads(model_encoder, out, weight):
    model_encoder.zero_grad()
    (out * weight.to(out.dtype)).sum().backward()
    return {name: p.grad.clone() for name, p in model_encoder.named_parameters()}


@pytest.mark.parametrize("projected", [False, True], ids=["plain", "projected"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_prefix_grads_match_peft(family, padding, projected):
    peft_model, ours = _peft_pair(family, projected)
    peft64 = _peft64(family, projected, peft_model)
    ids, mask = _inputs(family, padding)

    out_peft = _output(family, _peft_reference(family, peft_model, ids, mask), mask)
    out_ref = _output(family, _peft_reference(family, peft64, ids, mask), mask)
    out_ours = _output(family, ours(input_ids=ids, attention_mask=mask), mask)
    assert_close_to_ref(out_ours, out_ref, out_peft, tiny=MODEL_TINY, what=f"{family} output")
    # The prefix matters: the base model alone is far from PEFT's output.
    base = FAMILIES[family][0]()
    out_base = _output(family, base(input_ids=ids, attention_mask=mask), mask)
    assert rel_err(out_base, out_ref) > 1e-3

    weight = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(5))
    g_peft = _prefix_grads(peft_model.prompt_encoder["default"], out_peft, weight)
    g_ref = _prefix_grads(peft64.prompt_encoder["default"], out_ref, weight)
    g_ours = _prefix_grads(prefix_encoder(ours), out_ours, weight)
    assert set(g_ours) == set(g_peft)
    for name in g_ours:
        assert_close_to_ref(g_ours[name], g_ref[name], g_peft[name], tiny=MODEL_TINY, what=f"grad {name}")


def test_reference_path_is_pefts_forward():
    """The classifier oracle (get_prompt cache + extended mask) is PEFT's forward where PEFT's forward runs."""
    peft_model, _ = _peft_pair("bert", projected=True)
    ids, mask = _inputs("bert", "left")
    full_mask = torch.cat((torch.ones(2, P, dtype=mask.dtype), mask), dim=1)
    manual = peft_model.base_model(input_ids=ids, attention_mask=full_mask, past_key_values=peft_model.get_prompt(2))
    real = peft_model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(manual.last_hidden_state, real.last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("projected", [False, True], ids=["plain", "projected"])
@pytest.mark.parametrize("family", ["llama", "llama_head_dim", "gpt2", "bert_classifier"])
def test_peft_config_and_saved_prefix_match_peft(family, projected):
    peft_model, ours = _peft_pair(family, projected)
    encoder = prefix_encoder(ours)
    peft_fields = peft_model.peft_config["default"].to_dict()
    ours_fields = encoder.peft_config()
    assert set(ours_fields) == {"peft_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                "num_attention_heads", "num_layers", "encoder_hidden_size", "prefix_projection"}
    assert ours_fields == {key: peft_fields[key] for key in ours_fields}
    saved = peft_model.get_prompt_embedding_to_save("default")
    torch.testing.assert_close(encoder.prompt_embeddings().cpu(), saved, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("projected", [False, True], ids=["plain", "projected"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_peft_checkpoint_loads_in_inference_mode(family, projected, tmp_path):
    """PEFT saves, PeftModel.from_pretrained loads; apply(inference_mode=True) + the saved tensor is that model."""
    builder, _, _ = FAMILIES[family]
    peft_model, _ = _peft_pair(family, projected)
    peft_model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == {"prompt_embeddings"}
    loaded = PeftModel.from_pretrained(builder(), tmp_path)

    ours = apply_prefix_tuning(builder(), P, projected, ENC if projected else None, inference_mode=True)
    encoder = prefix_encoder(ours)
    assert not hasattr(encoder, "transform") and not any(p.requires_grad for p in ours.parameters())
    encoder.load_prompt_embeddings(saved["prompt_embeddings"])
    assert encoder.peft_config() == {k: loaded.peft_config["default"].to_dict()[k] for k in encoder.peft_config()}

    ids, mask = _inputs(family, "left")
    expected = _output(family, loaded(input_ids=ids, attention_mask=mask), mask)
    got = _output(family, ours(input_ids=ids, attention_mask=mask), mask)
    assert rel_err(got, expected) <= MODEL_TINY
    torch.testing.assert_close(encoder.prompt_embeddings(), saved["prompt_embeddings"], rtol=0, atol=0)


def _greedy_through_forward(model, ids, mask, new_tokens):
    """Greedy decoding by full forwards, with the position ids ``generate`` derives from the mask."""
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat((ids, nxt), 1), torch.cat((mask, torch.ones_like(nxt)), 1)
    return ids


@pytest.mark.parametrize("projected", [False, True], ids=["plain", "projected"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generate_gives_pefts_tokens(family, projected):
    peft_model, ours = _peft_pair(family, projected, scale=4.0)
    ids, mask = _inputs(family, "left", seq=5)
    expected = _greedy_through_forward(peft_model, ids, mask, 6)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                        pad_token_id=FAMILIES[family][2])
    assert got.tolist() == expected.tolist()
    base = FAMILIES[family][0]().generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                         pad_token_id=FAMILIES[family][2])
    assert base.tolist() != expected.tolist()  # the prefix changes the tokens: the comparison means something


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert_classifier"])
def test_bf16_model_matches_peft(family):
    """bf16 base model, fp32 prefix parameters (as PEFT keeps them), prefix cast to bf16 in attention."""
    peft_model, ours = _peft_pair(family, projected=True, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in prefix_encoder(ours).parameters())
    peft64 = _peft64(family, True, peft_model)
    ids, mask = _inputs(family, "left")
    out_peft = _output(family, _peft_reference(family, peft_model, ids, mask), mask)
    out_ref = _output(family, _peft_reference(family, peft64, ids, mask), mask)
    out_ours = _output(family, ours(input_ids=ids, attention_mask=mask), mask)
    assert out_ours.dtype == torch.bfloat16
    assert_close_to_ref(out_ours, out_ref, out_peft, what=f"{family} bf16 output")

    weight = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(5))
    g_peft = _prefix_grads(peft_model.prompt_encoder["default"], out_peft, weight)
    g_ref = _prefix_grads(peft64.prompt_encoder["default"], out_ref, weight)
    g_ours = _prefix_grads(prefix_encoder(ours), out_ours, weight)
    for name in g_ours:
        assert g_ours[name].dtype == torch.float32
        assert_close_to_ref(g_ours[name], g_ref[name], g_peft[name], what=f"bf16 grad {name}")


@pytest.mark.parametrize("family", ["llama", "bert_classifier"])
def test_autocast_bf16_matches_peft(family):
    """fp32 model under torch.autocast(bf16): attention runs in bf16 as SDPA does (RoPE leaves q/k in fp32)."""
    peft_model, ours = _peft_pair(family, projected=False)
    peft64 = _peft64(family, False, peft_model)
    ids, mask = _inputs(family, "right")
    out_ref = _output(family, _peft_reference(family, peft64, ids, mask), mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_peft = _output(family, _peft_reference(family, peft_model, ids, mask), mask)
        out_ours = _output(family, ours(input_ids=ids, attention_mask=mask), mask)
    assert_close_to_ref(out_ours.float(), out_ref, out_peft.float(), what=f"{family} autocast output")
    weight = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(5))
    g_peft = _prefix_grads(peft_model.prompt_encoder["default"], out_peft.float(), weight)
    g_ref = _prefix_grads(peft64.prompt_encoder["default"], out_ref, weight)
    g_ours = _prefix_grads(prefix_encoder(ours), out_ours.float(), weight)
    for name in g_ours:
        assert g_ours[name].dtype == torch.float32
        assert_close_to_ref(g_ours[name], g_ref[name], g_peft[name], what=f"autocast grad {name}")
