"""NaN and inf in prefix attention's inputs propagate as torch's softmax attention propagates them.

A NaN key (sequence or prefix) makes every row that sees it NaN; an infinite
query makes its row's scores infinite, and torch's softmax of a row whose
maximum is +inf is NaN; a NaN value makes NaN every row that gives it weight.
Each CPU mode (the C++ one-pass kernel, the flash + prefix merge, the torch-ops
path) and the Triton kernels (under the interpreter) must give NaN exactly
where the softmax over the explicit concatenation does (float64), in the output,
the LSE and every gradient, and the reference's values elsewhere.
"""
import math

import pytest
import torch

from fastpeft.ops.prefix_attention import prefix_attention
from prefix_attention_cases import Case, make_inputs, reference, set_mode

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
CASE = Case(b=2, hq=4, hkv=2, sq=6, skv=9, p=3, d=16, causal=True)


def _poison(inputs, name, index, value):
    t = inputs[name].clone()
    t[index] = value
    inputs[name] = t


POISONS = {
    "nan_key": ("k", (0, 1, 4, 3), math.nan),  # rows of batch 0, heads 2-3, that see key 4
    "nan_prefix_key": ("prefix_k", (0, 0, 1, 0), math.nan),  # every row of heads 0-1
    "inf_query": ("q", (1, 2, 3, 5), math.inf),  # one row
    "neg_inf_query": ("q", (0, 0, 5, 0), -math.inf),
    "nan_prefix_value": ("prefix_v", (0, 1, 2, 7), math.nan),  # column 7 of every row of heads 2-3
    "inf_value": ("v", (1, 0, 0, 2), math.inf),  # a key every row sees (causal, last rows of the sequence)
}


def _set_mode(monkeypatch, mode):
    """The Triton kernels, or one CPU mode."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton" if mode == "triton" else "cpu")
    if mode != "triton":
        set_mode(monkeypatch, mode)


def _same_nonfinite(got, want, what):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN at {torch.isnan(got).nonzero()[:8]} " \
                                                            f"where the reference has {torch.isnan(want).nonzero()[:8]}"
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got[torch.isinf(got)],
                                                                            want[torch.isinf(want)]), what
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4, msg=what)


@pytest.mark.parametrize("mode", ["direct", "merged", "torch", "triton"])
@pytest.mark.parametrize("poison", list(POISONS))
def test_nonfinite_inputs_propagate_like_torch(poison, mode, monkeypatch):
    _set_mode(monkeypatch, mode)
    inputs = make_inputs(CASE, torch.float32)
    _poison(inputs, *POISONS[poison])
    want = reference(inputs, CASE.causal)
    assert not torch.isfinite(want["out"]).all(), "the poison must reach the reference's output"
    leaves = {n: inputs[n].detach().clone().requires_grad_() for n in NAMES}
    out, lse = prefix_attention(*(leaves[n] for n in NAMES), causal=CASE.causal, return_lse=True)
    out.backward(inputs["dout"])
    _same_nonfinite(out, want["out"], "out")
    _same_nonfinite(lse, want["lse"], "lse")
    for n in NAMES:
        _same_nonfinite(leaves[n].grad, want[f"d{n}"], f"d{n}")


@pytest.mark.parametrize("mode", ["direct", "merged", "torch", "triton"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_keys_a_row_does_not_see_never_reach_it(value, mode, monkeypatch):
    """A non-finite key hidden by the padding mask (from every row) and one hidden by the causal rule (from
    the first rows) leave the rows that do not see them as the reference has them: finite output and LSE.

    Only the forward is compared at the padded key: the reference's ``dq`` multiplies the padded key by a
    zero score gradient (``0 · NaN`` in its matmul), which is not a property of attention."""
    _set_mode(monkeypatch, mode)
    case = CASE.but(padding="right")
    inputs = make_inputs(case, torch.float32)
    padded = int((~inputs["key_padding_mask"][1]).nonzero()[0])
    _poison(inputs, "k", (1, 0, padded, 2), value)
    _poison(inputs, "k", (0, 1, 4, 4), value)  # batch 0 pads keys 5-8; the causal rule hides key 4 from row 0
    want = reference(inputs, case.causal, need_grads=False)
    assert torch.isfinite(want["out"][1]).all() and torch.isfinite(want["out"][0, :, 0]).all()
    assert not torch.isfinite(want["out"][0, 2:, 1:]).all(), "the poison must reach the rows that see it"
    out, lse = prefix_attention(*(inputs[n] for n in NAMES), key_padding_mask=inputs["key_padding_mask"],
                                causal=case.causal, return_lse=True)
    _same_nonfinite(out, want["out"], "out")
    _same_nonfinite(lse, want["lse"], "lse")
