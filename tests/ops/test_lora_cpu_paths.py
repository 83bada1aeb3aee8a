"""The CPU LoRA path's shape- and dtype-dependent variants, each against float64.

``fastpeft.cpu.lora`` runs the LoRA branch in fp32 for few rows of
fp16/bf16 (``branch_dtype``: ``M·(K+N)`` up to ``FP32_BRANCH_MAX_FORWARD`` /
``FP32_BRANCH_MAX_BACKWARD``) and one bf16 row's base
product as ``torch.mv`` (``base_output``). On both sides of each switch the
output and every gradient must be within the numerics policy (error vs float64
at most 4x plain torch's in the same dtype, ``numerics.assert_close_to_ref``),
with bias, with dropout (the mask regenerated in backward), and for every
subset of the gradients.
"""
import pytest
import torch
import torch.nn.functional as F

from fastpeft.cpu import lora as lora_cpu
from fastpeft.ops import lora_linear
from fastpeft.ops._dropout_seed import draw_seed, seed_value
from lane_device import lane_device
from numerics import assert_close_to_ref

pytestmark = pytest.mark.usefixtures("cpu_backend")

K, N, R = 67, 45, 5
FORWARD_ROWS = lora_cpu.FP32_BRANCH_MAX_FORWARD // (K + N)  # the most rows with an fp32 forward branch
BACKWARD_ROWS = lora_cpu.FP32_BRANCH_MAX_BACKWARD // (K + N)
# Rows on both sides of each switch; 1 is also base_output's torch.mv row.
ROWS = [1, 2, FORWARD_ROWS, FORWARD_ROWS + 1, BACKWARD_ROWS, BACKWARD_ROWS + 1]


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def _tensors(m, dtype, bias):
    x = torch.randn(m, K).to(dtype)
    w = (torch.randn(N, K) / K**0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    a = (torch.randn(R, K) / K**0.5).to(dtype)
    bb = (torch.randn(N, R) / R**0.5).to(dtype)
    return x, w, b, a, bb


def _lora_math(x, w, b, a, bb, s, keep=None, p=0.0):
    """Plain torch: the float64 reference and the same-dtype peer."""
    xd = x if keep is None else x * keep / (1 - p)
    return F.linear(x, w, b) + s * F.linear(F.linear(xd, a), bb)


def test_branch_dtype_switches_where_the_tests_expect():
    for limit, rows in ((lora_cpu.FP32_BRANCH_MAX_FORWARD, FORWARD_ROWS),
                        (lora_cpu.FP32_BRANCH_MAX_BACKWARD, BACKWARD_ROWS)):
        for dtype in (torch.bfloat16, torch.float16):
            assert lora_cpu.branch_dtype(torch.empty(rows, K, dtype=dtype), N, limit) is torch.float32
            assert lora_cpu.branch_dtype(torch.empty(rows + 1, K, dtype=dtype), N, limit) is dtype
        for dtype in (torch.float32, torch.float64):
            assert lora_cpu.branch_dtype(torch.empty(1, K, dtype=dtype), N, limit) is dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("bias", [False, True])
def test_op_values_and_grads_match_float64(dtype, m, bias):
    x, w, b, a, bb = _tensors(m, dtype, bias)
    s = 1.9
    dy = torch.randn(m, N).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    y = lora_linear(leaves[0], w, leaves[1], leaves[2], s, bias=b)
    assert y.dtype == dtype and y.shape == (m, N)
    ref_leaves = [t.double().requires_grad_() for t in (x, a, bb)]
    ref = _lora_math(ref_leaves[0], w.double(), None if b is None else b.double(), ref_leaves[1], ref_leaves[2], s)
    peer_leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    peer = _lora_math(peer_leaves[0], w, b, peer_leaves[1], peer_leaves[2], s)
    tiny = 1e-7
    assert_close_to_ref(y, ref, peer, tiny=tiny, what="y")
    y.backward(dy)
    ref.backward(dy.double())
    peer.backward(dy)
    for name, got, r, t in zip(("dx", "dA", "dB"), leaves, ref_leaves, peer_leaves):
        assert got.grad.dtype == dtype, name
        assert_close_to_ref(got.grad, r.grad, t.grad, tiny=tiny, what=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, FORWARD_ROWS + 1, BACKWARD_ROWS + 1])
