"""Non-finite weights through the C++ NF4 format code: every path defined, bytes equal to bitsandbytes'.

The nested (8-bit) quantizer once cast a NaN to int and indexed its lookup table
at INT_MIN (a segfault); it now follows bitsandbytes' CPU quantizer: NaN is left
out of a block's absmax and stores code 0, an infinite absmax scales finite
values to 0.
"""
import subprocess
import sys

import bitsandbytes.functional as BF  # a test dependency: missing means fail, not skip
import pytest
import torch

from fastpeft.cpu import nf4_native
from fastpeft.quant.nf4 import NF4Weight, quantize_dynamic_reference, signed_dynamic_map

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

NAN, INF = float("nan"), float("inf")
BLOCK_HEADS = {
    "nan element": [0.5, NAN, -0.2, 0.1],
    "+inf element": [INF, 0.2, -0.1, 0.0],
    "-inf element": [-INF, 0.2, -0.1, 0.0],
    "all nan": [NAN] * 4,
    "nan and inf": [NAN, INF, 0.3, -0.3],
    "inf, -inf, nan": [INF, -INF, NAN, 1.0],
    "nan among zeros": [NAN, 0.0, 0.0, 0.0],
}


def _values(head, block_len):
    """One nested block starting with ``head`` (the rest 0), one fully NaN block, then a finite partial block."""
    torch.manual_seed(len(head) + block_len)
    first = torch.tensor(head + [0.0] * (block_len - len(head)))
    second = torch.full((block_len,), NAN) if block_len == 256 else torch.randn(block_len)
    return torch.cat([first, second, torch.randn(37)])


@pytest.mark.parametrize("head", list(BLOCK_HEADS.values()), ids=list(BLOCK_HEADS))
def test_dynamic_quantize_non_finite_equals_bitsandbytes(head):
    code = signed_dynamic_map()
    values = _values(head, 256)
    q_bnb, state = BF.quantize_blockwise(values, code=code, blocksize=256)
    q, absmax = torch.ops.fastpeft_native.dynamic_quantize(values, code, 256)
    assert torch.equal(q, q_bnb) and torch.equal(absmax, state.absmax)
    q_ref, absmax_ref = quantize_dynamic_reference(values, code)
    assert torch.equal(q_ref, q_bnb) and torch.equal(absmax_ref, state.absmax)


def test_double_quant_of_nan_weight_in_a_fresh_process_does_not_crash():
    # A fresh process: a segfault must fail this test, not kill the test run.
    script = (
        "import torch\n"
        "from fastpeft.cpu import nf4_native\n"
        "w = torch.randn(8, 256); w[1, 7] = float('nan')\n"
        "try:\n"
        "    nf4_native.quantize(w, 64, double_quant=True)\n"
        "except ValueError as exc:\n"
        "    print('ValueError:', exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ValueError: weight has NaN or infinite values" in run.stdout


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("quantize", [nf4_native.quantize, NF4Weight.from_float], ids=["native", "reference"])
def test_double_quant_refuses_non_finite_weights_with_a_clear_error(quantize, bad):
    w = torch.randn(8, 256)
    w[3, 9] = bad
    with pytest.raises(ValueError, match="weight has NaN or infinite values.*double_quant=False"):
        quantize(w, 64, double_quant=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_quantize_non_finite_equals_bitsandbytes(dtype):
    w = torch.randn(6, 64 * 3 + 32)  # a trailing partial block too
    w[0, 3], w[2, 70], w[3, 5], w[5, -1], w[5, -5] = NAN, INF, -INF, NAN, INF
    packed, state = BF.quantize_4bit(w.to(dtype), blocksize=64, quant_type="nf4")
    ours = nf4_native.quantize(w.to(dtype), 64)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax.isnan(), state.absmax.isnan())
    assert torch.equal(ours.absmax.nan_to_num(), state.absmax.nan_to_num())
    # (bitsandbytes' own CPU dequantize gives finite values for a block whose scale is NaN: not an oracle here)
    dense = nf4_native.dequantize(ours, torch.float32)
    expected = ours.dequantize(torch.float32)
    assert torch.equal(dense.isnan(), expected.isnan())
    assert torch.equal(dense.nan_to_num(), expected.nan_to_num())
