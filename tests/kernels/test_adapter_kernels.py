"""Triton bottleneck-adapter kernels (fastpeft.kernels.adapter) under the interpreter, against float64.

Every output and gradient is compared with the same math in float64 and with
plain torch in the input dtype (tests/numerics.py). The reference is written
here from AdapterHub's ``Adapter.forward`` (down, the activation AdapterHub
builds, see tests/adapter_reference.py, up, scale, dropout, residual) and
differentiated by torch autograd, so neither the activation table nor the backward formulas
of the code under test enter it. Dropout references are built from
``dropout_mask``, so a forward/backward/mask disagreement fails. Every tensor
the launchers allocate with ``torch.empty`` is NaN/-1-poisoned first.
"""
import math

import pytest
import torch

from adapter_reference import reference_activation
from fastpeft.kernels import adapter as tl_adapter
from lane_device import lane_device
from numerics import assert_close_to_ref

SEED = 0x2F1E_D00D_1234_5678  # > 2**32: exercises both halves of the Philox key
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_NAMES = ("dx", "d_down_weight", "d_up_weight", "d_down_bias", "d_up_bias", "d_scale")


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN (float) / -1 (int) filled tensors while a test runs."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", empty)


def make(m, h, b, dtype, layout="contiguous", scale="float"):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)

    if layout == "strided":  # every other column of a wider matrix
        x, dy, res = rand(m, 2 * h)[:, ::2], rand(m, 2 * h)[:, ::2], rand(m, 3 * h)[:, ::3]
        down_w, up_w = rand(b, 2 * h, scale=h**-0.5)[:, ::2], rand(2 * h, b, scale=b**-0.5)[::2]
    elif layout == "transposed":  # column-major
        x, dy, res = rand(h, m).t(), rand(h, m).t(), rand(h, m).t()
        down_w, up_w = rand(h, b, scale=h**-0.5).t(), rand(b, h, scale=b**-0.5).t()
    else:
        x, dy, res = rand(m, h), rand(m, h), rand(m, h)
        down_w, up_w = rand(b, h, scale=h**-0.5), rand(h, b, scale=b**-0.5)
    scales = {"float": None, "scalar": rand(1)[0] + 1.5, "channel": rand(h) + 1.0}
    return dict(x=x, down_w=down_w, up_w=up_w, down_b=rand(b), up_b=rand(h), res=res, dy=dy,
                scale=scales[scale])


