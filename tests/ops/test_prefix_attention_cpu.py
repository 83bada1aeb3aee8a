"""The CPU implementation of prefix attention (fastpeft.cpu.prefix_attention) in each of its modes.

fp32/fp64 run the C++ kernel (csrc/cpu/prefix_attention.cpp): one pass over
``[prefix; sequence]`` for at most ``DIRECT_MAX_QUERY_ROWS`` query positions
("direct"), else torch's flash kernel for the sequence and one C++ pass over
the prefix merged into it ("merged"). Half dtypes, and fp32/fp64 without a
compiler, run the torch-ops path ("torch"). Every mode is checked against the
float64 softmax over the explicit concatenation (tests/prefix_attention_cases.py)
with plain torch in the same dtype as the error budget, for the output, the
LSE and every gradient, with NaN-poisoned outputs.
"""
import math

import pytest
import torch

from fastpeft.cpu import prefix_attention as prefix_attention_cpu
from fastpeft.ops.prefix_attention import prefix_attention
from numerics import assert_close_to_ref, rel_err
from prefix_attention_cases import Case, make_inputs, poison_empty, reference, set_mode

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
BASE = Case(b=2, hq=6, hkv=2, sq=5, skv=23, p=5, d=40)

CASES = [
    BASE.but(causal=True),
    BASE.but(sq=1, causal=True, padding="left", bp=2),  # decode against a padded cache, per-sample prefix
    BASE.but(sq=1, skv=512, p=30, d=64, hq=8, b=1, causal=True),  # the benchmark's decode shape
    BASE.but(sq=23, skv=23, causal=True, d=72, padding="right"),  # head_dim past one 64-column block
    BASE.but(sq=19, skv=23, hkv=1, p=1, d=17, padding="left"),  # MQA, odd head_dim, not causal
    BASE.but(sq=20, skv=20, p=70, d=100, hq=4, hkv=4, causal=True, layout="contiguous"),  # P past 64 keys
    BASE.but(p=None, causal=True, sq=7, skv=5),  # no prefix: causal rows before the first key
    BASE.but(p=None, padding="all"),  # no prefix: a fully padded sample
    BASE.but(p=2, padding="all", causal=True),  # with a prefix every row sees a key
    BASE.but(p=0, causal=True),  # an empty prefix tensor
    BASE.but(skv=0),  # no sequence keys: the prefix alone
    BASE.but(hq=8, hkv=2, sq=18, skv=18, d=72, causal=True, padding="left"),  # GQA 4: the merge's four-row blocks
    BASE.but(hq=10, hkv=2, sq=9, skv=12, p=33, d=24, bp=2),  # GQA 5: four-row blocks and a single row
]


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


@pytest.fixture
def poisoned(monkeypatch):
    """NaN in every output the Python side (torch.empty*) or the C++ kernel allocates."""
    poison_empty(monkeypatch)
    ops = torch.ops.fastpeft_native if prefix_attention_cpu._direct_ops(torch.float32) else None
    before = ops.prefix_attention_poison_outputs(True) if ops else None
    yield
    if ops:
        ops.prefix_attention_poison_outputs(before)


def run(inputs, causal, names=NAMES):
    leaves = {n: inputs[n].detach().clone().requires_grad_(n in names) if inputs[n] is not None else None
              for n in NAMES}
    out, lse = prefix_attention(*(leaves[n] for n in NAMES), causal=causal,
                                key_padding_mask=inputs["key_padding_mask"], return_lse=True)
    out.backward(inputs["dout"])
    got = dict(out=out, lse=lse)
    got.update({f"d{n}": leaves[n].grad for n in names if leaves[n] is not None})
    return got


def check(got, ref, peer, dtype):
    tiny = 1e-6 if dtype == torch.float32 else 1e-12
    for name in ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"):
        if name not in got or ref[name].numel() == 0:
            continue
        assert got[name] is not None and got[name].shape == ref[name].shape and got[name].dtype == dtype, name
        if ref[name].abs().max() == 0:
            assert torch.equal(got[name].double(), ref[name]), f"{name}: expected exact zeros"
        else:
            assert_close_to_ref(got[name], ref[name], peer[name], c=4.0, tiny=tiny, what=name)
    finite = torch.isfinite(ref["lse"])
    assert torch.equal(torch.isfinite(got["lse"]), finite) and (got["lse"][~finite] == -math.inf).all()
    if finite.any():
        assert rel_err(got["lse"][finite], ref["lse"][finite]) < (2e-6 if dtype == torch.float32 else 1e-12)


