"""The public LoRA op on the CPU path: values, gradients, dropout, compile, errors.

The Triton kernels behind the same op are tested in tests/kernels/.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastpeft.cpu import lora as lora_cpu
from fastpeft.ops import lora, lora_dropout_mask, lora_linear
from lane_device import lane_device
from numerics import assert_close_to_ref

pytestmark = pytest.mark.usefixtures("cpu_backend")


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def make_inputs(lead, k, n, r, dtype, bias=True, requires_grad=True):
    x = torch.randn(*lead, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype) if bias else None
    a = torch.randn(r, k, dtype=dtype) / k**0.5
    bb = torch.randn(n, r, dtype=dtype) / r**0.5
    for t in (x, a, bb):
        t.requires_grad_(requires_grad)
    return x, w, b, a, bb


def unfused(x, w, a, bb, s, b=None):
    """Plain torch, the same math: the reference (in fp64) and the peer (in x's dtype)."""
    y = torch.nn.functional.linear(x, w, b)
    return y + s * torch.nn.functional.linear(torch.nn.functional.linear(x, a), bb)


def grads(out, inputs, dy):
    return torch.autograd.grad(out, inputs, dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lead,k,n,r", [((1,), 7, 5, 1), ((37,), 45, 33, 3), ((2, 9), 64, 70, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_match_float64(dtype, lead, k, n, r, bias):
    x, w, b, a, bb = make_inputs(lead, k, n, r, dtype, bias)
    s = 1.7
    dy = torch.randn(*lead, n, dtype=dtype)
    y = lora_linear(x, w, a, bb, s, bias=b)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, a, bb)]
    ref = unfused(ref_inputs[0], w.double(), ref_inputs[1], ref_inputs[2], s, None if b is None else b.double())
    peer_inputs = [t.detach().clone().requires_grad_() for t in (x, a, bb)]
    peer = unfused(peer_inputs[0], w, peer_inputs[1], peer_inputs[2], s, b)
    tiny = 1e-15 if dtype == torch.float64 else 1e-7
    assert_close_to_ref(y, ref, peer, tiny=tiny, what="y")
    for name, g, g_ref, g_peer in zip(("dx", "dA", "dB"), grads(y, (x, a, bb), dy),
                                      grads(ref, ref_inputs, dy.double()), grads(peer, peer_inputs, dy)):
        assert g.dtype == dtype
        assert_close_to_ref(g, g_ref, g_peer, tiny=tiny, what=name)


def test_noncontiguous_input():
    x = torch.randn(33, 6, 40).transpose(0, 1)  # [6, 33, 40] with strides of the transpose
    assert not x.is_contiguous()
    _, w, b, a, bb = make_inputs((1,), 40, 21, 4, torch.float32, requires_grad=False)
    y = lora_linear(x, w, a, bb, 0.5, bias=b)
    ref = unfused(x.double(), w.double(), a.double(), bb.double(), 0.5, b.double())
    assert_close_to_ref(y, ref, unfused(x, w, a, bb, 0.5, b), what="y")


def test_gradcheck_float64_without_and_with_dropout():
    x, w, b, a, bb = make_inputs((3, 4), 6, 5, 2, torch.float64)
    b.requires_grad_()
    w.requires_grad_()  # full fine-tuning: the weight gradient must be right too
    assert torch.autograd.gradcheck(lambda *t: lora_linear(t[0], t[1], t[2], t[3], 0.7, bias=t[4]), (x, w, a, bb, b))

    def dropped(x, a, bb):
        torch.manual_seed(1234)  # same seed every call -> same mask; backward must regenerate it
        return lora_linear(x, w.detach(), a, bb, 0.7, dropout_p=0.4, training=True)

    assert torch.autograd.gradcheck(dropped, (x, a, bb))


def test_frozen_tensors_get_no_gradient_work(monkeypatch):
    calls = []
    real_backward = lora_cpu.lora_backward

    def spy(*args):
        calls.append(args[-3:])
        return real_backward(*args)

    monkeypatch.setattr(lora_cpu, "lora_backward", spy)
    x, w, b, a, bb = make_inputs((5,), 8, 6, 2, torch.float32)
    x.requires_grad_(False)
    lora_linear(x, w, a, bb, 1.0, bias=b).sum().backward()
    assert calls == [(False, True, True)]  # no dx for an x that needs none
    assert w.grad is None and b.grad is None
    assert a.grad is not None and bb.grad is not None


def test_trainable_bias_gets_its_gradient():
    x, w, b, a, bb = make_inputs((4, 3), 8, 6, 2, torch.float64)
    b.requires_grad_()
    dy = torch.randn(4, 3, 6, dtype=torch.float64)
    (db,) = torch.autograd.grad(lora_linear(x, w, a, bb, 1.0, bias=b), (b,), dy)
    torch.testing.assert_close(db, dy.sum((0, 1)))


