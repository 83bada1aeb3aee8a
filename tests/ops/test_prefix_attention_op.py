"""The public prefix-attention op: values, LSE and gradients on both backends, compile, errors.

Every case compares the op's output, LSE and the gradients of q, k, v,
prefix_k and prefix_v with a float64 softmax over the explicit concatenation
(tests/prefix_attention_cases.py), with plain torch in the same dtype as the
error budget. The CPU path runs every case; the Triton kernels run under the
interpreter through the op for a subset (their own tests are in
tests/kernels/test_prefix_attention_kernels.py).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from fastpeft.cpu import prefix_attention as prefix_attention_cpu
from fastpeft.ops.prefix_attention import prefix_attention
from numerics import assert_close_to_ref, rel_err
from prefix_attention_cases import Case, make_inputs, poison_empty, reference

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
BASE = Case()  # B=2, GQA 6/2, Sq=19 != Skv=23, P=5, D=40, shared prefix, HF layout

CASES = [
    BASE,
    BASE.but(causal=True),
    BASE.but(bp=2, causal=True, padding="left"),
    BASE.but(bp=2, padding="right"),
    BASE.but(p=1, hkv=1, causal=True, padding="right"),  # MQA, one prefix key
    BASE.but(hkv=1, padding="left"),  # MQA, not causal: the folded-heads CPU path with a padding mask
    BASE.but(sq=1, causal=True, padding="left", bp=2),  # decode against a cache
    BASE.but(sq=1, causal=True),  # decode, GQA
    BASE.but(sq=23, causal=True, d=32, layout="contiguous"),  # square causal: is_causal on the CPU path
    BASE.but(hq=4, hkv=4, sq=17, skv=33, p=20, d=64, causal=True),
    BASE.but(sq=23, causal=True, padding="right", hq=2, hkv=2),
    BASE.but(p=None, causal=True, sq=29, skv=23),  # no prefix: causal rows before the first key
    BASE.but(p=None, padding="all"),  # no prefix: a fully padded sample
    BASE.but(p=2, padding="all", causal=True),  # with a prefix every row sees a key
    BASE.but(p=0, causal=True),  # an empty prefix tensor
]
TRITON_CASES = [CASES[2], CASES[4], CASES[6], CASES[12], CASES[14]]


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", request.param)
    return request.param


def call(inputs, causal, requires_grad=True, **kwargs):
    leaves = {n: inputs[n].detach().clone().requires_grad_(requires_grad) if inputs[n] is not None else None
              for n in NAMES}
    for n in NAMES:  # keep the HF layout of the inputs (clone keeps strides)
        if leaves[n] is not None:
            assert leaves[n].stride() == inputs[n].stride()
    out, lse = prefix_attention(*(leaves[n] for n in NAMES), causal=causal,
                                key_padding_mask=inputs["key_padding_mask"], return_lse=True, **kwargs)
    got = dict(out=out, lse=lse)
    if requires_grad:
        out.backward(inputs["dout"])
        got.update({f"d{n}": leaves[n].grad for n in NAMES if leaves[n] is not None})
    return got


def check_all(got, ref, peer, dtype):
    tiny = 1e-6 if dtype == torch.float32 else 1e-12
    for name in ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"):
        if name not in ref or ref[name].numel() == 0:
            continue
        assert got[name] is not None, f"{name}: no gradient"
        assert got[name].shape == ref[name].shape and got[name].dtype == dtype, name
        if ref[name].abs().max() == 0:
            assert torch.equal(got[name].double(), ref[name]), f"{name}: expected exact zeros"
        else:
            assert_close_to_ref(got[name], ref[name], peer[name], c=4.0, tiny=tiny, what=name)
    finite = torch.isfinite(ref["lse"])
    assert got["lse"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(torch.isfinite(got["lse"]), finite) and (got["lse"][~finite] == -math.inf).all()
    if finite.any():
        bound = {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 2e-3)
        assert rel_err(got["lse"][finite], ref["lse"][finite]) < bound


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_path_matches_float64(case, dtype, backend, monkeypatch):
    inputs = make_inputs(case, dtype)
    ref, peer = reference(inputs, case.causal), reference(inputs, case.causal, dtype=dtype)
    poison_empty(monkeypatch)
    check_all(call(inputs, case.causal), ref, peer, dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_matches_float64(dtype, backend, monkeypatch):
    case = BASE.but(causal=True, padding="left", bp=2)
    inputs = make_inputs(case, dtype)
    ref, peer = reference(inputs, True), reference(inputs, True, dtype=dtype)
    poison_empty(monkeypatch)
    check_all(call(inputs, True), ref, peer, dtype)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_path_through_the_op(case, backend, monkeypatch):
    inputs = make_inputs(case, torch.float32)
    ref, peer = reference(inputs, case.causal), reference(inputs, case.causal, dtype=torch.float32)
    poison_empty(monkeypatch)
    check_all(call(inputs, case.causal), ref, peer, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
def test_only_the_prefix_trains(backend):
    """A frozen model: only the prefix needs grad (prefix tuning)."""
    case = BASE.but(causal=True, padding="right")
    inputs = make_inputs(case, torch.float32)
    pk = inputs["prefix_k"].clone().requires_grad_(True)
    pv = inputs["prefix_v"].clone().requires_grad_(True)
    out = prefix_attention(inputs["q"], inputs["k"], inputs["v"], pk, pv, causal=True,
                           key_padding_mask=inputs["key_padding_mask"])
    dpk, dpv = torch.autograd.grad(out, (pk, pv), inputs["dout"])
    ref = reference(inputs, True)
    assert rel_err(dpk, ref["dprefix_k"]) < 1e-5 and rel_err(dpv, ref["dprefix_v"]) < 1e-5


def test_gradcheck_float64_cpu_path(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")
    case = Case(b=2, hq=2, hkv=1, sq=3, skv=5, p=2, d=3, bp=1, causal=True, padding="left")
    inputs = make_inputs(case, torch.float64)
    mask = inputs["key_padding_mask"]
    leaves = [inputs[n].detach().clone().requires_grad_(True) for n in NAMES]
    assert torch.autograd.gradcheck(
        lambda *t: prefix_attention(*t, causal=True, key_padding_mask=mask), leaves)
    assert torch.autograd.gradcheck(lambda *t: prefix_attention(*t), leaves)


def test_math_path_for_other_devices_matches_float64():
    """The plain-torch functions the CPU module runs for non-CPU tensors (FASTPEFT_BACKEND=cpu on CUDA)."""
    case = BASE.but(causal=True, padding="left", sq=7)
    inputs = make_inputs(case, torch.float32)
    args = [inputs[n] for n in NAMES] + [inputs["key_padding_mask"]]
    out, lse = prefix_attention_cpu._math_forward(*args, True, None)
    grads = prefix_attention_cpu._math_backward(inputs["dout"], *args, True, None, True, True, True)
    ref = reference(inputs, True)
    assert rel_err(out, ref["out"]) < 1e-5 and rel_err(lse, ref["lse"]) < 1e-6
    for name, g in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads):
        assert rel_err(g, ref[name]) < 1e-5, name


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
def test_torch_compile_fullgraph(backend):
    case = Case(b=2, hq=4, hkv=2, sq=5, skv=7, p=3, d=16, causal=True, padding="right")
    inputs = make_inputs(case, torch.float32)
    mask = inputs["key_padding_mask"]

    def step(*t):
        return prefix_attention(*t, causal=True, key_padding_mask=mask).square().sum()

    leaves = [inputs[n].detach().clone().requires_grad_(True) for n in NAMES]
    eager_loss = step(*leaves)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, eager_loss)
    for g, ref in zip(grads, eager_grads):
        torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_fake_implementations_match_real_metadata(backend):
    inputs = make_inputs(BASE.but(causal=True, padding="left", sq=4, skv=6), torch.float32)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"],
            inputs["key_padding_mask"], True, 0.2)
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.fastpeft.prefix_attention_forward(*args)
    bwd_args = (inputs["dout"], *args[:6], out, lse, True, 0.2, True, True, True)
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_backward.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_lse_is_returned_only_when_asked_and_not_differentiable(backend):
    inputs = make_inputs(BASE, torch.float32)
    q = inputs["q"].clone().requires_grad_(True)
    args = (q, inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"])
    out = prefix_attention(*args)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    out2, lse = prefix_attention(*args, return_lse=True)
    assert torch.equal(out, out2) and not lse.requires_grad and lse.shape == q.shape[:3]


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
def test_dropout_is_refused_in_training_and_ignored_in_eval(backend):
    inputs = make_inputs(BASE.but(sq=3, skv=4), torch.float32)
    args = [inputs[n] for n in NAMES]
    with pytest.raises(ValueError, match="dropout"):
        prefix_attention(*args, dropout_p=0.1, training=True)
    torch.testing.assert_close(prefix_attention(*args, dropout_p=0.1, training=False), prefix_attention(*args))


# ---- bad input -----------------------------------------------------------------------------

def _good():
    inputs = make_inputs(Case(b=2, hq=4, hkv=2, sq=3, skv=5, p=2, d=8, padding="left"), torch.float32)
    return {n: inputs[n] for n in NAMES + ("key_padding_mask",)}


@pytest.mark.parametrize("overrides,error,match", [
    (dict(q=torch.randn(2, 4, 3)), ValueError, "q must have 4 dimensions"),
    (dict(k=torch.randn(2, 2, 5, 8, 1)), ValueError, "k must have 4 dimensions"),
    (dict(q=torch.randint(0, 3, (2, 4, 3, 8))), TypeError, "q has dtype"),
    (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)), ValueError, "Hq % Hkv"),
    (dict(v=torch.randn(2, 2, 6, 8)), ValueError, "k and v must have one shape"),
    (dict(k=torch.randn(3, 2, 5, 8), v=torch.randn(3, 2, 5, 8)), ValueError, "k: batch size"),
    (dict(k=torch.randn(2, 2, 5, 16), v=torch.randn(2, 2, 5, 16)), ValueError, "k: head_dim"),
    (dict(v=torch.randn(2, 2, 5, 8, dtype=torch.float64)), TypeError, "v has dtype"),
    (dict(k=torch.randn(2, 2, 5, 8, device="meta")), ValueError, "k is on meta"),
    (dict(prefix_v=None), ValueError, "prefix_k and prefix_v must be given together"),
    (dict(prefix_k=None), ValueError, "prefix_k and prefix_v must be given together"),
    (dict(prefix_k=torch.randn(1, 2, 3, 8)), ValueError, "prefix_k and prefix_v must have one shape"),
    (dict(prefix_k=torch.randn(3, 2, 2, 8), prefix_v=torch.randn(3, 2, 2, 8)), ValueError, "1 \\(shared\\)"),
    (dict(prefix_k=torch.randn(1, 4, 2, 8), prefix_v=torch.randn(1, 4, 2, 8)), ValueError, "prefix_k: 4 heads"),
    (dict(prefix_k=torch.randn(1, 2, 2, 4), prefix_v=torch.randn(1, 2, 2, 4)), ValueError, "prefix_k: head_dim"),
    (dict(prefix_k=torch.randn(1, 2, 2, 8).half(), prefix_v=torch.randn(1, 2, 2, 8).half()), TypeError,
     "prefix_k has dtype"),
    (dict(prefix_k=torch.randn(1, 2, 8), prefix_v=torch.randn(1, 2, 8)), ValueError, "prefix_k must have 4"),
    (dict(key_padding_mask=torch.ones(2, 5)), TypeError, "key_padding_mask has dtype"),
    (dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.ones(2, 1, 5, dtype=torch.bool)), ValueError, "key_padding_mask must have 2"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(scale="0.1"), ValueError, "scale"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
])
@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
def test_bad_input_raises_clear_error(overrides, error, match, backend):
    args = {**_good(), **overrides}
    kwargs = {k: args.pop(k) for k in ("key_padding_mask", "scale", "dropout_p") if k in args}
    with pytest.raises(error, match=match):
        prefix_attention(*(args[n] for n in NAMES), **kwargs)


def test_head_dim_above_128_is_refused_on_triton_only(monkeypatch):
    q, k = torch.randn(1, 2, 3, 136), torch.randn(1, 2, 4, 136)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    with pytest.raises(ValueError, match="head_dim 136 > 128"):
        prefix_attention(q, k, k)
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")
    assert prefix_attention(q, k, k).shape == q.shape


def test_triton_backend_rejects_float64(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        prefix_attention(q, q, q)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), group=st.integers(1, 3), sq=st.integers(1, 9),
       skv=st.integers(1, 9), p=st.integers(0, 4), d=st.integers(1, 12), shared=st.booleans(), causal=st.booleans(),
       padded=st.booleans())
def test_any_shape_matches_float64_cpu(backend, b, hkv, group, sq, skv, p, d, shared, causal, padded):
    case = Case(b=b, hq=hkv * group, hkv=hkv, sq=sq, skv=skv, p=p, d=d, bp=1 if shared else b, causal=causal,
                padding="right" if padded and skv > 7 else None, layout="contiguous")
    inputs = make_inputs(case, torch.float64)
    got = call(inputs, causal)
    ref = reference(inputs, causal)
    for name in ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"):
        if name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-9, msg=name)
