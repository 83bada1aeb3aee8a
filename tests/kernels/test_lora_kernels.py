"""Triton LoRA kernels (fastpeft.kernels.lora) under the interpreter, against float64 references.

Each output is compared with the same math in float64 and with plain torch in
the input dtype (tests/numerics.py). Dropout references are built from
``dropout_mask``, so a forward/backward/mask disagreement fails. Every float or
int tensor the launchers allocate is NaN/-1-poisoned first, so an element a
kernel forgets to write fails. bf16 runs the kernels with fp32 dot operands
(``_upcast``): the interpreter's bf16 ``tl.dot`` is wrong, everything else
about the bf16 path (loads, casts, stores) is the real code.
"""
import math

import pytest
import torch

from fastpeft.kernels import _lora_configs as cfg
from fastpeft.kernels import lora as tl_lora
from lane_device import lane_device, op_seed_draw
from numerics import assert_close_to_ref

SEED = 0x2F1E_D00D_1234_5678  # > 2**32: exercises both halves of the Philox key


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN (float) / -1 (int) filled tensors while a test runs."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", empty)


def make(m, k, n, r, dtype, layout="contiguous"):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)

    if layout == "strided":  # every other column of a wider matrix
        x, dy = rand(m, 2 * k)[:, ::2], rand(m, 2 * n)[:, ::2]
    elif layout == "transposed":  # column-major
        x, dy = rand(k, m).t(), rand(n, m).t()
    else:
        x, dy = rand(m, k), rand(m, n)
    w = rand(n, k, scale=k**-0.5)
    b = rand(n)
    a = rand(r, k, scale=k**-0.5)
    bb = rand(n, r, scale=r**-0.5)
    return x, w, b, a, bb, dy


def lora_math(x, w, b, a, bb, dy, s, keep, p):
    """y, h, dx, dA, dB of the LoRA linear in x's dtype (torch peer) or float64 (reference)."""
    dropped = x if keep is None else x * keep.to(x.dtype) * (1.0 / (1.0 - p))
    y = x @ w.t() if b is None else x @ w.t() + b
    h = dropped @ a.t()  # the saved h is unscaled: s multiplies the fp32 accumulators
    y = y + (h @ bb.t()) * s
    dh = s * (dy @ bb)
    dA = dh.t() @ dropped
    dB = s * (dy.t() @ h)
    lora_dx = dh @ a
    if keep is not None:
        lora_dx = lora_dx * keep.to(x.dtype) * (1.0 / (1.0 - p))
    dx = dy @ w + lora_dx
    return dict(y=y, h=h, dx=dx, dA=dA, dB=dB)


def check_all(m, k, n, r, dtype, bias, p, layout="contiguous", scaling=0.75):
    x, w, b, a, bb, dy = make(m, k, n, r, dtype, layout)
    b = b if bias else None
    keep = tl_lora.dropout_mask((m, k), p, SEED, lane_device()) if p > 0 else None

    y, h = tl_lora.lora_forward(x, w, b, a, bb, scaling, p, SEED)
    dx, dA, dB = tl_lora.lora_backward(dy, x, w, a, bb, h, scaling, p, SEED, True, True, True)
    got = dict(y=y, h=h, dx=dx, dA=dA, dB=dB)

    ref = lora_math(*(t.double() if t is not None else None for t in (x, w, b, a, bb, dy)), scaling, keep, p)
    peer = lora_math(x, w, b, a, bb, dy, scaling, keep, p)
    assert y.is_contiguous() and y.dtype == dtype and h.dtype == dtype
    assert dx.dtype == dtype and dA.dtype == dtype and dB.dtype == dtype
    for name, out in got.items():
        # A handful of dot products (h when M·r <= 4; dA, dB are scaled copies of h, dh then) can come out exact
        # in torch by luck: allow the few roundings of one dot product and its scaling there (a wrong mask or
        # index is off by far more).
        few = out.numel() <= 4 or (name in ("h", "dA", "dB") and m * r <= 4)
        tiny = 4 * torch.finfo(out.dtype).eps if few else 1e-12
        assert_close_to_ref(out, ref[name], peer[name], what=name, tiny=tiny)


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel in fastpeft.kernels.lora: records launches, runs nothing."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, dict(zip(self.kernel.arg_names, args)), kwargs))
        return launch


