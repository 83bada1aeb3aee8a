"""Tiny transformers models built from configs (no downloads) for tests.

Each builder returns a freshly initialised model in eval mode, hidden size 64,
2 layers, small vocabulary, in float32 unless ``dtype`` says otherwise. Pass
``seed`` for weights that are the same from call to call.
"""
from __future__ import annotations

import torch

VOCAB = 101


def _build(config, model_cls, seed: int, dtype: torch.dtype):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype).eval()


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """LlamaForCausalLM with grouped-query attention (4 query heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return _build(config, LlamaForCausalLM, seed, dtype)


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32):
    """GPT2LMHeadModel: its attention and MLP projections are transformers ``Conv1D``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _build(config, GPT2LMHeadModel, seed, dtype)


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float32):
    """BertModel (encoder with biases on every Linear)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _build(config, BertModel, seed, dtype)


def token_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[batch, seq]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


# Attention + MLP projections that LoRA targets in each tiny model.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
BERT_TARGETS = ["query", "key", "value", "dense"]


def tiny_llama_head_dim(seed: int = 0, dtype: torch.dtype = torch.float32):
    """LlamaForCausalLM with GQA (4 query heads, 2 KV heads) and an explicit head_dim 24 != hidden / heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0)
    return _build(config, LlamaForCausalLM, seed, dtype)


def tiny_bert_classifier(seed: int = 0, dtype: torch.dtype = torch.float32, num_labels: int = 3):
    """BertForSequenceClassification (encoder, absolute positions, token types)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return _build(config, BertForSequenceClassification, seed, dtype)


def tiny_roberta_classifier(seed: int = 0, dtype: torch.dtype = torch.float32, num_labels: int = 3):
    """RobertaForSequenceClassification (positions derived from the padding index 1)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, max_position_embeddings=80, num_labels=num_labels,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1)
    return _build(config, RobertaForSequenceClassification, seed, dtype)
