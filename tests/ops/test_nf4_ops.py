"""fastpeft.ops.nf4_linear: forward and gradients on the CPU path and the Triton kernels (interpreter).

Reference: float64 math on the bitsandbytes-dequantized weight; error budget
relative to torch in the same dtype (tests/numerics.py).
"""
import pytest
import torch

from fastpeft.ops.nf4 import nf4_linear
from fastpeft.quant.nf4 import NF4Weight
from nf4_reference import dense_weight
from numerics import assert_close_to_ref

BACKENDS = ["cpu", "triton"]


def make_weight(n, k, blocksize=64, double_quant=False, dtype=torch.float32):
    return NF4Weight.from_float((torch.randn(n, k) * 0.05).to(dtype), blocksize=blocksize, double_quant=double_quant)


def bnb_dense(w: NF4Weight) -> torch.Tensor:
    """The weight as bitsandbytes dequantizes the same bytes (fp32; the documented format without it)."""
    return dense_weight(w.packed, w.absmax_float(), *w.shape, w.blocksize)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 19)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_and_grads(backend, dtype, lead, double_quant):
    n, k = 45, 192
    w = make_weight(n, k, 64, double_quant)
    dense = bnb_dense(w)
    x = torch.randn(*lead, k).to(dtype).requires_grad_()
    bias = torch.randn(n).to(dtype).requires_grad_()
    y = nf4_linear(x, w, bias)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y64 = x64 @ dense.double().T + b64
    y64.backward(dy.double())
    xt, bt = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    yt = xt @ dense.to(dtype).T + bt
    yt.backward(dy)
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert_close_to_ref(y, y64, yt, what="y")
    assert_close_to_ref(x.grad, x64.grad, xt.grad, what="dx")
    assert_close_to_ref(bias.grad, b64.grad, bt.grad, what="dbias")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_non_contiguous_input_and_no_bias(backend):
    n, k = 33, 128
    w = make_weight(n, k, 128)
    x = torch.randn(5, 2 * k)[:, ::2].requires_grad_()
    y = nf4_linear(x, w)
    y.backward(torch.ones_like(y))
    ref = x.detach().double() @ bnb_dense(w).double().T
    assert_close_to_ref(y, ref, x.detach() @ bnb_dense(w).T)
    ref_dx = torch.ones(5, n, dtype=torch.float64) @ bnb_dense(w).double()
    assert_close_to_ref(x.grad, ref_dx, torch.ones(5, n) @ bnb_dense(w))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_bf16_triton(backend):
    w = make_weight(40, 128)
    x = torch.randn(7, 128, dtype=torch.bfloat16)
    y = nf4_linear(x, w)
    assert_close_to_ref(y, x.double() @ bnb_dense(w).double().T, x @ bnb_dense(w).bfloat16().T)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_bf16_cpu_path(backend):
    w = make_weight(40, 128)
    x = torch.randn(7, 128, dtype=torch.bfloat16)
    y = nf4_linear(x, w)
    assert y.dtype == torch.bfloat16
    assert_close_to_ref(y, x.double() @ bnb_dense(w).double().T, x @ bnb_dense(w).bfloat16().T)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_gradcheck_float64_cpu_path(backend):
    w = make_weight(6, 64)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nf4_linear(a, w, b), (x, bias))


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_compile_fullgraph_cpu(backend):
    w = make_weight(24, 128)
    bias = torch.randn(24)

    def f(x):
        return torch.relu(nf4_linear(x, w, bias)) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 128, requires_grad=True)
    out = compiled(x)
    assert torch.equal(out, f(x))
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    f(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_frozen_weight_gets_no_grad_and_weight_is_not_an_input():
    w = make_weight(8, 64)
    x = torch.randn(2, 64, requires_grad=True)
    nf4_linear(x, w).sum().backward()
    assert not w.packed.requires_grad and x.grad is not None


# ---------------------------------------------------------------- bad input
def test_rejects_non_nf4_weight():
    with pytest.raises(TypeError, match="w_nf4"):
        nf4_linear(torch.randn(2, 64), torch.randn(8, 64))


def test_rejects_in_features_not_divisible_by_blocksize():
    w = NF4Weight.from_float(torch.randn(4, 96), blocksize=64)  # 384 elements: valid format, K % 64 != 0
    with pytest.raises(ValueError, match="blocksize"):
        nf4_linear(torch.randn(2, 96), w)


def test_rejects_wrong_packed_dtype():
    w = make_weight(8, 64)
    w.packed = w.packed.to(torch.int16)
    with pytest.raises(TypeError, match="packed"):
        nf4_linear(torch.randn(2, 64), w)


def test_rejects_mismatched_quant_state():
    w = make_weight(8, 64)
    w._absmax_float = w.absmax_float()[:-1]
    with pytest.raises(ValueError, match="quantization state"):
        nf4_linear(torch.randn(2, 64), w)


def test_rejects_mismatched_shape():
    w = make_weight(8, 64)
    w.shape = torch.Size([8, 128])
    with pytest.raises(ValueError, match="packed"):
        nf4_linear(torch.randn(2, 128), w)


def test_rejects_non_2d_weight():
    w = NF4Weight.from_float(torch.randn(2, 4, 64))
    with pytest.raises(ValueError, match="2-D"):
        nf4_linear(torch.randn(2, 64), w)


def test_rejects_x_feature_mismatch():
    with pytest.raises(ValueError, match="x"):
        nf4_linear(torch.randn(2, 128), make_weight(8, 64))


def test_rejects_scalar_x():
    with pytest.raises(ValueError, match="x"):
        nf4_linear(torch.tensor(1.0), make_weight(8, 64))


def test_rejects_integer_x():
    with pytest.raises(TypeError, match="x"):
        nf4_linear(torch.ones(2, 64, dtype=torch.int32), make_weight(8, 64))


def test_rejects_bad_bias():
    w = make_weight(8, 64)
    with pytest.raises(ValueError, match="bias"):
        nf4_linear(torch.randn(2, 64), w, torch.randn(9))
    with pytest.raises(TypeError, match="bias"):
        nf4_linear(torch.randn(2, 64), w, torch.randn(8, dtype=torch.float64))


def test_rejects_device_mismatch():
    w = make_weight(8, 64).to("meta")
    with pytest.raises(ValueError, match="device|on meta|is on"):
        nf4_linear(torch.randn(2, 64), w)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_rejects_float64(backend):
    with pytest.raises(TypeError, match="float64"):
        nf4_linear(torch.randn(2, 64, dtype=torch.float64), make_weight(8, 64))


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_cpu_path_dispatch(backend):
    from fastpeft.ops.nf4 import cpu_path_uses_native

    w = make_weight(16, 128)
    x = torch.randn(3, 128)
    assert not cpu_path_uses_native(torch.float64)  # float64 always takes dequantize + matmul
    if not cpu_path_uses_native(torch.float32):
        pytest.skip("native CPU extension not built on this machine: the CPU path dequantizes + matmuls")
    from fastpeft.cpu import nf4_native

    assert torch.equal(nf4_linear(x, w), nf4_native.nf4_matmul(x, w))
