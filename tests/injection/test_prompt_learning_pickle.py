"""Prefix-tuned and prompt-tuned models pickle and ``torch.save`` whole (issue 19 item 5).

The hooks prompt learning adds (prefix tuning's position shift and model check, prompt tuning's input
pre-hook) are module-level callables, not closures, so ``pickle`` and ``torch.save`` take the model; the
copy gives bit-identical outputs. Unpickling registers the prefix attention function with transformers
again (a fresh process has not registered it): the test removes the registration before loading.
"""
import io
import pickle

import pytest
import torch

import fastpeft
from fastpeft.injection._prefix_attention_function import ATTN_IMPLEMENTATION
from models import tiny_bert, tiny_gpt2, tiny_llama, token_ids

APPLY = {
    "prefix_tuning": lambda model: fastpeft.apply_prefix_tuning(model, 3),
    "prompt_tuning": lambda model: fastpeft.apply_prompt_tuning(model, 3),
}


def _pickle(model):
    return pickle.loads(pickle.dumps(model))


def _torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a whole model object, by definition not weights-only


def _forget_attention_function():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
    AttentionMaskInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
@pytest.mark.parametrize("round_trip", [_pickle, _torch_save], ids=["pickle", "torch_save"])
@pytest.mark.parametrize("method", list(APPLY))
@pytest.mark.parametrize("build", [tiny_llama, tiny_bert, tiny_gpt2], ids=["llama", "bert", "gpt2"])
def test_round_trip_gives_identical_outputs(build, method, round_trip, backend):
    model = build()
    APPLY[method](model)
    ids = token_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask)[0]
    if method == "prefix_tuning":
        _forget_attention_function()
    copy = round_trip(model)
    with torch.no_grad():
        got = copy(input_ids=ids, attention_mask=mask)[0]
    assert torch.equal(got, want)
    assert copy.fastpeft_prompt is not model.fastpeft_prompt
