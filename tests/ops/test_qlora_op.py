"""fastpeft.ops.qlora_linear: forward and every gradient vs a float64 reference, both backends.

The reference uses the bitsandbytes-dequantized weight and, with dropout, the
mask the backend reports for the call's seed (``lora_dropout_mask``), so the
math checked is exactly ``x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``.
"""
import pytest
import torch

from fastpeft.ops.lora import lora_dropout_mask
from fastpeft.ops.qlora import qlora_linear
from fastpeft.quant.nf4 import NF4Weight
from lane_device import lane_device, op_seed_draw
from nf4_reference import dense_weight
from numerics import assert_close_to_ref

BACKENDS = ["cpu", "triton"]


def make_weight(n, k, blocksize=64, double_quant=False):
    return NF4Weight.from_float(torch.randn(n, k) * 0.05, blocksize=blocksize, double_quant=double_quant)


def bnb_dense(w: NF4Weight) -> torch.Tensor:
    """The weight as bitsandbytes dequantizes the same bytes (fp32; the documented format without it)."""
    return dense_weight(w.packed, w.absmax_float(), *w.shape, w.blocksize)


def lora_params(n, k, r, dtype):
    a = (torch.randn(r, k) / k**0.5).to(dtype).requires_grad_()
    b = (torch.randn(n, r) * 0.1).to(dtype).requires_grad_()
    bias = torch.randn(n).to(dtype).requires_grad_()
    return a, b, bias