def test_dropout_semantics_and_statistics():
    k, p = 512, 0.3
    eye = torch.eye(k)
    x = torch.rand(64, k) + 0.5  # strictly positive, so a zero output can only be a dropped element
    zero_w = torch.zeros(k, k)
    y = lora_linear(x, zero_w, eye, eye, 1.0, dropout_p=p, training=True)  # y = dropout(x)
    dropped = y == 0
    kept_ratio = y[~dropped] / x[~dropped]
    torch.testing.assert_close(kept_ratio, torch.full_like(kept_ratio, 1 / (1 - p)))
    n = x.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped.float().mean().item() - p) < 5 * sigma
    # eval mode and p=0 apply no dropout at all
    torch.testing.assert_close(lora_linear(x, zero_w, eye, eye, 1.0, dropout_p=p, training=False), x)


def test_dropout_mask_is_deterministic_in_the_seed():
    m1 = lora_dropout_mask((40, 50), 0.25, 7, lane_device())
    assert m1.dtype == torch.bool
    assert torch.equal(m1, lora_dropout_mask((40, 50), 0.25, 7, lane_device()))
    assert not torch.equal(m1, lora_dropout_mask((40, 50), 0.25, 8, lane_device()))


def test_dropout_draws_a_new_mask_each_call_and_follows_manual_seed():
    x, w, _, a, bb = make_inputs((16,), 32, 8, 4, torch.float32, requires_grad=False)
    torch.manual_seed(5)
    y1 = lora_linear(x, w, a, bb, 1.0, dropout_p=0.5, training=True)
    y2 = lora_linear(x, w, a, bb, 1.0, dropout_p=0.5, training=True)
    torch.manual_seed(5)
    y1_again = lora_linear(x, w, a, bb, 1.0, dropout_p=0.5, training=True)
    assert not torch.equal(y1, y2)
    assert torch.equal(y1, y1_again)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_torch_compile_fullgraph(dropout_p):
    x, w, b, a, bb = make_inputs((3, 5), 16, 12, 4, torch.float32)

    def step(x, a, bb):
        return lora_linear(x, w, a, bb, 2.0, bias=b, dropout_p=dropout_p, training=True).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    eager_loss = step(x, a, bb)
    eager_grads = torch.autograd.grad(eager_loss, (x, a, bb))
    torch.manual_seed(3)
    loss = compiled(x, a, bb)
    got_grads = torch.autograd.grad(loss, (x, a, bb))
    torch.testing.assert_close(loss, eager_loss)
    for g, ref in zip(got_grads, eager_grads):
        torch.testing.assert_close(g, ref)


def test_fake_implementation_matches_real_output_metadata():
    x, w, b, a, bb = make_inputs((6,), 8, 5, 2, torch.float32, requires_grad=False)
    torch.library.opcheck(torch.ops.fastpeft.lora_linear_forward.default, (x, w, b, a, bb, 1.5, 0.0, None))
    seed = torch.tensor(11)
    y, h = torch.ops.fastpeft.lora_linear_forward(x, w, b, a, bb, 1.5, 0.1, seed)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastpeft.lora_linear_backward.default,
                          (dy, x, w, a, bb, h, 1.5, 0.1, seed, True, False, True))


# ---- bad input -----------------------------------------------------------------------------

def _good():
    return dict(zip(("x", "weight", "bias", "lora_A", "lora_B"), make_inputs((3,), 8, 6, 2, torch.float32,
                                                                              requires_grad=False)))


def _call(**overrides):
    args = {**_good(), **overrides}
    return lora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"], 1.0, bias=args["bias"],
                       dropout_p=overrides.get("dropout_p", 0.0))


@pytest.mark.parametrize("overrides,error,name", [
    (dict(x=torch.randn(3, 9)), ValueError, "x"),
    (dict(x=torch.randint(0, 3, (3, 8))), TypeError, "x"),
    (dict(x=torch.tensor(1.0)), ValueError, "x"),
    (dict(x=[[1.0] * 8]), TypeError, "x"),
    (dict(weight=torch.randn(6, 8, 1)), ValueError, "weight"),
    (dict(lora_A=torch.randn(2, 9)), ValueError, "lora_A"),
    (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), ValueError, "r=0"),
    (dict(lora_B=torch.randn(7, 2)), ValueError, "lora_B"),
    (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, "weight"),
    (dict(lora_A=torch.randn(2, 8, device="meta")), ValueError, "lora_A"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
])
def test_bad_input_raises_clear_error(overrides, error, name):
    with pytest.raises(error, match=name):
        _call(**overrides)


def test_unknown_backend_name_raises(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND"):
        _call()


def test_triton_backend_rejects_float64(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        lora.lora_linear(x, torch.randn(3, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64),
                         torch.randn(3, 1, dtype=torch.float64), 1.0)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 17), n=st.integers(1, 13), r=st.integers(1, 5),
       lead=st.integers(1, 3), bias=st.booleans())
def test_any_shape_matches_float64(m, k, n, r, lead, bias):
    x, w, b, a, bb = make_inputs((lead, m), k, n, r, torch.float64, bias, requires_grad=False)
    y = lora_linear(x, w, a, bb, 0.3, bias=b)
    assert y.shape == (lead, m, n)
    torch.testing.assert_close(y, unfused(x, w, a, bb, 0.3, b))
