"""The public bottleneck-adapter op: values, gradients, dropout, compile, errors.

Most tests force the CPU path; ``test_triton_path_through_the_op`` runs the op
on the Triton kernels under the interpreter (the kernels themselves are
tested in tests/kernels/test_adapter_kernels.py). The reference is AdapterHub's
math as separate eager ops (tests/adapter_reference.py), in float64; the peer
is the same code in the input dtype.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from adapter_reference import adapter_op_math
from fastpeft.cpu import adapter as adapter_cpu
from fastpeft.activations import ACTIVATIONS
from fastpeft.ops.adapter import adapter_dropout_mask, bottleneck_adapter
from lane_device import lane_device, op_seed_draw
from numerics import assert_close_to_ref


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


pytestmark = pytest.mark.usefixtures("cpu_backend")


def make_inputs(lead, h, b, dtype, bias=True, residual=True, scale="float", requires_grad=True):
    t = dict(x=torch.randn(*lead, h, dtype=dtype), down_weight=torch.randn(b, h, dtype=dtype) / h**0.5,
             up_weight=torch.randn(h, b, dtype=dtype) / b**0.5)
    if bias:
        t.update(down_bias=torch.randn(b, dtype=dtype), up_bias=torch.randn(h, dtype=dtype))
    if residual:
        t["residual"] = torch.randn(*lead, h, dtype=dtype)
    if scale == "scalar":
        t["scaling"] = torch.randn((), dtype=dtype) + 2.0
    elif scale == "one":  # AdapterHub's "learned" scaling: a parameter of shape [1]
        t["scaling"] = torch.randn(1, dtype=dtype) + 2.0
    elif scale == "channel":
        t["scaling"] = torch.randn(h, dtype=dtype) + 1.0
    for v in t.values():
        v.requires_grad_(requires_grad)
    return t


def clone_leaves(t, dtype=None):
    return {k: v.detach().to(dtype or v.dtype).requires_grad_() for k, v in t.items()}


def check_against_reference(t, act="relu", scaling=0.7, tiny=None, **kwargs):
    dtype = t["x"].dtype
    tiny = tiny if tiny is not None else (1e-13 if dtype == torch.float64 else 1e-7)
    inputs = dict(t)
    inputs.setdefault("scaling", scaling)
    y = bottleneck_adapter(**inputs, activation=act, **kwargs)
    ref_t, peer_t = clone_leaves(t, torch.float64), clone_leaves(t)
    ref = adapter_op_math(**{**ref_t, "scaling": ref_t.get("scaling", scaling)}, act=act)
    peer = adapter_op_math(**{**peer_t, "scaling": peer_t.get("scaling", scaling)}, act=act)
    assert y.dtype == dtype and y.shape == t["x"].shape
    assert_close_to_ref(y, ref, peer, tiny=tiny, what="y")
    dy = torch.randn_like(y)
    names = list(t)
    got = torch.autograd.grad(y, [t[n] for n in names], dy)
    want = torch.autograd.grad(ref, [ref_t[n] for n in names], dy.double())
    peer_grads = torch.autograd.grad(peer, [peer_t[n] for n in names], dy)
    for name, g, g_ref, g_peer in zip(names, got, want, peer_grads):
        assert g.dtype == dtype and g.shape == t[name].shape, name
        assert_close_to_ref(g, g_ref, g_peer, tiny=tiny, what=f"d {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("lead,h,b", [((1,), 7, 1), ((37,), 45, 3), ((2, 9), 64, 16)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_forward_and_grads_match_float64(dtype, lead, h, b, bias):
    check_against_reference(make_inputs(lead, h, b, dtype, bias=bias, residual=bias, scale="channel" if bias
                                        else "float"), act="gelu")


@pytest.mark.parametrize("scale", ["float", "scalar", "one", "channel"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_scaling_modes(scale, residual):
    check_against_reference(make_inputs((3, 5), 24, 6, torch.float32, residual=residual, scale=scale),
                            act="silu", scaling=1.3)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_every_activation_matches_float64_and_gradchecks(act):
    check_against_reference(make_inputs((13,), 20, 5, torch.float32, scale="channel"), act=act)
    t = make_inputs((2, 3), 6, 3, torch.float64, scale="channel")
    t["x"] = t["x"] + 0.05  # keep the kinks of relu/relu6/leaky relu away from the finite differences
    names = list(t)
    assert torch.autograd.gradcheck(lambda *v: bottleneck_adapter(**dict(zip(names, v)), activation=act),
                                    [t[n] for n in names])


@pytest.mark.parametrize("scale", ["float", "scalar", "one", "channel"])
def test_gradcheck_float64_without_and_with_dropout(scale):
    t = make_inputs((3, 4), 6, 3, torch.float64, scale=scale)
    names = list(t)
    assert torch.autograd.gradcheck(lambda *v: bottleneck_adapter(**dict(zip(names, v)), activation="tanh"),
                                    [t[n] for n in names])

    def dropped(*v):
        torch.manual_seed(1234)  # same seed every call -> same mask; backward must regenerate it
        return bottleneck_adapter(**dict(zip(names, v)), activation="tanh", dropout_p=0.4, training=True)

    assert torch.autograd.gradcheck(dropped, [t[n] for n in names])


def test_noncontiguous_input_and_residual():
    x = torch.randn(33, 6, 40).transpose(0, 1)  # [6, 33, 40] with strides of the transpose
    residual = torch.randn(6, 33, 80)[..., ::2]
    assert not x.is_contiguous() and not residual.is_contiguous()
    t = make_inputs((1,), 40, 8, torch.float32, requires_grad=False)
    t.update(x=x, residual=residual)
    check_against_reference({k: v.requires_grad_() for k, v in t.items()}, act="quick_gelu")


def test_activation_names_are_case_insensitive():
    t = make_inputs((4,), 12, 3, torch.float32, requires_grad=False)
    torch.testing.assert_close(bottleneck_adapter(**t, activation="GELU"), bottleneck_adapter(**t, activation="gelu"))


@settings(max_examples=15, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), h=st.integers(1, 24), b=st.integers(1, 9),
       bias=st.booleans(), residual=st.booleans(), scale=st.sampled_from(["float", "scalar", "channel"]))
def test_any_shape_matches_float64_reference(lead, h, b, bias, residual, scale):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTPEFT_BACKEND", "cpu")
        check_against_reference(make_inputs(tuple(lead), h, b, torch.float64, bias, residual, scale), act="mish")


# --- which gradients are computed ----------------------------------------------------------------------------


def test_frozen_tensors_get_no_gradient_work(monkeypatch):
    calls = []
    real_backward = adapter_cpu.adapter_backward

    def spy(*args):
        calls.append(args[-6:])
        return real_backward(*args)

    monkeypatch.setattr(adapter_cpu, "adapter_backward", spy)
    t = make_inputs((5,), 8, 2, torch.float32, scale="channel", requires_grad=False)
    t["up_weight"].requires_grad_()
    t["scaling"].requires_grad_()
    bottleneck_adapter(**t).sum().backward()
    assert calls == [(False, False, True, False, False, True)]
    assert t["x"].grad is None and t["down_weight"].grad is None and t["residual"].grad is None


def test_residual_only_gradient_is_dy_and_runs_no_backward(monkeypatch):
    monkeypatch.setattr(adapter_cpu, "adapter_backward", lambda *a: pytest.fail("backward ran for residual only"))
    t = make_inputs((3, 4), 8, 2, torch.float32, requires_grad=False)
    t["residual"].requires_grad_()
    dy = torch.randn(3, 4, 8)
    (d_residual,) = torch.autograd.grad(bottleneck_adapter(**t), (t["residual"],), dy)
    torch.testing.assert_close(d_residual, dy)


def test_no_grad_forward_stores_no_pre(monkeypatch):
    stored = []
    real_forward = adapter_cpu.adapter_forward

    def spy(*args):
        stored.append(args[-1])
        return real_forward(*args)

    monkeypatch.setattr(adapter_cpu, "adapter_forward", spy)
    t = make_inputs((4,), 8, 2, torch.float32)
    with torch.no_grad():
        bottleneck_adapter(**t)
    bottleneck_adapter(**t)
    assert stored == [False, True]


# --- dropout -------------------------------------------------------------------------------------------------


def test_dropout_semantics_and_statistics():
    h, p = 512, 0.3
    x = torch.randn(64, h)
    residual = torch.randn(64, h)
    up_bias = torch.rand(h) + 0.5  # adapter output = 2 * up_bias > 0: a zero can only be a dropped element
    zero_down, zero_up = torch.zeros(4, h), torch.zeros(h, 4)
    y = bottleneck_adapter(x, zero_down, zero_up, up_bias=up_bias, residual=residual, scaling=2.0,
                           dropout_p=p, training=True)
    out = y - residual
    dropped = out.abs() < 1e-6
    torch.testing.assert_close(out[~dropped], (2.0 * up_bias / (1 - p)).expand(64, h)[~dropped])
    sigma = (p * (1 - p) / out.numel()) ** 0.5
    assert abs(dropped.float().mean().item() - p) < 5 * sigma
    # eval mode applies no dropout
    torch.testing.assert_close(bottleneck_adapter(x, zero_down, zero_up, up_bias=up_bias, residual=residual,
                                                  scaling=2.0, dropout_p=p, training=False),
                               residual + 2.0 * up_bias)


def test_dropout_mask_of_the_op_matches_adapter_dropout_mask():
    t = make_inputs((6, 5), 16, 4, torch.float32, residual=False, requires_grad=False)
    torch.manual_seed(11)
    y = bottleneck_adapter(**t, dropout_p=0.5, training=True)
    torch.manual_seed(11)
    seed = op_seed_draw()
    keep = adapter_dropout_mask((30, 16), 0.5, seed, lane_device()).view(6, 5, 16)
    full = bottleneck_adapter(**t)
    torch.testing.assert_close(y, torch.where(keep, full * 2.0, torch.zeros(())))


def test_dropout_draws_a_new_mask_each_call_and_follows_manual_seed():
    t = make_inputs((16,), 32, 8, torch.float32, requires_grad=False)
    torch.manual_seed(5)
    y1 = bottleneck_adapter(**t, dropout_p=0.5, training=True)
    y2 = bottleneck_adapter(**t, dropout_p=0.5, training=True)
    torch.manual_seed(5)
    assert not torch.equal(y1, y2)
    assert torch.equal(y1, bottleneck_adapter(**t, dropout_p=0.5, training=True))


# --- torch.compile, the Triton path through the op -----------------------------------------------------------


def test_torch_compile_fullgraph_traces_the_op():
    t = make_inputs((2, 5), 16, 4, torch.float32, scale="channel")

    def fn(x, down_weight, up_weight, down_bias, up_bias, residual, scaling):
        return bottleneck_adapter(x, down_weight, up_weight, down_bias, up_bias, residual, scaling, "gelu") * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    names = list(t)
    eager_y = fn(**t)
    eager_grads = torch.autograd.grad(eager_y.sum(), [t[n] for n in names])
    y = compiled(**t)
    grads = torch.autograd.grad(y.sum(), [t[n] for n in names])
    torch.testing.assert_close(y, eager_y)
    for name, g, g_eager in zip(names, grads, eager_grads):
        torch.testing.assert_close(g, g_eager, msg=name)


def test_triton_path_through_the_op(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")  # the Triton kernels under the interpreter
    check_against_reference(make_inputs((3, 7), 40, 12, torch.float16, scale="one"), act="gelu_new",
                            tiny=1e-6)
    t = make_inputs((9,), 24, 5, torch.float32, requires_grad=False)
    torch.manual_seed(3)
    y = bottleneck_adapter(**t, dropout_p=0.3, training=True)
    torch.manual_seed(3)
    seed = op_seed_draw()
    keep = adapter_dropout_mask((9, 24), 0.3, seed, lane_device())
    torch.testing.assert_close(y - t["residual"],
                               torch.where(keep, (bottleneck_adapter(**t) - t["residual"]) / 0.7, torch.zeros(())))


# --- bad input -----------------------------------------------------------------------------------------------


def _good():
    return make_inputs((2, 3), 8, 4, torch.float32, scale="channel", requires_grad=False)


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.randn(2, 3, 9)), ValueError, "down_weight: dim 1"),
    (dict(x=torch.tensor(1.0)), ValueError, "x must have at least one dimension"),
    (dict(x=torch.randint(0, 3, (2, 3, 8))), TypeError, "x has dtype torch.int64"),
    (dict(down_weight=torch.randn(4, 8, 1)), ValueError, "down_weight must have 2 dimensions"),
    (dict(down_weight=torch.randn(0, 8), up_weight=torch.randn(8, 0)), ValueError, "bottleneck size 0"),
    (dict(up_weight=torch.randn(9, 4)), ValueError, "up_weight: dim 0"),
    (dict(up_weight=torch.randn(8, 5)), ValueError, "up_weight: dim 1"),
    (dict(down_bias=torch.randn(5)), ValueError, "down_bias: length"),
    (dict(up_bias=torch.randn(7)), ValueError, "up_bias: length"),
    (dict(residual=torch.randn(2, 8)), ValueError, "residual has shape"),
    (dict(up_weight=torch.randn(8, 4, dtype=torch.float64)), TypeError, "up_weight has dtype torch.float64"),
    (dict(residual=torch.randn(2, 3, 8, device="meta")), ValueError, "residual is on meta"),
    (dict(scaling=torch.randn(7)), ValueError, "scaling has shape"),
    (dict(scaling=torch.randn(8, dtype=torch.float16)), TypeError, "scaling has dtype"),
    (dict(scaling="learned"), TypeError, "scaling must be a float or a tensor"),
    (dict(scaling=torch.randn(8, device="meta")), ValueError, "scaling is on meta"),
    (dict(activation="softsign"), ValueError, "activation 'softsign' is not supported; accepted: gelu"),
    (dict(activation=None), TypeError, "activation must be a str"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
])
def test_bad_input_raises_naming_the_argument(change, error, match):
    t = _good()
    t.update(change)
    with pytest.raises(error, match=match):
        bottleneck_adapter(**t)


def test_bottleneck_above_256_on_the_triton_path_raises(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    t = make_inputs((2,), 300, 257, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="down_weight.*up to 256.*FASTPEFT_BACKEND=cpu"):
        bottleneck_adapter(**t)