def reference(x, dense, a, b, bias, scaling, keep=None, p=0.0, dtype=torch.float64):
    """Grads of the same math in ``dtype`` (float64 = reference, x's dtype = torch baseline)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, a, b, bias)]
    xr, ar, br, biasr = leaves
    dropped = xr if keep is None else xr * keep.to(dtype) / (1 - p)
    y = xr @ dense.to(dtype).T + biasr + scaling * (dropped @ ar.T) @ br.T
    return y, leaves


def check_all(y, x, a, b, bias, dense, scaling, dy, keep=None, p=0.0):
    y64, leaves64 = reference(x, dense, a, b, bias, scaling, keep, p)
    yt, leavest = reference(x, dense, a, b, bias, scaling, keep, p, dtype=x.dtype)
    y64.backward(dy.double())
    yt.backward(dy)
    assert_close_to_ref(y, y64, yt, what="y")
    for name, got, ref, base in zip(("dx", "dA", "dB", "dbias"), (x.grad, a.grad, b.grad, bias.grad),
                                    leaves64, leavest):
        assert got is not None, name
        assert_close_to_ref(got, ref.grad, base.grad, what=name)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (2, 19)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_and_grads(backend, dtype, lead, double_quant):
    n, k, r, scaling = 45, 192, 5, 2.0
    w = make_weight(n, k, 64, double_quant)
    a, b, bias = lora_params(n, k, r, dtype)
    x = torch.randn(*lead, k).to(dtype).requires_grad_()
    y = qlora_linear(x, w, a, b, scaling, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    check_all(y, x, a, b, bias, bnb_dense(w), scaling, dy)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_dropout_forward_and_grads(backend):
    n, k, r, scaling, p = 40, 128, 4, 0.5, 0.25
    w = make_weight(n, k)
    a, b, bias = lora_params(n, k, r, torch.float32)
    x = torch.randn(3, 11, k).requires_grad_()
    torch.manual_seed(123)
    seed = op_seed_draw()   # the draw qlora_linear will make
    torch.manual_seed(123)
    y = qlora_linear(x, w, a, b, scaling, bias, dropout_p=p, training=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = lora_dropout_mask((33, k), p, seed, lane_device()).view(3, 11, k)
    assert 0.6 < keep.float().mean() < 0.9
    check_all(y, x, a, b, bias, bnb_dense(w), scaling, dy, keep, p)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_dropout_off_in_eval(backend):
    w = make_weight(16, 64)
    a, b, bias = lora_params(16, 64, 2, torch.float32)
    x = torch.randn(4, 64)
    y_eval = qlora_linear(x, w, a, b, 1.0, bias, dropout_p=0.9, training=False)
    y_ref = x.double() @ bnb_dense(w).double().T + bias.double() + (x.double() @ a.double().T) @ b.double().T
    assert_close_to_ref(y_eval, y_ref, x @ bnb_dense(w).T + bias + (x @ a.T) @ b.T)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("which", ["x", "A", "B"])
def test_only_requested_grads(backend, which):
    n, k, r = 24, 64, 3
    w = make_weight(n, k)
    a, b, _ = lora_params(n, k, r, torch.float32)
    x = torch.randn(5, k)
    a.requires_grad_(which == "A")
    b.requires_grad_(which == "B")
    x.requires_grad_(which == "x")
    y = qlora_linear(x, w, a, b, 1.5)
    dy = torch.randn_like(y)
    y.backward(dy)
    grads = {"x": x.grad, "A": a.grad, "B": b.grad}
    assert all((g is not None) == (name == which) for name, g in grads.items())
    y64, (x64, a64, b64, _) = reference(x, bnb_dense(w), a, b, torch.zeros(n), 1.5)
    y64.backward(dy.double())
    ref = {"x": x64.grad, "A": a64.grad, "B": b64.grad}[which]
    torch.testing.assert_close(grads[which].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_gradcheck_float64_cpu_path(backend):
    n, k, r = 6, 64, 2
    w = make_weight(n, k)
    a = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, r, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: qlora_linear(t[0], w, t[1], t[2], 0.7, t[3]), (x, a, b, bias))


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_gradcheck_float64_with_dropout(backend):
    n, k, r = 5, 64, 2
    w = make_weight(n, k)
    a = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, r, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, k, dtype=torch.float64, requires_grad=True)

    def f(*t):
        torch.manual_seed(7)  # the same seed, hence the same mask, at every evaluation
        return qlora_linear(t[0], w, t[1], t[2], 0.7, dropout_p=0.3, training=True)

    assert torch.autograd.gradcheck(f, (x, a, b))


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_compile_fullgraph_cpu(backend):
    w = make_weight(24, 128)
    a, b, bias = lora_params(24, 128, 4, torch.float32)

    def f(x):
        return qlora_linear(x, w, a, b, 2.0, bias).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 128)
    assert torch.equal(compiled(x), f(x))


# ---------------------------------------------------------------- bad input
@pytest.fixture
def good():
    w = make_weight(8, 64)
    return dict(x=torch.randn(2, 64), w_nf4=w, lora_A=torch.randn(2, 64), lora_B=torch.randn(8, 2), scaling=1.0)


@pytest.mark.parametrize("key,value,exc,match", [
    ("w_nf4", torch.randn(8, 64), TypeError, "w_nf4"),
    ("x", torch.randn(2, 32), ValueError, "x"),
    ("x", torch.ones(2, 64, dtype=torch.int64), TypeError, "x"),
    ("lora_A", torch.randn(2, 32), ValueError, "lora_A"),
    ("lora_A", torch.randn(64), ValueError, "lora_A"),
    ("lora_A", torch.randn(0, 64), ValueError, "rank"),
    ("lora_B", torch.randn(9, 2), ValueError, "lora_B"),
    ("lora_B", torch.randn(8, 3), ValueError, "lora_B"),
    ("lora_B", torch.randn(8, 2, dtype=torch.float64), TypeError, "lora_B"),
    ("bias", torch.randn(7), ValueError, "bias"),
    ("dropout_p", 1.0, ValueError, "dropout_p"),
    ("dropout_p", -0.1, ValueError, "dropout_p"),
])
def test_bad_input(good, key, value, exc, match):
    good[key] = value
    with pytest.raises(exc, match=match):
        qlora_linear(**good)


def test_rejects_in_features_not_divisible_by_blocksize(good):
    good["w_nf4"] = NF4Weight.from_float(torch.randn(4, 96), blocksize=64)
    good["x"], good["lora_A"], good["lora_B"] = torch.randn(2, 96), torch.randn(2, 96), torch.randn(4, 2)
    with pytest.raises(ValueError, match="blocksize"):
        qlora_linear(**good)


def test_rejects_device_mismatch(good):
    good["lora_A"] = good["lora_A"].to("meta")
    with pytest.raises(ValueError, match="lora_A"):
        qlora_linear(**good)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty_batch(backend):
    w = make_weight(8, 64)
    a, b, bias = lora_params(8, 64, 2, torch.float32)
    x = torch.randn(0, 64, requires_grad=True)
    y = qlora_linear(x, w, a, b, 1.0, bias)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 64)
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_non_contiguous_inputs(backend):
    n, k, r = 30, 128, 6
    w = make_weight(n, k, 128, double_quant=True)
    a_full = torch.randn(r, 2 * k) / k**0.5
    a = a_full[:, ::2].detach().requires_grad_()            # strided leaf
    b = (torch.randn(r, n) * 0.1).T.requires_grad_()       # [n, r] transposed storage
    bias = torch.randn(n).requires_grad_()
    x = torch.randn(4, 2 * k)[:, ::2].requires_grad_()
    assert not x.is_contiguous() and not b.is_contiguous() and not a.is_contiguous()
    y = qlora_linear(x, w, a, b, 0.5, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    check_all(y, x, a, b, bias, bnb_dense(w), 0.5, dy)
