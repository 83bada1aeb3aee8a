"""Prompt tuning and P-tuning against HF PEFT 0.21 (the oracle) on tiny Llama (GQA), GPT-2, BERT and RoBERTa.

Both sides are built from the same seed: PEFT's modules are created in the same
order, so the prompt weights must come out identical (checked), then outputs and
the gradients of every prompt parameter (the MLP/LSTM encoder's included) are
compared with left padding, each against a float64 copy of the PEFT model
(docs/architecture.md, "Numerics and tests"). Also: the config fields, the saved
``prompt_embeddings``, loading a PEFT checkpoint, text initialisation with a
tokenizer built here, and greedy generation.
"""
import copy
import json
import warnings

import pytest
import torch
from models import VOCAB, tiny_bert, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_roberta_classifier
from numerics import assert_close_to_ref
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file

from fastpeft.injection.prompt_tuning import apply_prompt_tuning
from fastpeft.nn.prompt_encoder import PromptEmbedding, PromptEncoder
from fastpeft.nn.prompt_learning import prompt_learning_layer

P = 3
# Whole-model fp32 outputs differ from the float64 reference by a few ulp for both sides;
# their ratio is noise, so model-level checks add a floor of ~16 fp32 ulp (as test_peft_backend.py).
MODEL_TINY = 2e-6
# Fields every PEFT config has; the rest of to_dict() are the method's own (what peft_config() returns).
GENERIC_FIELDS = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                  "inference_mode", "modules_to_save"}

MODELS = {
    "llama": (tiny_llama, "CAUSAL_LM", "logits"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", "logits"),
    "bert_cls": (tiny_bert_classifier, "SEQ_CLS", "logits"),
    "roberta_cls": (tiny_roberta_classifier, "SEQ_CLS", "logits"),
    "bert": (tiny_bert, "FEATURE_EXTRACTION", "last_hidden_state"),
}
METHODS = {
    "prompt_random": ({}, dict(prompt_tuning_init="RANDOM")),
    "prompt_sample_vocab": (dict(init="sample_vocab"), dict(prompt_tuning_init="SAMPLE_VOCAB")),
    "ptuning_mlp": (dict(encoder="mlp", encoder_hidden_size=24),
                    dict(encoder_reparameterization_type="MLP", encoder_hidden_size=24)),
    "ptuning_lstm": (dict(encoder="lstm", encoder_hidden_size=12, encoder_num_layers=2, encoder_dropout=0.1),
                     dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=12, encoder_num_layers=2,
                          encoder_dropout=0.1)),
}


def _peft_config(task, method, **extra):
    ours, theirs = METHODS[method]
    cls = PromptEncoderConfig if "encoder" in ours else PromptTuningConfig
    return cls(task_type=task, num_virtual_tokens=P, **theirs, **extra)


def _pair(model_name, method, seed=11, prepare=None):
    """(PEFT model, fastpeft model) on copies of one base model (``prepare(base)`` first, if given), prompt
    weights drawn from the same seed."""
    build, task, _ = MODELS[model_name]
    base = build()
    if prepare is not None:
        prepare(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(base), _peft_config(task, method))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fast = apply_prompt_tuning(base, P, **METHODS[method][0])
    # PEFT leaves its PeftModel and prompt encoder in training mode (LSTM dropout on); compare deterministic models.
    return peft_model.eval(), fast.eval()


