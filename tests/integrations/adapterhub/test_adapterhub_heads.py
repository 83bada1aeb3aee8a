"""AdapterHub (the side env) loads a fastpeft adapter saved with a trained classifier head and gives fastpeft's
logits: the head travels in AdapterHub's static-head files (``fastpeft.save_adapter(with_head=True)``)."""
import json
from pathlib import Path

import torch
from adapterhub_env import run_in_side_env
from models import VOCAB, tiny_bert_classifier, token_ids
from safetensors.torch import load_file, save_file

from fastpeft import apply_adapter, save_adapter

BERT_CONFIG = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=96, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, pad_token_id=0)


def test_adapterhub_loads_fastpeft_s_adapter_with_its_head(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")
    model = apply_adapter(tiny_bert_classifier(), "seq_bn", name="task", modules_to_save=["classifier"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(model, tmp_path / "adapter", "task")
    fresh = tiny_bert_classifier(seed=1)  # the same base, another head: only the saved head gives our logits
    fresh.bert.load_state_dict(tiny_bert_classifier().bert.state_dict())
    save_file({k: v.clone().contiguous() for k, v in fresh.state_dict().items()}, str(tmp_path / "base.safetensors"))
    ids = token_ids(batch=2, seq=6, seed=9)
    save_file({"ids": ids}, str(tmp_path / "inputs.safetensors"))
    job = dict(config=BERT_CONFIG, weights=str(tmp_path / "base.safetensors"), adapter_dir=str(tmp_path / "adapter"),
               inputs=str(tmp_path / "inputs.safetensors"), out=str(tmp_path / "out.safetensors"))
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_in_side_env(Path(__file__).with_name("adapterhub_head_driver.py"), str(tmp_path / "job.json"))
    theirs = load_file(str(tmp_path / "out.safetensors"))["logits"]
    with torch.no_grad():
        ours = model.double().eval()(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)  # both float64: the same math
