"""AdapterDrop for every adapter placement (issue 19, item 4's siblings).

The drop decision belongs to the transformer layer, whatever locations hold
an adapter: output-only sequential (``seq_bn``), output-only parallel
(``par_bn``, ``scaled_par_bn``), attention-only, and both. With
``adapter_drop_p=1`` in training no adapter runs; in eval every adapter runs;
with ``p=0.5`` a layer's adapters drop together.
"""
import pytest
import torch
from models import tiny_bert, tiny_gpt2, tiny_llama, token_ids

import fastpeft.nn.adapter as adapter_module
from fastpeft.injection.adapter import apply_adapter, set_adapter_drop

PLACEMENTS = {
    "seq_bn": "seq_bn",
    "par_bn": "par_bn",
    "scaled_par_bn": "scaled_par_bn",
    "double_seq_bn": "double_seq_bn",
    "attention_only_seq": {"mh_adapter": True, "output_adapter": False, "reduction_factor": 4,
                           "non_linearity": "relu"},
    "attention_only_par": {"mh_adapter": True, "output_adapter": False, "is_parallel": True, "reduction_factor": 4,
                           "non_linearity": "relu", "residual_before_ln": False},
}
LAYERS = 2


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    """The gate is backend-independent; the CPU path keeps these many forwards fast."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    real = adapter_module.bottleneck_adapter

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter_module, "bottleneck_adapter", counting)
    return calls


def _out(model, ids):
    r = model(input_ids=ids)
    return r.logits if hasattr(r, "logits") else r.last_hidden_state


@pytest.mark.parametrize("builder", [tiny_bert, tiny_llama, tiny_gpt2], ids=lambda b: b.__name__)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_adapter_drop_applies_to_every_placement(builder, placement, op_calls):
    model = builder()
    apply_adapter(model, PLACEMENTS[placement])
    ids = token_ids()
    model.eval()
    with torch.no_grad():
        _out(model, ids)
    per_forward = len(op_calls)
    assert per_forward >= LAYERS  # the placement runs an adapter in every layer
    per_layer = per_forward // LAYERS

    set_adapter_drop(model, adapter_drop_p=1.0)
    model.train()
    op_calls.clear()
    with torch.no_grad():
        _out(model, ids)
    assert op_calls == []

    model.eval()  # eval ignores adapter_drop_p
    op_calls.clear()
    with torch.no_grad():
        _out(model, ids)
    assert len(op_calls) == per_forward

    set_adapter_drop(model, adapter_drop_p=0.5)
    model.train()
    counts = set()
    torch.manual_seed(0)
    for _ in range(12):
        op_calls.clear()
        with torch.no_grad():
            _out(model, ids)
        counts.add(len(op_calls))
    assert counts <= {k * per_layer for k in range(LAYERS + 1)} and len(counts) >= 2
