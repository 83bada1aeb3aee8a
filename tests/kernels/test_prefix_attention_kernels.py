"""Triton prefix-attention kernels (fastpeft.kernels.prefix_attention) under the interpreter.

Forward output, LSE and every gradient (q, k, v, prefix_k, prefix_v) against
a float64 softmax over the explicit concatenation, with plain torch in the
input dtype as the error budget (tests/numerics.py). Every tensor the
launchers allocate is NaN-poisoned, so an element a kernel forgets to write
fails. Small 16x16 tiles make every loop run over several blocks (partial
last blocks, causal block bounds); the default configs run too. bf16 runs the
kernels with fp32 dot operands (``interpreter_upcast``): the interpreter's
bf16 ``tl.dot`` is wrong, the bf16 loads, casts and stores are the real code.
"""
import math

import pytest
import torch

from fastpeft.kernels import prefix_attention as K
from fastpeft.kernels._common import LaunchConfig
from numerics import assert_close_to_ref, rel_err
from prefix_attention_cases import Case, make_inputs, poison_empty, reference

SMALL = LaunchConfig("test_small", 16, 16, 0, num_warps=4, num_stages=1)
GRADS = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")
BASE = Case()  # B=2, GQA 6/2, Sq=19 != Skv=23, P=5, D=40, shared prefix, HF layout

CASES = [
    BASE,
    BASE.but(causal=True),
    BASE.but(bp=2, causal=True, padding="left"),
    BASE.but(padding="right"),
    BASE.but(p=1, hkv=1, causal=True, padding="right"),  # MQA, one prefix key
    BASE.but(sq=1, causal=True, padding="left", bp=2),  # decode against a cache
    BASE.but(sq=23, causal=True, d=32, layout="contiguous"),
    BASE.but(hq=4, hkv=4, sq=17, skv=33, p=20, d=64, causal=True),  # MHA, prefix over two blocks
    BASE.but(p=None, causal=True, sq=29, skv=23),  # no prefix, causal rows before the first key
    BASE.but(p=None, padding="all"),  # no prefix, one sample fully padded
    BASE.but(p=0, causal=True),  # an empty prefix tensor
]


def run(inputs, causal, config=None, scale=None):
    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v", "key_padding_mask")]
    prefix = inputs["prefix_k"] if inputs["prefix_k"] is not None and inputs["prefix_k"].shape[2] else None
    if prefix is None:
        args[3] = args[4] = None
    out, lse = K.prefix_attention_forward(*args, causal, scale, config=config)
    grads = K.prefix_attention_backward(inputs["dout"], *args, out, lse, causal, scale, True, True, True,
                                        configs=None if config is None else (config, config))
    return dict(out=out, lse=lse, **dict(zip(GRADS, grads)))


def check(got, ref, peer, what, c=4.0, tiny=1e-12):
    if ref.numel() == 0:
        return
    if ref.abs().max() == 0:  # e.g. the gradient of a fully padded sample: exactly zero
        assert torch.equal(got.double(), ref), f"{what}: expected exact zeros"
        return
    assert_close_to_ref(got, ref, peer, c=c, tiny=tiny, what=what)


def check_all(got, ref, peer, dtype):
    # fp32: torch's own fp32 error is ~1e-7; 1e-6 absorbs the different summation order of long dots
    tiny = 1e-6 if dtype == torch.float32 else 1e-12
    check(got["out"], ref["out"], peer["out"], "out", tiny=tiny)
    finite = torch.isfinite(ref["lse"])
    assert torch.equal(torch.isfinite(got["lse"]), finite), "lse: -inf exactly on the rows without keys"
    assert (got["lse"][~finite] == -math.inf).all()
    assert got["lse"].dtype == torch.float32
    if finite.any():
        err = rel_err(got["lse"][finite], ref["lse"][finite])
        assert err < (2e-6 if dtype == torch.float32 else 2e-3), f"lse: rel err {err:.2e}"
    for g in GRADS:
        if g in ref:
            check(got[g], ref[g], peer[g], g, tiny=tiny)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_empty(monkeypatch)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_lse_and_grads_fp32(case):
    inputs = make_inputs(case, torch.float32)
    ref = reference(inputs, case.causal)
    peer = reference(inputs, case.causal, dtype=torch.float32)
    got = run(inputs, case.causal, config=SMALL)
    check_all(got, ref, peer, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [BASE.but(causal=True, padding="left"), BASE.but(d=64, bp=2, sq=1, causal=True)],
                         ids=str)