SHAPES = [  # (M, K, N, r): M=1, odd sizes, r below/at/above one 16-wide chunk and above 64
    (1, 45, 33, 1),
    (37, 70, 33, 3),
    (37, 45, 33, 16),
    (19, 45, 70, 20),
    (17, 33, 29, 70),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}K{}N{}r{}".format(*s))
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_and_backward_match_float64(dtype, shape, p):
    bias = shape[3] % 2 == 0  # bias on for even r, off for odd r
    check_all(*shape, dtype, bias, p)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_non_contiguous_x_and_dy(layout, dtype, p):
    check_all(37, 45, 33, 8, dtype, True, p, layout)


def test_large_tiles_and_multiple_programs():
    """M above the largest row tile and N above one column tile: several programs in every grid."""
    check_all(133, 70, 150, 8, torch.float16, True, 0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_m_reduction_is_correct_and_deterministic(monkeypatch, dtype):
    """Long M: dA/dB are summed over row ranges (forced small here), ragged last range included, both sums in
    one launch."""
    monkeypatch.setattr(cfg, "FILL_PROGRAMS", 9)  # 9 row tiles of 16: the dh shrink fills it unsplit
    monkeypatch.setattr(cfg, "REDUCE_MIN_SPLIT_ROWS", 16)
    monkeypatch.setattr(cfg, "REDUCE_TARGET_PROGRAMS", 10**6)
    assert cfg.plan_shrink(133, 33, 5, dtype)[1] == 1
    for p_len in (45, 33):  # dA, dB: several ranges, the last one ragged
        _, splits, rows_per_split = cfg.plan_reduce(133, p_len, 5, dtype)
        assert splits > 2 and 133 % rows_per_split != 0
    check_all(133, 45, 33, 5, dtype, False, 0.3)
    x, w, b, a, bb, dy = make(133, 45, 33, 5, dtype)
    _, h = tl_lora.lora_forward(x, w, b, a, bb, 1.0, 0.3, SEED)
    first = tl_lora.lora_backward(dy, x, w, a, bb, h, 1.0, 0.3, SEED, False, True, True)
    second = tl_lora.lora_backward(dy, x, w, a, bb, h, 1.0, 0.3, SEED, False, True, True)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    for need in ((False, True, False), (False, False, True)):  # one split reduction alone
        grads = tl_lora.lora_backward(dy, x, w, a, bb, h, 1.0, 0.3, SEED, *need)
        for got, want in zip(grads, first):
            assert got is None or torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_split_k_shrink_matches_float64(dtype, m, p):
    """Few rows: h = drop(x) Aᵀ and dh = dy B are split over K (N), ragged last split included; everything
    downstream (y, dx, dA, dB) sees the summed result."""
    k, n = 150, 99
    for length in (k, n):
        config, splits, per_split = cfg.plan_shrink(m, length, 8, dtype)
        assert splits > 2 and length % per_split != 0 and per_split % config.block_k == 0
    check_all(m, k, n, 8, dtype, True, p)


def test_split_plans_cover_the_loop_and_fill_the_gpu():
    """Every step in exactly one split (none empty); FILL_PROGRAMS programs whenever the loop is long enough."""
    for tiles in (1, 2, 3, 7, 64, 131, 132, 500):
        for steps in (1, 2, 5, 64, 131, 132, 133, 256, 896):
            splits, per_split = cfg.plan_splits(tiles, steps)
            assert (splits - 1) * per_split < steps <= splits * per_split
            if tiles >= cfg.FILL_PROGRAMS:
                assert splits == 1
            elif tiles * steps >= cfg.FILL_PROGRAMS:
                assert tiles * splits >= cfg.FILL_PROGRAMS
            else:
                assert splits == steps


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_split_k_shrink_non_contiguous(layout):
    assert cfg.plan_shrink(2, 150, 8, torch.float16)[1] > 1
    check_all(2, 150, 99, 8, torch.float16, False, 0.3, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_k_shrink_is_deterministic_and_keeps_the_mask(monkeypatch, dtype):
    """Bit-identical h on every call; the unsplit kernel (a one-program-per-tile plan forced) differs by
    summation order only, and both apply the same (seed, row, col) dropout mask."""
    x, w, b, a, bb, _ = make(3, 300, 40, 8, dtype)
    _, h1 = tl_lora.lora_forward(x, w, b, a, bb, 1.0, 0.5, SEED)
    _, h2 = tl_lora.lora_forward(x, w, b, a, bb, 1.0, 0.5, SEED)
    assert torch.equal(h1, h2)
    monkeypatch.setattr(cfg, "FILL_PROGRAMS", 1)
    assert cfg.plan_shrink(3, 300, 8, dtype)[1] == 1
    _, unsplit = tl_lora.lora_forward(x, w, b, a, bb, 1.0, 0.5, SEED)
    keep = tl_lora.dropout_mask((3, 300), 0.5, SEED, lane_device())
    ref = (x.double() * keep / 0.5) @ a.double().t()
    peer = (x * keep.to(dtype) / 0.5) @ a.t()
    assert_close_to_ref(h1, ref, peer, what="split h")
    assert_close_to_ref(unsplit, ref, peer, what="unsplit h")


@pytest.fixture
def recorded_launches(monkeypatch):
    """Every LoRA kernel launch is recorded (kernel name, grid) instead of run."""
    launches = []
    for name in ("_lora_shrink_kernel", "_lora_fused_gemm_kernel", "_lora_reduce_kernel", "_lora_split_sum_kernel"):
        monkeypatch.setattr(tl_lora, name, _GridRecorder(getattr(tl_lora, name), launches))
    return launches


class _GridRecorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel.__name__, tuple(grid)))


