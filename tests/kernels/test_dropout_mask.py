"""The Triton dropout keep-mask (``_common.keep_mask``) under the interpreter: exact and statistically sound.

The mask of element ``(row, col)`` of a ``[rows, row_len]`` operand is output
``col % 4`` of Philox4x32-10 keyed by the 62-bit seed at counter
``row * ceil(row_len / 4) + col // 4``, kept when ``>= p * 2**32``: one Philox
call serves four elements. Checked here against an independent numpy Philox
(the published algorithm, not the kernel code), for several tile sizes of the
mask kernel (the mask must not depend on them), and over a few million draws:
keep rate, each of the four Philox outputs, rows and columns, neighbours and
seeds, each within 5 sigma of what independent Bernoulli draws give.
"""
import math

import numpy as np
import pytest
import torch

from fastpeft.kernels import _lora_configs as cfg
from fastpeft.kernels import lora as tl_lora
from lane_device import lane_device

SEED = 0x2F1E_D00D_1234_5678  # > 2**32: exercises both halves of the Philox key
Z = 5.0  # every statistic within 5 sigma


def philox4x32_10(counter: np.ndarray, key: int):
    """Philox4x32-10 (Salmon et al., SC'11) of 64-bit counters (c0, c1 = low, high word; c2 = c3 = 0)."""
    mask32 = np.uint64(0xFFFFFFFF)
    c = [counter & mask32, counter >> np.uint64(32), np.zeros_like(counter), np.zeros_like(counter)]
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    mul_a, mul_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        prod_a, prod_b = mul_a * c[0], mul_b * c[2]  # 32 x 32 -> 64 bits: exact in uint64
        c = [(prod_b >> np.uint64(32)) ^ c[1] ^ k0, prod_b & mask32,
             (prod_a >> np.uint64(32)) ^ c[3] ^ k1, prod_a & mask32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask32
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask32
    return c


def reference_mask(rows: int, row_len: int, p: float, seed: int) -> torch.Tensor:
    words_per_row = (row_len + 3) // 4
    row = np.arange(rows, dtype=np.uint64)[:, None]
    col = np.arange(row_len, dtype=np.uint64)[None, :]
    outputs = philox4x32_10(row * np.uint64(words_per_row) + col // np.uint64(4), seed)
    lane = np.broadcast_to(col % np.uint64(4), (rows, row_len))
    draws = np.choose(lane.astype(np.int64), outputs)
    threshold = np.float32(min(np.float32(p) * np.float32(2.0**32), np.float32(4294967040.0)))
    return torch.from_numpy(draws >= np.uint64(threshold))


@pytest.mark.parametrize("shape", [(1, 1), (3, 45), (37, 64), (5, 203)], ids=lambda s: "{}x{}".format(*s))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_is_philox4x32_10_with_four_outputs_per_call(shape, p):
    got = tl_lora.dropout_mask(shape, p, SEED, lane_device())
    assert got.dtype == torch.bool and got.shape == shape
    assert torch.equal(got, reference_mask(*shape, p, SEED))


def test_reference_philox_matches_the_published_known_answer():
    """Random123's kat_vectors: philox4x32_10 of counter 0 and key 0 (checks the reference itself)."""
    out = philox4x32_10(np.zeros(1, dtype=np.uint64), 0)
    assert [int(o[0]) for o in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("block", [(8, 16), (16, 128), (64, 32), (1, 4)], ids=lambda b: "{}x{}".format(*b))
def test_mask_does_not_depend_on_the_tile_size(monkeypatch, block):
    shape = (13, 45)
    expected = tl_lora.dropout_mask(shape, 0.3, SEED, lane_device())
    monkeypatch.setattr(cfg, "MASK_BLOCK", block)
    assert torch.equal(tl_lora.dropout_mask(shape, 0.3, SEED, lane_device()), expected)


def test_mask_of_a_row_does_not_depend_on_the_number_of_rows():
    a = tl_lora.dropout_mask((37, 45), 0.5, SEED, lane_device())
    assert torch.equal(a[:5], tl_lora.dropout_mask((5, 45), 0.5, SEED, lane_device()))


def _big_mask(p, seed, shape=(2048, 1536)):
    """3.1 M draws; a large mask tile keeps the interpreter's program count low (the mask does not depend on it)."""
    return tl_lora.dropout_mask(shape, p, seed, lane_device()).to(torch.float64)


def _within(observed, expected, sigma, what):
    assert abs(observed - expected) < Z * sigma, f"{what}: {observed} vs {expected} ± {sigma:.3g}"


def _chi2_within(values, expected, variance, what):
    """Sum of squared standardised deviations of independent counts: chi-square with len(values) dof."""
    chi2 = float((((values - expected) ** 2) / variance).sum())
    dof = values.numel()
    _within(chi2, dof, math.sqrt(2 * dof), what)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence_over_millions_of_draws(monkeypatch, p):
    monkeypatch.setattr(cfg, "MASK_BLOCK", (64, 512))
    keep = _big_mask(p, SEED + int(100 * p))
    rows, cols = keep.shape
    q = 1.0 - p  # keep probability
    n = keep.numel()
    _within(float(keep.sum()), n * q, math.sqrt(n * p * q), "keep count")
    # each of the four outputs of a Philox call
    for lane in range(4):
        part = keep[:, lane::4]
        _within(float(part.sum()), part.numel() * q, math.sqrt(part.numel() * p * q), f"output {lane}")
    # per-row and per-column counts vary as binomials do (a repeated or shared draw inflates them)
    _chi2_within(keep.sum(1), cols * q, cols * p * q, "rows")
    _chi2_within(keep.sum(0), rows * q, rows * p * q, "columns")
    # neighbours are uncorrelated: in one Philox call (col, col+1..3), across calls (col+4), across rows
    centred = (keep - q) / math.sqrt(p * q)
    for name, a, b in (("col+1", centred[:, :-1], centred[:, 1:]), ("col+2", centred[:, :-2], centred[:, 2:]),
                       ("col+3", centred[:, :-3], centred[:, 3:]), ("col+4", centred[:, :-4], centred[:, 4:]),
                       ("row+1", centred[:-1], centred[1:])):
        _within(float((a * b).mean()), 0.0, 1.0 / math.sqrt(a.numel()), f"correlation {name}")


def test_seeds_give_independent_masks(monkeypatch):
    """Seeds that differ in the low word, the high word or the top bit give uncorrelated masks."""
    monkeypatch.setattr(cfg, "MASK_BLOCK", (64, 512))
    shape = (512, 1024)
    base = _big_mask(0.5, SEED, shape) - 0.5
    for other in (SEED + 1, SEED ^ (1 << 40), SEED ^ (1 << 61), 0):
        corr = float((base * (_big_mask(0.5, other, shape) - 0.5)).mean() * 4)
        _within(corr, 0.0, 1.0 / math.sqrt(base.numel()), f"seed {other:#x}")