def adapter_math(t, scaling, act, keep, p, bias=True, residual=True):
    """y, pre and every gradient of the adapter for the tensors ``t`` (x's dtype: torch peer; fp64: reference)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items()
              if k in ("x", "down_w", "up_w", "down_b", "up_b", "scale") and v is not None}
    pre = leaves["x"] @ leaves["down_w"].t() + (leaves["down_b"] if bias else 0)
    up = reference_activation(act)(pre) @ leaves["up_w"].t() + (leaves["up_b"] if bias else 0)
    out = up * (leaves["scale"] if "scale" in leaves else scaling)
    if keep is not None:
        out = out * keep.to(out.dtype) * (1.0 / (1.0 - p))
    y = out + t["res"] if residual else out
    order = ["x", "down_w", "up_w"] + (["down_b", "up_b"] if bias else []) + (["scale"] if "scale" in leaves else [])
    grads = dict(zip(order, torch.autograd.grad(y, [leaves[k] for k in order], t["dy"])))
    return dict(y=y.detach(), pre=pre.detach(), dx=grads["x"], d_down_weight=grads["down_w"],
                d_up_weight=grads["up_w"], d_down_bias=grads.get("down_b"), d_up_bias=grads.get("up_b"),
                d_scale=grads.get("scale"))


def run_kernels(t, scaling, act, p, bias=True, residual=True, need=(True,) * 6):
    down_b, up_b = (t["down_b"], t["up_b"]) if bias else (None, None)
    y, pre = tl_adapter.adapter_forward(t["x"], t["down_w"], t["up_w"], down_b, up_b,
                                        t["res"] if residual else None, scaling, t["scale"], act, p, SEED, True)
    grads = tl_adapter.adapter_backward(t["dy"], t["x"], t["down_w"], t["up_w"], up_b, pre, scaling, t["scale"], act,
                                        p, SEED, *need)
    return dict(y=y, pre=pre, **dict(zip(GRAD_NAMES, grads)))


def check_all(m, h, b, dtype, act="relu", p=0.0, scale="float", bias=True, residual=True, layout="contiguous",
              scaling=0.75):
    t = make(m, h, b, dtype, layout, scale)
    keep = tl_adapter.dropout_mask((m, h), p, SEED, lane_device()) if p > 0 else None
    got = run_kernels(t, scaling, act, p, bias, residual)
    ref = adapter_math({k: v.double() if v is not None else None for k, v in t.items()}, scaling, act, keep, p,
                       bias, residual)
    peer = adapter_math(t, scaling, act, keep, p, bias, residual)
    assert got["y"].is_contiguous() and got["y"].dtype == dtype and got["pre"].dtype == torch.float32
    for name in ("y", "pre") + GRAD_NAMES:
        if ref[name] is None:
            assert got[name] is None or name in ("d_down_bias", "d_up_bias"), f"{name} returned but not defined"
            continue
        assert got[name].dtype == (torch.float32 if name == "pre" else dtype), name
        assert_close_to_ref(got[name], ref[name], peer[name], what=name)


SHAPES = [  # (M, H, b): M=1, odd sizes, b below/at/above 16 and up to 32
    (1, 45, 13),
    (37, 70, 20),
    (40, 96, 32),
    (19, 33, 5),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}H{}b{}".format(*s))
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_and_every_gradient_match_float64(dtype, shape, p):
    bias = shape[2] % 2 == 0  # biases on for even b, off for odd b
    check_all(*shape, dtype, p=p, bias=bias, residual=bias or p > 0)


ACTIVATIONS = ["relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "silu", "swish", "tanh",
               "sigmoid", "leakyrelu", "leaky_relu", "mish", "relu6", "linear", "identity"]


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_activation(act, dtype):
    check_all(23, 40, 12, dtype, act=act, scale="channel", p=0.2)


@pytest.mark.parametrize("scale", ["float", "scalar", "channel"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_scaling_modes_with_and_without_residual(scale, residual, dtype):
    check_all(29, 48, 16, dtype, act="gelu", scale=scale, residual=residual, p=0.1)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs_and_weights(layout, dtype):
    check_all(21, 40, 10, dtype, act="silu", scale="channel", p=0.25, layout=layout)


def test_several_row_blocks_and_output_tiles():
    """M above the forward/backward row tiles and H above one output tile."""
    check_all(133, 150, 24, torch.float16, act="gelu_new", p=0.2, scale="scalar")


def test_column_groups_recompute_pre_and_store_it_once(monkeypatch):
    """Few row blocks: the output columns are split over extra programs (each recomputes pre)."""
    monkeypatch.setattr(tl_adapter, "TARGET_PROGRAMS", 10**6)
    config = tl_adapter.configs(24, torch.float32)[0]
    assert tl_adapter._column_groups(1, math.ceil(150 / config.block_n)) > 1
    check_all(5, 150, 24, torch.float32, act="tanh", p=0.3, scale="channel")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 9])
def test_split_k_down_projection_for_few_rows(monkeypatch, dtype, m):
    """Few rows: x W_dᵀ is summed from K-range partials (forced small here, ragged last range included)."""
    monkeypatch.setattr(tl_adapter, "SPLIT_K_MIN", 32)
    assert tl_adapter._down_splits(1, 150) == 5
    launches = []
    real_down = tl_adapter._adapter_down_kernel
    monkeypatch.setattr(tl_adapter, "_adapter_down_kernel", _Recorder(real_down, launches))
    check_all(m, 150, 24, dtype, act="gelu", p=0.2, scale="channel")
    assert launches, "the split-K path did not run"


def test_many_rows_do_not_split_k():
    config = tl_adapter.configs(64, torch.float16)[0]
    assert tl_adapter._down_splits(math.ceil(4096 / config.block_m), 4096) == 1
    assert tl_adapter._down_splits(1, 4096) == tl_adapter.MAX_DOWN_SPLITS


class _Recorder:
    """Wraps a @triton.jit kernel: records each launch, then runs it."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(grid)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_m_reduction_is_correct_and_deterministic(monkeypatch, dtype):
    """Long M: dW_u/dW_d are summed over row ranges (forced small here), ragged last range included."""
    monkeypatch.setattr(tl_adapter, "_MIN_SPLIT_ROWS", 16)
    monkeypatch.setattr(tl_adapter, "TARGET_PROGRAMS", 10**6)
    assert tl_adapter._reduce_splits(133, 1) > 1
    check_all(133, 45, 12, dtype, act="gelu", p=0.3, scale="channel")
    t = make(133, 45, 12, dtype, scale="channel")
    first = run_kernels(t, 1.0, "gelu", 0.3)
    second = run_kernels(t, 1.0, "gelu", 0.3)
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical calls"