def _count_backward_launches(launches, m, k, n, r, dtype, need=(True, True, True)):
    launches.clear()
    def zeros(*shape):  # no memory: nothing runs
        return torch.zeros((1, 1), dtype=dtype).expand(*shape)

    x, dy, w, a, bb, h = zeros(m, k), zeros(m, n), zeros(n, k), zeros(r, k), zeros(n, r), zeros(m, r)
    tl_lora.lora_backward(dy, x, w, a, bb, h, 1.0, 0.1, SEED, *need)
    return [name for name, _ in launches]


@pytest.mark.parametrize("m", [1, 16, 512, 1024, 1500, 2048, 4096, 8192])
@pytest.mark.parametrize("kn", [(1024, 1024), (4096, 4096), (4096, 14336)], ids=lambda kn: "K{}N{}".format(*kn))
def test_backward_takes_at_most_five_launches(recorded_launches, m, kn):
    """dB, dh (+ the sum of its splits), dA, one sum of the dA/dB splits, dx: the reductions do not split when the
    shrink does, so at most one summing launch joins the four kernels. (Launches recorded, nothing runs.)"""
    for r in (8, 128):
        for dtype in (torch.float32, torch.bfloat16):
            names = _count_backward_launches(recorded_launches, m, *kn, r, dtype)
            assert len(names) <= 5, (r, dtype, names)
            assert names.count("_lora_split_sum_kernel") <= 1, (r, dtype, names)
            assert names.count("_lora_reduce_kernel") == 2 and names.count("_lora_fused_gemm_kernel") == 1


def test_both_reductions_split_in_one_summing_launch(recorded_launches):
    names = _count_backward_launches(recorded_launches, 4096, 1024, 1024, 16, torch.float16)
    assert names == ["_lora_reduce_kernel", "_lora_shrink_kernel", "_lora_reduce_kernel", "_lora_split_sum_kernel",
                     "_lora_fused_gemm_kernel"]


@pytest.mark.parametrize("need", [(dx, da, db) for dx in (0, 1) for da in (0, 1) for db in (0, 1)],
                         ids=lambda n: "dx{}dA{}dB{}".format(*n))
def test_only_requested_gradients(need):
    m, k, n, r, p, s = 21, 45, 33, 5, 0.25, 1.5
    x, w, b, a, bb, dy = make(m, k, n, r, torch.float32)
    _, h = tl_lora.lora_forward(x, w, b, a, bb, s, p, SEED)
    grads = tl_lora.lora_backward(dy, x, w, a, bb, h, s, p, SEED, *map(bool, need))
    keep = tl_lora.dropout_mask((m, k), p, SEED, lane_device())
    ref = lora_math(x.double(), w.double(), b.double(), a.double(), bb.double(), dy.double(), s, keep, p)
    peer = lora_math(x, w, b, a, bb, dy, s, keep, p)
    for wanted, got, name in zip(need, grads, ("dx", "dA", "dB")):
        if wanted:
            assert_close_to_ref(got, ref[name], peer[name], what=name)
        else:
            assert got is None, f"{name} was not asked for but returned"


@pytest.mark.parametrize("need", [(dx, da, db) for dx in (0, 1) for da in (0, 1) for db in (0, 1)],
                         ids=lambda n: "dx{}dA{}dB{}".format(*n))
