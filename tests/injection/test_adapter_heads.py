"""A new classifier head trained with a bottleneck adapter (``apply_adapter(modules_to_save=...)``), saved and
reloaded with it in AdapterHub's static-head layout (``head_config.json`` + ``model_head.safetensors``)."""
import json

import pytest
import torch
from models import tiny_bert_classifier, token_ids
from safetensors.torch import load_file

from fastpeft import apply_adapter, load_adapter, save_adapter


def _trained(steps=3):
    model = apply_adapter(tiny_bert_classifier(), "seq_bn", name="task", modules_to_save=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(".adapters.task." in n for n in trainable - {"classifier.weight", "classifier.bias"})
    head_before = model.classifier.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids, labels = token_ids(batch=4, seq=6, seed=2), torch.tensor([0, 1, 2, 1])
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    assert not torch.equal(model.classifier.weight, head_before), "the head did not train"
    return model.eval()


def test_head_trains_with_the_adapter_and_reloads_with_identical_outputs(tmp_path):
    model = _trained()
    save_adapter(model, tmp_path, "task")
    head = load_file(tmp_path / "model_head.safetensors")
    assert sorted(head) == ["classifier.bias", "classifier.weight"]  # AdapterHub's keys for this model class
    meta = json.loads((tmp_path / "head_config.json").read_text())
    assert meta["config"] is None and meta["model_class"] == "BertForSequenceClassification"
    assert meta["num_labels"] == 3 and meta["name"] is None
    ids = token_ids(batch=2, seq=6, seed=9)
    with torch.no_grad():
        expected = model(ids).logits
        reloaded = tiny_bert_classifier(seed=1)  # another fresh head: only the saved one gives the outputs
        reloaded.bert.load_state_dict(tiny_bert_classifier().bert.state_dict())
        assert load_adapter(reloaded, tmp_path) == "task"
        assert torch.equal(reloaded.eval()(ids).logits, expected)
        without = tiny_bert_classifier(seed=1)
        without.bert.load_state_dict(tiny_bert_classifier().bert.state_dict())
        load_adapter(without, tmp_path, with_head=False)
        assert not torch.allclose(without.eval()(ids).logits, expected, atol=1e-3)


def test_head_of_another_shape_is_refused_untouched(tmp_path):
    save_adapter(_trained(steps=1), tmp_path, "task")
    model = tiny_bert_classifier(num_labels=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="classifier.weight has shape"):
        load_adapter(model, tmp_path)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_modules_to_save_is_refused():
    with pytest.raises(ValueError, match="modules_to_save"):
        apply_adapter(tiny_bert_classifier(), "seq_bn", modules_to_save=["score"])
