"""``fastpeft.ops.dora_linear`` on the CPU path: float64 gradcheck, the factored norm, the ‖W‖² cache,
bad input, the inference path."""
import pytest
import torch

from fastpeft.nn.lora import LoRALinear
from fastpeft.ops.dora import dora_linear, dora_weight_norm, weight_row_norm_sq
from numerics import assert_close_to_ref

pytestmark = pytest.mark.usefixtures("cpu_backend")


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def operands(dtype=torch.float64, n=7, k=9, r=3, bias=True):
    torch.manual_seed(0)
    make = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=True)  # noqa: E731
    return dict(x=make(2, 4, k), weight=make(n, k), lora_A=make(r, k), lora_B=make(n, r),
                magnitude=(torch.rand(n, dtype=dtype) + 0.5).requires_grad_(), bias=make(n) if bias else None)


@pytest.mark.parametrize("training", [False, True])
def test_gradcheck_float64(training):
    """x, m and bias (the norm does not depend on them, so the numerical gradient is the analytic one)."""
    ops = operands()

    def f(x, magnitude, bias):
        torch.manual_seed(5)  # the same dropout mask in every evaluation
        return dora_linear(x, ops["weight"], ops["lora_A"], ops["lora_B"], magnitude, 1.5, bias, 0.25, training)

    assert torch.autograd.gradcheck(f, (ops["x"], ops["magnitude"], ops["bias"]))


def reference(x, weight, lora_A, lora_B, magnitude, bias, scaling):
    """Float64 DoRA with the dense ``B·A`` (what PEFT computes), norm detached."""
    update = weight + scaling * lora_B @ lora_A
    scale = magnitude / update.detach().norm(dim=1)
    return scale * (x @ update.t()) + (bias if bias is not None else 0)


def test_gradients_against_the_float64_dense_reference_with_the_norm_detached():
    """Every gradient (A, B and a trainable W too), fp32 vs float64 with the dense ``B·A``."""
    ops64 = operands()
    ops32 = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in ops64.items()}
    y_ref = reference(*(ops64[k] for k in ("x", "weight", "lora_A", "lora_B", "magnitude", "bias")), 1.5)
    y_ref_torch = reference(*(ops32[k].detach().requires_grad_() if ops32[k] is not None else None
                              for k in ("x", "weight", "lora_A", "lora_B", "magnitude", "bias")), 1.5)
    y = dora_linear(ops32["x"], ops32["weight"], ops32["lora_A"], ops32["lora_B"], ops32["magnitude"], 1.5,
                    ops32["bias"])
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y.backward(dy.float())
    assert_close_to_ref(y, y_ref, y_ref_torch, what="y")
    for name in ("x", "weight", "lora_A", "lora_B", "magnitude", "bias"):
        ref_grad = ops64[name].grad
        assert torch.isfinite(ops32[name].grad).all()
        err = (ops32[name].grad.double() - ref_grad).norm() / ref_grad.norm()
        assert err < 1e-5, (name, float(err))


def test_factored_norm_equals_the_dense_norm():
    ops = operands()
    w, a, b = ops["weight"].detach(), ops["lora_A"].detach(), ops["lora_B"].detach()
    dense = (w + 0.7 * b @ a).norm(dim=1)
    torch.testing.assert_close(dora_weight_norm(w, a, b, 0.7), dense, rtol=1e-12, atol=0)
    torch.testing.assert_close(dora_weight_norm(w, a, b, 0.7, weight_row_norm_sq(w)), dense, rtol=1e-12, atol=0)


def test_weight_norm_cache_follows_in_place_changes_of_the_base_weight():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(8, 6), r=2, variant="dora", init_lora_weights=False)
    x = torch.randn(3, 8)
    before = layer(x)
    cached = layer._dora_weight_norm_sq[1]
    assert layer(x) is not None and layer._dora_weight_norm_sq[1] is cached  # unchanged W: no recomputation
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)
    after = layer(x)
    assert layer._dora_weight_norm_sq[1] is not cached
    expected = reference(x.double(), layer.base_layer.weight.double(), layer.lora_A.weight.double(),
                         layer.lora_B.weight.double(), layer.lora_magnitude_vector.double(),
                         layer.base_layer.bias.double(), layer.scaling)
    torch.testing.assert_close(after.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_norm_cache_is_reused_in_inference_and_recomputed_after_an_update_of_the_pair():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(8, 6), r=2, variant="dora", init_lora_weights=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer(x)
        norm = layer._dora_norm[1]
        layer(x)
        assert layer._dora_norm[1] is norm
        layer.lora_B.weight.add_(0.5)
        after = layer(x)
    assert layer._dora_norm[1] is not norm
    expected = reference(x.double(), layer.base_layer.weight.double(), layer.lora_A.weight.double(),
                         layer.lora_B.weight.double(), layer.lora_magnitude_vector.double(),
                         layer.base_layer.bias.double(), layer.scaling)
    torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-5)


def test_bad_magnitude_raises_value_error_naming_it():
    ops = {k: (v.detach() if v is not None else None) for k, v in operands().items()}
    with pytest.raises(ValueError, match="magnitude"):
        dora_linear(ops["x"], ops["weight"], ops["lora_A"], ops["lora_B"], ops["magnitude"][:-1], 1.0)
    with pytest.raises(TypeError, match="magnitude"):
        dora_linear(ops["x"], ops["weight"], ops["lora_A"], ops["lora_B"], ops["magnitude"].float(), 1.0)
    with pytest.raises(ValueError, match="weight_norm_sq"):
        dora_linear(ops["x"], ops["weight"], ops["lora_A"], ops["lora_B"], ops["magnitude"], 1.0,
                    weight_norm_sq=torch.ones(3, dtype=torch.float64))


def test_no_grad_forward_skips_the_function_and_equals_it():
    """The inference path (no autograd node, z not kept) gives the training path's output bit for bit."""
    ops = operands(dtype=torch.float32)
    args = (ops["x"], ops["weight"], ops["lora_A"], ops["lora_B"], ops["magnitude"], 1.5, ops["bias"])
    with_graph = dora_linear(*args)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        without = dora_linear(*args)
    assert without.grad_fn is None
    assert torch.equal(without, with_graph.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_output_and_gradients_against_float64(dtype):
    """Norms accumulate in fp32; each result is rounded once to the input's dtype (budget: torch's unfused DoRA)."""
    ops64 = {k: v.detach() for k, v in operands(n=40, k=48, r=8).items()}
    low = {k: v.to(dtype).requires_grad_() for k, v in ops64.items()}
    low_torch = {k: v.to(dtype).requires_grad_() for k, v in ops64.items()}
    ref64 = {k: v.clone().requires_grad_() for k, v in ops64.items()}
    names = ("x", "weight", "lora_A", "lora_B", "magnitude", "bias")
    y = dora_linear(low["x"], low["weight"], low["lora_A"], low["lora_B"], low["magnitude"], 1.5, low["bias"])
    y_torch = reference(*(low_torch[k] for k in names), 1.5)
    y_ref = reference(*(ref64[k] for k in names), 1.5)
    dy = torch.randn_like(y_ref)
    for out, d in ((y, dy.to(dtype)), (y_torch, dy.to(dtype)), (y_ref, dy)):
        out.backward(d)
    assert_close_to_ref(y, y_ref, y_torch, what="y")
    for name in names:
        assert_close_to_ref(low[name].grad, ref64[name].grad, low_torch[name].grad, what=name)