def test_backward_launches_only_needed_kernels(monkeypatch, need):
    x, w, b, a, bb, dy = make(21, 45, 33, 5, torch.float32)
    _, h = tl_lora.lora_forward(x, w, b, a, bb, 1.0, 0.2, SEED)
    launches = []
    for name in ("_lora_shrink_kernel", "_lora_fused_gemm_kernel", "_lora_reduce_kernel"):
        monkeypatch.setattr(tl_lora, name, _LaunchRecorder(getattr(tl_lora, name), launches))
    tl_lora.lora_backward(dy, x, w, a, bb, h, 1.0, 0.2, SEED, *map(bool, need))
    names = sorted(kernel.__name__ for kernel, _, _ in launches)
    need_dx, need_dA, need_dB = need
    expected = (["_lora_shrink_kernel"] if need_dx or need_dA else []) + ["_lora_fused_gemm_kernel"] * need_dx \
        + ["_lora_reduce_kernel"] * (need_dA + need_dB)
    assert names == sorted(expected)


@pytest.mark.parametrize("r, steps", [(1, 1), (8, 1), (16, 1), (17, 2), (32, 2), (33, 4), (64, 4), (65, 8),
                                      (256, 16)])
def test_fused_gemm_rank_chunks(monkeypatch, r, steps):
    """The LoRA term's rank runs in a power of two of zero-padded 16-wide chunks, at most two unrolled at compile
    time (a runtime loop before the main loop cost r = 8 a third more registers and half the CTAs per SM on
    sm_90; unrolling all eight chunks of r = 128 took fp32 to 255 registers), the rest in a loop."""
    x, w, b, a, bb, dy = make(3, 32, 16, r, torch.float32)
    launches = []
    monkeypatch.setattr(tl_lora, "_lora_fused_gemm_kernel", _LaunchRecorder(tl_lora._lora_fused_gemm_kernel,
                                                                            launches))
    _, h = tl_lora.lora_forward(x, w, b, a, bb, 1.0, 0.0, SEED)
    tl_lora.lora_backward(dy, x, w, a, bb, h, 1.0, 0.0, SEED, True, False, False)
    assert len(launches) == 2
    for _, args, kwargs in launches:
        assert args["R"] == r and kwargs["BLOCK_R"] == 16 and kwargs["RANK_STEPS"] == steps
        assert kwargs["UNROLLED_RANK_STEPS"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [100, 130])
def test_rank_chunks_past_the_unrolled_ones(dtype, r):
    """r = 100 and 130: two unrolled chunks, then a loop of five or seven (the last one partly zero padding)."""
    check_all(5, 33, 29, r, dtype, True, 0.2)


def test_dropout_zero_matches_no_mask_and_ignores_seed():
    x, w, b, a, bb, _ = make(9, 45, 33, 4, torch.float32)
    y1, h1 = tl_lora.lora_forward(x, w, b, a, bb, 0.5, 0.0, 1)
    y2, h2 = tl_lora.lora_forward(x, w, b, a, bb, 0.5, 0.0, SEED)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)


def test_gradient_dtypes_and_shapes():
    """dx has x's dtype and shape, dA/dB those of lora_A/lora_B."""
    x, w, b, a, bb, dy = make(4, 45, 33, 4, torch.float16)
    _, h = tl_lora.lora_forward(x, w, b, a, bb, 1.0, 0.0, 0)
    dx, dA, dB = tl_lora.lora_backward(dy, x, w, a, bb, h, 1.0, 0.0, 0, True, True, True)
    assert (dx.dtype, dA.dtype, dB.dtype) == (torch.float16,) * 3
    assert dA.shape == a.shape and dB.shape == bb.shape and dx.shape == x.shape


# --- the dropout mask --------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_keep_rate_within_binomial_bound(p):
    m, k = 150, 203
    keep = tl_lora.dropout_mask((m, k), p, SEED + int(p * 10), lane_device())
    assert keep.dtype == torch.bool and keep.shape == (m, k)
    count = m * k
    sigma = math.sqrt(count * p * (1 - p))
    assert abs(int(keep.sum()) - count * (1 - p)) < 5 * sigma
    # rows and columns are not degenerate (each row keeps something, none keeps everything at p=0.5)
    if p == 0.5:
        per_row = keep.float().mean(1)
        assert 0.2 < float(per_row.min()) and float(per_row.max()) < 0.8