def _inputs(task, batch=3, seq=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g, device="cpu")
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[1, :1] = 0
    kwargs = {"attention_mask": mask}
    if task == "CAUSAL_LM":
        labels = ids.clone()
        labels[mask == 0] = -100
        kwargs["labels"] = labels
    elif task == "SEQ_CLS":
        kwargs["labels"] = torch.randint(0, 3, (batch,), generator=g, device="cpu")
        kwargs["token_type_ids"] = torch.randint(0, 2, (batch, seq), generator=g, device="cpu")
    device = torch.get_default_device()
    return ids.to(device), {k: v.to(device) for k, v in kwargs.items()}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_same_seed_same_prompt_weights_and_config(model_name, method):
    peft_model, fast = _pair(model_name, method)
    layer = prompt_learning_layer(fast)
    assert isinstance(layer, PromptEncoder if "ptuning" in method else PromptEmbedding)
    theirs = dict(peft_model.prompt_encoder["default"].named_parameters())
    ours = dict(layer.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert p.dtype == theirs[name].dtype == torch.float32
        assert torch.equal(p, theirs[name]), name
    config = peft_model.peft_config["default"].to_dict()
    method_fields = {k: v for k, v in config.items() if k not in GENERIC_FIELDS}
    assert layer.peft_config() == method_fields
    assert json.loads(json.dumps(layer.peft_config())) == layer.peft_config()
    assert layer.task_type == config["task_type"]


@pytest.mark.parametrize("method", ["prompt_random", "ptuning_mlp", "ptuning_lstm"])
@pytest.mark.parametrize("model_name", ["llama", "gpt2", "bert_cls", "roberta_cls", "bert"])
def test_outputs_loss_and_prompt_gradients_match_peft(model_name, method):
    _, task, key = MODELS[model_name]
    peft_model, fast = _pair(model_name, method)
    with torch.no_grad():  # a prompt of the scale of the word embeddings, so it matters to the output
        for p in list(peft_model.prompt_encoder.parameters()):
            p.mul_(0.5)
        for p in prompt_learning_layer(fast).parameters():
            p.mul_(0.5)
    peft64 = copy.deepcopy(peft_model).double()
    ids, kwargs = _inputs(task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT and fastpeft both warn that token_type_ids are dropped (bert)
        outs = [m(input_ids=ids, **kwargs) for m in (fast, peft_model, peft64)]
    assert outs[0][key].shape == outs[1][key].shape
    if task != "SEQ_CLS":
        assert outs[0][key].shape[1] == P + ids.shape[1]  # PEFT's shape: the virtual positions included
    assert_close_to_ref(outs[0][key], outs[2][key], outs[1][key], what=key, tiny=MODEL_TINY)
    g = torch.Generator().manual_seed(3)
    weights = torch.randn(outs[0][key].shape, generator=g, dtype=torch.float64, device="cpu").to(ids.device)
    objectives = [(o[key] * weights.to(o[key].dtype)).sum() for o in outs]
    if task != "FEATURE_EXTRACTION":
        assert_close_to_ref(outs[0].loss.reshape(1), outs[2].loss.reshape(1), outs[1].loss.reshape(1), what="loss",
                            tiny=MODEL_TINY)
        objectives = [obj + o.loss for obj, o in zip(objectives, outs)]
    for obj in objectives:
        obj.backward()
    theirs = dict(peft_model.prompt_encoder["default"].named_parameters())
    theirs64 = dict(peft64.prompt_encoder["default"].named_parameters())
    trainable = prompt_learning_layer(fast).peft_parameters()
    assert trainable and all(p.requires_grad for p in trainable)
    for name, p in prompt_learning_layer(fast).named_parameters():
        assert_close_to_ref(p.grad, theirs64[name].grad, theirs[name].grad, what=f"grad {name}", tiny=MODEL_TINY)
    heads = [n for n, p in fast.named_parameters() if ".modules_to_save." in n]
    assert bool(heads) == (task == "SEQ_CLS")  # PEFT trains a sequence classifier's head
    for name in heads:
        assert_close_to_ref(fast.get_parameter(name).grad, peft64.base_model.get_parameter(name).grad,
                            peft_model.base_model.get_parameter(name).grad, what=f"grad {name}", tiny=MODEL_TINY)
    frozen = [n for n, p in fast.named_parameters() if not n.startswith("fastpeft_prompt.") and n not in heads]
    assert frozen and all(fast.get_parameter(n).grad is None for n in frozen)


@pytest.mark.parametrize("model_name", ["llama", "bert_cls"])
def test_training_mode_lstm_dropout_matches_peft(model_name):
    """In training mode the LSTM's dropout runs; from the same RNG state both sides draw the same mask."""
    _, task, key = MODELS[model_name]
    peft_model, fast = _pair(model_name, "ptuning_lstm")
    peft_model.train()
    fast.train()
    ids, kwargs = _inputs(task)
    outs = []
    for model in (fast, peft_model):
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(8)
            outs.append(model(input_ids=ids, **kwargs))
    torch.testing.assert_close(outs[0][key], outs[1][key], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        eval_out = fast.eval()(ids, **kwargs)[key]
    assert (eval_out - outs[0][key]).abs().max() > 1e-4  # the dropout did change the prompt


def _greedy_without_cache(model, ids, mask, steps):
    """Greedy tokens from full forwards of the whole sequence (no KV cache): what generate must reproduce."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def _livelier(model):
    """Weights of std 0.25 instead of 0.02, so tiny GPT-2's greedy tokens depend on the prompt (else it repeats)."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g, device="cpu") * 0.25)


@pytest.mark.parametrize("method", ["prompt_random", "ptuning_lstm"])
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_generate_gives_peft_greedy_tokens(model_name, method):
    peft_model, fast = _pair(model_name, method, prepare=_livelier if model_name == "gpt2" else None)
    ids, kwargs = _inputs("CAUSAL_LM", batch=3, seq=5)
    mask = kwargs["attention_mask"]
    expected = _greedy_without_cache(peft_model, ids, mask, steps=6)
    assert len({tuple(row[-6:].tolist()) for row in expected}) > 1 or len(set(expected[0, -6:].tolist())) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generate passes position_ids, which prompt tuning ignores (as PEFT)
        got = fast.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        got_single = fast.generate(ids[2:], attention_mask=mask[2:], max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    assert torch.equal(got_single, expected[2:])


@pytest.mark.parametrize("model_name, method", [("llama", "ptuning_mlp"), ("bert_cls", "ptuning_lstm"),
                                                ("gpt2", "prompt_random")])
def test_peft_checkpoint_loads_in_inference_mode(model_name, method, tmp_path):
    """PEFT saves prompt_embeddings (the encoder's output); fastpeft in inference_mode loads it, same outputs."""
    build, task, key = MODELS[model_name]
    peft_model, fast = _pair(model_name, method)
    peft_model.save_pretrained(tmp_path)  # in eval mode: PEFT in training mode saves an LSTM output with dropout
    saved = load_file(tmp_path / "adapter_model.safetensors")
    # PEFT adds a classifier head to modules_to_save for SEQ_CLS; it is the base model's own head here.
    head = {"base_model.classifier.weight", "base_model.classifier.bias"} if task == "SEQ_CLS" else set()
    assert set(saved) == {"prompt_embeddings"} | head
    torch.testing.assert_close(prompt_learning_layer(fast).prompt_embeddings(), saved["prompt_embeddings"],
                               rtol=0, atol=0)

    base = build()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ours = apply_prompt_tuning(base, P, inference_mode=True, **METHODS[method][0])
    layer = prompt_learning_layer(ours)
    layer.load_prompt_embeddings(saved["prompt_embeddings"])
    assert layer.peft_parameters() == [] and not any(p.requires_grad for p in ours.parameters())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert layer.peft_config() == {k: v for k, v in config.items() if k not in GENERIC_FIELDS}
    ids, kwargs = _inputs(task)
    kwargs.pop("labels")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours(ids, **kwargs)[key], loaded(input_ids=ids, **kwargs)[key], rtol=0, atol=0)
        torch.testing.assert_close(ours(ids, **kwargs)[key], fast(ids, **kwargs)[key], rtol=1e-5, atol=1e-6)


def _tokenizer(directory):
    """A word-level tokenizer built here (no download) that adds a BOS, saved and reloaded by path as PEFT needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["<bos>", "<unk>", "classify", "the", "sentiment", "of", "this", "review"]
    tok = Tokenizer(models.WordLevel({w: 40 + i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 40)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>").save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("num_virtual_tokens, text", [(7, "classify the review"), (2, "classify the sentiment")])
def test_text_init_matches_peft(num_virtual_tokens, text, tmp_path):
    tokenizer = _tokenizer(tmp_path)
    base = tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path)))
    fast = apply_prompt_tuning(base, num_virtual_tokens, init="text", init_text=text, tokenizer=tokenizer)
    layer = prompt_learning_layer(fast)
    assert torch.equal(layer.embedding.weight, peft_model.prompt_encoder["default"].embedding.weight)
    config = peft_model.peft_config["default"].to_dict()
    assert layer.peft_config() == {k: v for k, v in config.items() if k not in GENERIC_FIELDS}


def test_bf16_model_matches_peft():
    """bf16 base, fp32 prompt parameters on both sides (PEFT keeps them fp32): bit-equal outputs and gradients."""
    base = tiny_llama(dtype=torch.bfloat16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        peft_model = get_peft_model(copy.deepcopy(base), _peft_config("CAUSAL_LM", "ptuning_mlp"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        fast = apply_prompt_tuning(base, P, **METHODS["ptuning_mlp"][0])
    ids, kwargs = _inputs("CAUSAL_LM")
    out_fast, out_peft = fast(ids, **kwargs), peft_model(input_ids=ids, **kwargs)
    assert out_fast.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out_fast.logits, out_peft.logits, rtol=0, atol=0)
    (out_fast.loss + out_fast.logits.float().square().mean()).backward()
    (out_peft.loss + out_peft.logits.float().square().mean()).backward()
    theirs = dict(peft_model.prompt_encoder["default"].named_parameters())
    for name, p in prompt_learning_layer(fast).named_parameters():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=0, atol=0)