def test_half_precision(case, dtype):
    inputs = make_inputs(case, dtype)
    got = run(inputs, case.causal, config=SMALL)
    check_all(got, reference(inputs, case.causal), reference(inputs, case.causal, dtype=dtype), dtype)
    for name, t in (("out", inputs["q"]), ("dq", inputs["q"]), ("dk", inputs["k"]), ("dprefix_k", inputs["prefix_k"])):
        assert got[name].dtype == t.dtype, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_default_configs(dtype):
    case = BASE.but(d=64, sq=33, skv=37, p=10, causal=True, padding="right")
    inputs = make_inputs(case, dtype)
    got = run(inputs, case.causal)
    check_all(got, reference(inputs, case.causal), reference(inputs, case.causal, dtype=dtype), dtype)


def test_custom_scale():
    case = BASE.but(causal=True)
    inputs = make_inputs(case, torch.float32)
    got = run(inputs, True, config=SMALL, scale=0.37)
    check_all(got, reference(inputs, True, scale=0.37), reference(inputs, True, scale=0.37, dtype=torch.float32),
              torch.float32)


def test_shared_prefix_grad_is_the_sum_of_per_sample_grads():
    case = BASE.but(causal=True, padding="left")
    inputs = make_inputs(case, torch.float32)
    shared = run(inputs, True, config=SMALL)
    per_sample = dict(inputs, prefix_k=inputs["prefix_k"].expand(2, -1, -1, -1),
                      prefix_v=inputs["prefix_v"].expand(2, -1, -1, -1))
    separate = run(per_sample, True, config=SMALL)
    assert torch.equal(shared["out"], separate["out"])
    for g in ("dprefix_k", "dprefix_v"):
        assert shared[g].shape == (1, 2, 5, 40) and separate[g].shape == (2, 2, 5, 40)
        assert torch.allclose(shared[g], separate[g].sum(0, keepdim=True), rtol=0, atol=1e-6)
    again = run(inputs, True, config=SMALL)  # deterministic: no atomics
    for name in ("out",) + GRADS:
        assert torch.equal(shared[name], again[name]), name


def test_backward_computes_only_what_is_asked():
    case = BASE.but(causal=True)
    inputs = make_inputs(case, torch.float32)
    ref = reference(inputs, True)
    args = [inputs[n] for n in ("q", "k", "v", "prefix_k", "prefix_v", "key_padding_mask")]
    out, lse = K.prefix_attention_forward(*args, True, None, config=SMALL)
    dq, dk, dv, dpk, dpv = K.prefix_attention_backward(inputs["dout"], *args, out, lse, True, None,
                                                       False, False, True, configs=(SMALL, SMALL))
    assert dq is None and dk is None and dv is None
    assert rel_err(dpk, ref["dprefix_k"]) < 1e-5 and rel_err(dpv, ref["dprefix_v"]) < 1e-5
    dq, dk, dv, dpk, dpv = K.prefix_attention_backward(inputs["dout"], *args, out, lse, True, None,
                                                       True, True, False, configs=(SMALL, SMALL))
    assert dpk is None and dpv is None
    assert rel_err(dq, ref["dq"]) < 1e-5 and rel_err(dk, ref["dk"]) < 1e-5 and rel_err(dv, ref["dv"]) < 1e-5


def test_head_dim_above_128_is_refused():
    with pytest.raises(ValueError, match="head_dim <= 128"):
        K.head_block(136)
    assert [K.head_block(d) for d in (8, 32, 40, 64, 80, 96, 128)] == [16, 32, 64, 64, 128, 128, 128]


def test_never_allocates_the_concatenated_key_axis(monkeypatch):
    """No tensor the launchers allocate or pass to a kernel spans P + Skv keys (the concatenation)."""
    case = BASE.but(p=7, skv=13, sq=11, causal=True, padding="left")  # P + Skv = 20, no other dim is 20
    inputs = make_inputs(case, torch.float32)
    concat = case.p + case.skv
    launched = []
    for kernel in (K._prefix_attention_fwd_kernel, K._prefix_attention_dkdv_kernel, K._prefix_attention_dq_kernel,
                   K._prefix_attention_delta_kernel):
        real = kernel.run

        def record(*args, _real=real, **kwargs):
            launched.extend(a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor))
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", record)

    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.shapes.append((str(func), tuple(t.shape)))
            return out

    with Allocations() as mode:
        got = run(inputs, True, config=SMALL)
    assert len(launched) > 10 and mode.shapes
    assert not [s for s in mode.shapes if concat in s[1]], "a tensor spans the concatenated key axis"
    assert not [tuple(t.shape) for t in launched if concat in t.shape]
    check_all(got, reference(inputs, True), reference(inputs, True, dtype=torch.float32), torch.float32)