def test_dropout_forward_and_backward_use_one_mask(dtype, m):
    x, w, b, a, bb = _tensors(m, dtype, bias=True)
    s, p, seed = 0.8, 0.3, 1234
    y, h = lora_cpu.lora_forward(x, w, b, a, bb, s, p, seed)
    assert h.dtype == lora_cpu.lora_h_dtype(dtype)
    dy = torch.randn(m, N).to(dtype)
    dx, dA, dB = lora_cpu.lora_backward(dy, x, w, a, bb, h, s, p, seed, True, True, True)
    keep = lora_cpu.dropout_mask((m, K), p, seed, lane_device())
    assert 0 < keep.sum() < keep.numel()

    def run(dt):
        leaves = [t.to(dt).requires_grad_() for t in (x, a, bb)]
        out = _lora_math(leaves[0], w.to(dt), b.to(dt), leaves[1], leaves[2], s, keep.to(dt), p)
        out.backward(dy.to(dt))
        return out, [t.grad for t in leaves]

    ref, ref_grads = run(torch.float64)
    peer, peer_grads = run(dtype)
    assert_close_to_ref(y, ref, peer, tiny=1e-7, what="y")
    for name, got, r, t in zip(("dx", "dA", "dB"), (dx, dA, dB), ref_grads, peer_grads):
        assert got.dtype == dtype, name
        assert_close_to_ref(got, r, t, tiny=1e-7, what=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, FORWARD_ROWS + 1, BACKWARD_ROWS + 1])
def test_dropout_mask_kept_by_forward_is_the_seeds_and_backward_is_bit_identical_without_it(dtype, m):
    """The forward leaves its keep values on h: they are dropout_mask's bits, and a backward that must
    regenerate them (an h without them) gives the same bits as one that reuses them."""
    x, w, b, a, bb = _tensors(m, dtype, bias=True)
    s, p, seed = 0.8, 0.3, 4321
    _, h = lora_cpu.lora_forward(x, w, b, a, bb, s, p, seed)
    kept = getattr(h, lora_cpu.KEEP_ATTR)
    assert torch.equal(kept != 0, lora_cpu.dropout_mask((m, K), p, seed, lane_device()))
    dy = torch.randn(m, N).to(dtype)
    reused = lora_cpu.lora_backward(dy, x, w, a, bb, h, s, p, seed, True, True, True)
    bare = h.detach().clone()
    assert getattr(bare, lora_cpu.KEEP_ATTR, None) is None
    regenerated = lora_cpu.lora_backward(dy, x, w, a, bb, bare, s, p, seed, True, True, True)
    for name, got, want in zip(("dx", "dA", "dB"), reused, regenerated):
        assert torch.equal(got, want), name


def test_dropout_mask_reaches_backward_through_the_op(monkeypatch):
    """lora_linear draws one mask per training step (none in backward), and its gradients equal the CPU
    functions' own."""
    x, w, b, a, bb = _tensors(BACKWARD_ROWS + 1, torch.float32, bias=True)
    s, p = 1.1, 0.2
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    draws = []
    drawing = lora_cpu.keep_values
    monkeypatch.setattr(lora_cpu, "keep_values", lambda *args: draws.append(args) or drawing(*args))
    torch.manual_seed(11)
    y = lora_linear(leaves[0], w, leaves[1], leaves[2], s, bias=b, dropout_p=p, training=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert len(draws) == 1
    monkeypatch.undo()
    torch.manual_seed(11)
    seed = seed_value(draw_seed(p))  # the op's seed: its first draw from the default generator
    want_y, h = lora_cpu.lora_forward(x, w, b, a, bb, s, p, seed)
    assert torch.equal(y.detach(), want_y)
    want = lora_cpu.lora_backward(dy, x, w, a, bb, h.detach().clone(), s, p, seed, True, True, True)
    for name, got, expected in zip(("dx", "dA", "dB"), leaves, want):
        assert torch.equal(got.grad, expected), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, BACKWARD_ROWS + 1])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_each_gradient_alone_equals_all_together(dtype, m, dropout_p):
    x, w, _, a, bb = _tensors(m, dtype, bias=False)
    _, h = lora_cpu.lora_forward(x, w, None, a, bb, 1.3, dropout_p, 99)
    dy = torch.randn(m, N).to(dtype)
    everything = lora_cpu.lora_backward(dy, x, w, a, bb, h, 1.3, dropout_p, 99, True, True, True)
    for need in ((True, False, False), (False, True, False), (False, False, True), (False, True, True)):
        got = lora_cpu.lora_backward(dy, x, w, a, bb, h, 1.3, dropout_p, 99, *need)
        for asked, g, full in zip(need, got, everything):
            if asked:
                assert torch.equal(g, full)
            else:
                assert g is None


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_layout", ["contiguous", "transposed view"])
def test_one_bf16_row_base_output_matches_float64(bias, weight_layout):
    x, w, b, _, _ = _tensors(1, torch.bfloat16, bias)
    if weight_layout == "transposed view":
        w = w.t().contiguous().t()
        assert not w.is_contiguous()
    y = lora_cpu.base_output(x, w, b)
    assert y.shape == (1, N) and y.dtype == torch.bfloat16 and y.is_contiguous()
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert_close_to_ref(y, ref, F.linear(x, w, b), tiny=1e-7, what="y")