def test_mask_is_a_function_of_seed_row_and_column():
    """(The exact Philox draw of each element is checked in test_dropout_mask.py.)"""
    a = tl_lora.dropout_mask((37, 45), 0.5, SEED, lane_device())
    assert torch.equal(a, tl_lora.dropout_mask((37, 45), 0.5, SEED, lane_device()))
    assert torch.equal(a[:3], tl_lora.dropout_mask((3, 45), 0.5, SEED, lane_device()))
    for other in (SEED + 1, SEED ^ (1 << 40), SEED ^ (1 << 61), 0, 1, 2**62 - 1):
        b = tl_lora.dropout_mask((37, 45), 0.5, other, lane_device())
        assert (a != b).float().mean() > 0.3, f"seed {other:#x} gives nearly the same mask"


def test_backward_regenerates_the_forward_mask():
    """h (forward shrink) and dA (backward reduce) both equal references built from one dropout_mask."""
    m, k, n, r, p = 24, 45, 33, 4, 0.5
    x, w, b, a, bb, dy = make(m, k, n, r, torch.float32)
    keep = tl_lora.dropout_mask((m, k), p, SEED, lane_device())
    _, h = tl_lora.lora_forward(x, w, b, a, bb, 1.0, p, SEED)
    _, dA, _ = tl_lora.lora_backward(dy, x, w, a, bb, h, 1.0, p, SEED, False, True, False)
    dropped = x.double() * keep / (1 - p)
    torch.testing.assert_close(h.double(), dropped @ a.double().t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dA.double(), (dy.double() @ bb.double()).t() @ dropped, rtol=1e-5, atol=1e-5)
    # a different seed in backward gives a different dA
    _, dA_other, _ = tl_lora.lora_backward(dy, x, w, a, bb, h, 1.0, p, SEED + 1, False, True, False)
    assert not torch.allclose(dA_other, dA, rtol=1e-3, atol=1e-3)


def test_mask_of_empty_shape():
    assert tl_lora.dropout_mask((0, 5), 0.5, 3, lane_device()).shape == (0, 5)


def test_empty_batch():
    x, w, b, a, bb, dy = make(0, 45, 33, 4, torch.float32)
    y, h = tl_lora.lora_forward(x, w, b, a, bb, 1.0, 0.2, SEED)
    assert y.shape == (0, 33) and h.shape == (0, 4)
    dx, dA, dB = tl_lora.lora_backward(dy, x, w, a, bb, h, 1.0, 0.2, SEED, True, True, True)
    assert dx.shape == (0, 45) and torch.equal(dA, torch.zeros_like(a)) and torch.equal(dB, torch.zeros_like(bb))


# --- the public op on the Triton backend -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_public_op_on_triton_backend_matches_float64(monkeypatch, dtype):
    from fastpeft.ops import lora_dropout_mask, lora_linear

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    calls = []
    real_forward = tl_lora.lora_forward
    monkeypatch.setattr(tl_lora, "lora_forward", lambda *a: calls.append(1) or real_forward(*a))

    lead, k, n, r, p, s = (2, 7), 45, 33, 6, 0.3, 2.0
    x = torch.randn(*lead, k, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, k) / k**0.5).to(dtype).requires_grad_()
    bb = (torch.randn(n, r) / r**0.5).to(dtype).requires_grad_()
    dy = torch.randn(*lead, n, dtype=dtype)

    torch.manual_seed(1234)
    seed = op_seed_draw()
    torch.manual_seed(1234)
    y = lora_linear(x, w, a, bb, s, bias=b, dropout_p=p, training=True)
    got = torch.autograd.grad(y, (x, b, a, bb), dy)
    assert calls, "the Triton launcher was not used"

    keep = lora_dropout_mask((14, k), p, seed, lane_device()).reshape(*lead, k)

    def math(x, w, b, a, bb):
        dropped = x * keep.to(x.dtype) / (1 - p)
        return x @ w.t() + b + s * (dropped @ a.t()) @ bb.t()

    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b, a, bb)]
    y64 = math(*leaves64)
    ref = torch.autograd.grad(y64, [leaves64[i] for i in (0, 2, 3, 4)], dy.double())
    peers = [t.detach().requires_grad_(t.requires_grad) for t in (x, w, b, a, bb)]
    y_peer = math(*peers)
    peer = torch.autograd.grad(y_peer, [peers[i] for i in (0, 2, 3, 4)], dy)
    assert_close_to_ref(y, y64, y_peer, what="y")
    for name, g, gr, gp in zip(("dx", "db", "dA", "dB"), got, ref, peer):
        assert_close_to_ref(g, gr, gp, what=name)