@pytest.mark.parametrize("wanted", range(6), ids=lambda i: GRAD_NAMES[i])
def test_only_requested_gradients(wanted):
    need = tuple(i == wanted for i in range(6))
    m, h, b, p = 21, 45, 7, 0.25
    t = make(m, h, b, torch.float32, scale="channel")
    got = run_kernels(t, 1.0, "gelu", p, need=need)
    keep = tl_adapter.dropout_mask((m, h), p, SEED, lane_device())
    ref = adapter_math({k: v.double() for k, v in t.items()}, 1.0, "gelu", keep, p)
    peer = adapter_math(t, 1.0, "gelu", keep, p)
    for i, name in enumerate(GRAD_NAMES):
        if need[i]:
            assert_close_to_ref(got[name], ref[name], peer[name], what=name)
        else:
            assert got[name] is None, f"{name} was not asked for but returned"


def test_float_scale_gives_no_scale_gradient():
    t = make(9, 33, 5, torch.float32)
    assert run_kernels(t, 2.0, "relu", 0.0)["d_scale"] is None


def test_inference_forward_stores_no_pre_and_matches_training_forward():
    t = make(17, 40, 9, torch.float16, scale="channel")
    args = (t["x"], t["down_w"], t["up_w"], t["down_b"], t["up_b"], t["res"], 1.0, t["scale"], "gelu", 0.0, 0)
    y_inference, pre = tl_adapter.adapter_forward(*args, False)
    y_training, _ = tl_adapter.adapter_forward(*args, True)
    assert pre is None and torch.equal(y_inference, y_training)


def test_no_rows():
    t = make(0, 33, 5, torch.float32, scale="scalar")
    got = run_kernels(t, 1.0, "relu", 0.0)
    assert got["y"].shape == (0, 33) and got["dx"].shape == (0, 33)
    for name in GRAD_NAMES[1:]:
        assert torch.equal(got[name], torch.zeros_like(got[name])), name


def test_bottleneck_above_256_raises_naming_down_weight():
    t = make(3, 300, 257, torch.float32)
    with pytest.raises(ValueError, match="down_weight.*256"):
        tl_adapter.adapter_forward(t["x"], t["down_w"], t["up_w"], None, None, None, 1.0, None, "relu", 0.0, 0, False)


# --- the dropout mask ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_keep_rate_within_binomial_bound(p):
    m, h = 150, 203
    keep = tl_adapter.dropout_mask((m, h), p, SEED + int(p * 10), lane_device())
    assert keep.dtype == torch.bool and keep.shape == (m, h)
    count = m * h
    assert abs(int(keep.sum()) - count * (1 - p)) < 5 * math.sqrt(count * p * (1 - p))


def test_forward_drops_exactly_the_masked_elements_and_scales_the_kept():
    m, h, b, p = 40, 64, 8, 0.4
    t = make(m, h, b, torch.float32)
    x = t["x"]
    down_w = torch.eye(b, h, dtype=torch.float32)  # pre = first b columns of x
    up_w = torch.zeros(h, b)
    up_b = torch.rand(h) + 0.5  # adapter output before dropout = s * up_b > 0 everywhere
    y, _ = tl_adapter.adapter_forward(x, down_w, up_w, None, up_b, None, 2.0, None, "relu", p, SEED, False)
    keep = tl_adapter.dropout_mask((m, h), p, SEED, lane_device())
    expected = torch.where(keep, 2.0 * up_b / (1 - p), torch.zeros(()))
    torch.testing.assert_close(y, expected.expand(m, h))
    assert abs((~keep).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / (m * h))


def test_mask_depends_on_the_seed_and_not_on_launch_shape():
    a = tl_adapter.dropout_mask((40, 50), 0.25, 7, lane_device())
    assert torch.equal(a, tl_adapter.dropout_mask((40, 50), 0.25, 7, lane_device()))
    assert not torch.equal(a, tl_adapter.dropout_mask((40, 50), 0.25, 8, lane_device()))
    assert torch.equal(a[:20], tl_adapter.dropout_mask((20, 50), 0.25, 7, lane_device()))
