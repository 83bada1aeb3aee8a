"""The parity cases run against AdapterHub: tiny models, adapter configs, fusion configs, directions.

``hub_to_fastpeft``: AdapterHub creates and saves the adapter (config given as
an AdapterHub config string, so its own presets are used), fastpeft loads it.
``fastpeft_to_hub``: fastpeft creates and saves it (``apply_adapter`` with the
preset and overrides), AdapterHub loads it. Both sides then run forward and
backward on the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

MODEL_SPECS = {
    "bert": dict(config_class="BertConfig", model_class="BertModel",
                 config=dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)),
    "llama": dict(config_class="LlamaConfig", model_class="LlamaForCausalLM",
                  config=dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              tie_word_embeddings=False)),
    "gpt2": dict(config_class="GPT2Config", model_class="GPT2LMHeadModel",
                 config=dict(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                             eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}
BATCH, SEQ = 2, 7


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    preset: str
    overrides: dict = field(default_factory=dict)
    safetensors: bool = True  # hub_to_fastpeft only: False saves pytorch_adapter.bin

    def hub_config(self) -> str:
        """AdapterHub's config string ``preset[key=value,...]``."""
        if not self.overrides:
            return self.preset
        return self.preset + "[" + ",".join(f"{k}={v!r}" for k, v in self.overrides.items()) + "]"


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    kind: str  # "hub_to_fastpeft" | "fastpeft_to_hub"
    adapters: tuple
    fusion: Optional[dict] = None  # AdapterFusion config dict (all fields)
    seed: int = 0


DYNAMIC = dict(key=True, query=True, value=True, query_before_ln=False, regularization=True, residual_before=False,
               temperature=False, value_before_softmax=True, value_initialized=True, dropout_prob=None)
FUSION_VARIANT = dict(key=True, query=True, value=True, query_before_ln=True, regularization=False,
                      residual_before=True, temperature=True, value_before_softmax=False, value_initialized=False,
                      dropout_prob=None)
BERT_VARIANT = dict(ln_before=True, ln_after=True, scaling="channel", use_gating=True,
                    residual_before_ln="post_add", non_linearity="gelu", reduction_factor=8)
LLAMA_VARIANT = dict(residual_before_ln=False, adapter_residual_before_ln=True, ln_after=True, scaling="learned",
                     non_linearity="gelu_new", leave_out=[0])


def _cases() -> list[Case]:
    cases = []
    seed = 10
    for model in ("bert", "llama"):
        for preset in ("seq_bn", "double_seq_bn", "par_bn"):
            for kind in ("hub_to_fastpeft", "fastpeft_to_hub"):
                seed += 1
                cases.append(Case(f"{model}-{preset}-{kind}", model, kind, (AdapterSpec("a", preset),), seed=seed))
    cases += [
        Case("bert-seq_bn_variant-hub_to_fastpeft", "bert", "hub_to_fastpeft",
             (AdapterSpec("v", "seq_bn", BERT_VARIANT, safetensors=False),), seed=31),  # AdapterHub's safetensors
        # save refuses ln_before (one LayerNorm under two names shares memory), so this one goes through .bin
        Case("bert-seq_bn_variant-fastpeft_to_hub", "bert", "fastpeft_to_hub",
             (AdapterSpec("v", "seq_bn", BERT_VARIANT),), seed=32),
        Case("llama-double_seq_bn_variant-hub_to_fastpeft", "llama", "hub_to_fastpeft",
             (AdapterSpec("v", "double_seq_bn", LLAMA_VARIANT),), seed=33),
        Case("llama-double_seq_bn_variant-fastpeft_to_hub", "llama", "fastpeft_to_hub",
             (AdapterSpec("v", "double_seq_bn", LLAMA_VARIANT),), seed=34),
        Case("llama-scaled_par_bn_bin-hub_to_fastpeft", "llama", "hub_to_fastpeft",
             (AdapterSpec("s", "scaled_par_bn", safetensors=False),), seed=35),
        Case("gpt2-seq_bn-hub_to_fastpeft", "gpt2", "hub_to_fastpeft", (AdapterSpec("a", "seq_bn"),), seed=36),
        Case("gpt2-double_seq_bn-hub_to_fastpeft", "gpt2", "hub_to_fastpeft", (AdapterSpec("a", "double_seq_bn"),),
             seed=37),
        Case("gpt2-par_bn-fastpeft_to_hub", "gpt2", "fastpeft_to_hub", (AdapterSpec("a", "par_bn"),), seed=38),
        Case("bert-fusion_dynamic-hub_to_fastpeft", "bert", "hub_to_fastpeft",
             (AdapterSpec("a", "seq_bn"), AdapterSpec("b", "seq_bn", dict(non_linearity="swish"))), DYNAMIC, 41),
        Case("bert-fusion_dynamic-fastpeft_to_hub", "bert", "fastpeft_to_hub",
             (AdapterSpec("a", "seq_bn"), AdapterSpec("b", "seq_bn", dict(non_linearity="swish"))), DYNAMIC, 42),
        Case("llama-fusion_variant-hub_to_fastpeft", "llama", "hub_to_fastpeft",
             (AdapterSpec("a", "double_seq_bn"), AdapterSpec("b", "double_seq_bn", dict(reduction_factor=4))),
             FUSION_VARIANT, 43),
        Case("llama-fusion_variant-fastpeft_to_hub", "llama", "fastpeft_to_hub",
             (AdapterSpec("a", "double_seq_bn"), AdapterSpec("b", "double_seq_bn", dict(reduction_factor=4))),
             FUSION_VARIANT, 44),
    ]
    return cases


CASES = _cases()
CASES_BY_ID = {c.id: c for c in CASES}