def test_native_kernel_is_built():
    """fp32/fp64 take the C++ kernel on this machine (a build failure must not hide behind the torch path)."""
    assert prefix_attention_cpu._direct_ops(torch.float32) is not None
    assert prefix_attention_cpu._direct_ops(torch.float16) is None


@pytest.mark.parametrize("mode", ["direct", "merged", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_mode_matches_float64(case, dtype, mode, cpu_backend, poisoned, monkeypatch):
    set_mode(monkeypatch, mode)
    inputs = make_inputs(case, dtype)
    ref, peer = reference(inputs, case.causal), reference(inputs, case.causal, dtype=dtype)
    check(run(inputs, case.causal), ref, peer, dtype)


@pytest.mark.parametrize("mode", ["direct", "merged"])
@pytest.mark.parametrize("names", [("prefix_k", "prefix_v"), ("q",), ("k", "v")], ids="+".join)
def test_gradients_asked_for_alone(names, mode, cpu_backend, monkeypatch):
    """Frozen model (only the prefix trains), only q, only k/v: each gradient alone is still right."""
    set_mode(monkeypatch, mode)
    case = BASE.but(sq=18, skv=18, causal=True, padding="left")
    inputs = make_inputs(case, torch.float32)
    ref, peer = reference(inputs, True), reference(inputs, True, dtype=torch.float32)
    got = run(inputs, True, names)
    check({k: v for k, v in got.items() if k in ("out", "lse") or k[1:] in names}, ref, peer, torch.float32)


@pytest.mark.parametrize("mode", ["direct", "merged"])
def test_non_unit_last_stride_is_read_correctly(mode, cpu_backend, monkeypatch):
    """Inputs whose head_dim is not the fastest axis (the kernel needs stride 1 there: the CPU path copies)."""
    set_mode(monkeypatch, mode)
    case = BASE.but(sq=9, skv=11, causal=True)
    inputs = make_inputs(case, torch.float32)
    for n in NAMES:  # same values, head_dim strided
        t = inputs[n]
        inputs[n] = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert inputs[n].stride(-1) != 1 and torch.equal(inputs[n], t)
    ref, peer = reference(inputs, True), reference(inputs, True, dtype=torch.float32)
    check(run(inputs, True), ref, peer, torch.float32)


@pytest.mark.parametrize("mode", ["direct", "merged"])
def test_gradcheck_float64(mode, cpu_backend, monkeypatch):
    set_mode(monkeypatch, mode)
    case = Case(b=2, hq=4, hkv=2, sq=3, skv=5, p=2, d=3, bp=1, causal=True, padding="left")
    inputs = make_inputs(case, torch.float64)
    mask = inputs["key_padding_mask"]
    leaves = [inputs[n].detach().clone().requires_grad_(True) for n in NAMES]
    assert torch.autograd.gradcheck(lambda *t: prefix_attention(*t, causal=True, key_padding_mask=mask), leaves)


def test_threads_agree_with_one_thread(cpu_backend):
    """The kernel's parallel split (positions, or KV heads at decode, forward; KV groups backward) gives the
    same values as one thread."""
    before = torch.get_num_threads()
    for case in (BASE.but(sq=3, skv=40, b=3, hq=8, hkv=2, causal=True, padding="right"),
                 BASE.but(sq=1, skv=40, b=1, hq=8, hkv=2, causal=True, padding="right")):
        inputs = make_inputs(case, torch.float32)
        try:
            torch.set_num_threads(1)
            one = run(inputs, True)
            torch.set_num_threads(max(2, before))
            many = run(inputs, True)
        finally:
            torch.set_num_threads(before)
        for name in one:
            assert torch.equal(one[name], many[name]), name


@pytest.mark.parametrize("bad, error, match", [
    (dict(q=lambda t: t.half()), TypeError, "dtype"),
    (dict(q=lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)), ValueError, "stride 1"),
    (dict(k=lambda t: t[:, :, :, :-1]), ValueError, "bad shape"),
    (dict(mask=lambda m: m[:, :-1]), ValueError, "key_padding_mask"),
])
def test_native_op_rejects_bad_arguments(bad, error, match):
    """The C++ op checks its arguments itself: a bad call raises, never reads out of bounds."""
    assert prefix_attention_cpu._direct_ops(torch.float32) is not None
    t = make_inputs(BASE.but(padding="left"), torch.float32)
    args = {n: t[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")}
    args["mask"] = t["key_padding_mask"]
    for name, change in bad.items():
        args[name] = change(args[name])
    with pytest.raises(error, match=match):
        torch.ops.fastpeft_native.prefix_attention_direct_forward(
            args["q"], args["k"], args["v"], args["prefix_k"], args["prefix_v"], args["mask"], True, 0.1, True,
            None, None)
