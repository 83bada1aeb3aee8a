"""C++ NF4 quantize / dequantize / nested scales: bytes equal to the pure-torch reference and to bitsandbytes."""
import logging

import pytest
import torch

from fastpeft.cpu import nf4_native
from fastpeft.quant.nf4 import VALID_BLOCKSIZES, NF4Weight, signed_dynamic_map

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _assert_same_weight(a: NF4Weight, b: NF4Weight):
    assert torch.equal(a.packed, b.packed)
    assert torch.equal(a.absmax, b.absmax)
    assert a.double_quant == b.double_quant
    if a.double_quant:
        assert torch.equal(a.nested_absmax, b.nested_absmax)
        assert torch.equal(a.nested_code, b.nested_code)
        assert a.offset == b.offset


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_equals_reference(dtype, blocksize, double_quant):
    torch.manual_seed(blocksize)
    w = (torch.randn(70, 4096 + 3 * blocksize) * 3).to(dtype)
    ours = nf4_native.quantize(w, blocksize, double_quant)
    _assert_same_weight(ours, NF4Weight.from_float(w, blocksize, double_quant))
    for out_dtype in DTYPES:
        assert torch.equal(nf4_native.dequantize(ours, out_dtype), ours.dequantize(out_dtype))
    if double_quant:
        assert torch.equal(nf4_native.nested_scales(ours), ours.absmax_float())


@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (3, 1000), (129, 257), (1, 64)])
def test_odd_sizes_and_partial_blocks(shape):
    torch.manual_seed(shape[1])
    for dtype in DTYPES:
        w = torch.randn(shape).to(dtype)
        for dq in (False, True):
            ours = nf4_native.quantize(w, 64, dq)
            _assert_same_weight(ours, NF4Weight.from_float(w, 64, dq))
            assert torch.equal(nf4_native.dequantize(ours), ours.dequantize())


def test_zero_blocks_and_wide_range():
    w = torch.randn(32, 512) * torch.logspace(-8, 4, 32).unsqueeze(1)
    w[3] = 0.0
    w[-1, -5:] = 0.0
    for dq in (False, True):
        _assert_same_weight(nf4_native.quantize(w, 64, dq), NF4Weight.from_float(w, 64, dq))
    tail = torch.zeros(100)  # a trailing partial block of zeros stores the floored scale
    _assert_same_weight(nf4_native.quantize(tail, 64), NF4Weight.from_float(tail, 64))


def test_nan_and_inf_weights_match_reference():
    w = torch.randn(4, 128)
    w[0, 3] = float("nan")
    w[2, 70] = float("inf")
    w[3, 5] = -float("inf")
    for dtype in DTYPES:
        ours = nf4_native.quantize(w.to(dtype), 64)
        ref = NF4Weight.from_float(w.to(dtype), 64)
        assert torch.equal(ours.packed, ref.packed)
        assert torch.equal(ours.absmax.isnan(), ref.absmax.isnan())
        assert torch.equal(ours.absmax.nan_to_num(), ref.absmax.nan_to_num())


def test_non_contiguous_weight():
    w = torch.randn(256, 130)[:, :128]
    _assert_same_weight(nf4_native.quantize(w, 64), NF4Weight.from_float(w.contiguous(), 64))


def test_equals_bitsandbytes():
    import bitsandbytes.functional as bf  # a test dependency: missing means fail, not skip

    torch._logging.set_logs(dynamo=logging.ERROR)
    torch.manual_seed(21)
    for dtype in DTYPES:
        w = torch.randn(96, 1088).to(dtype)
        for dq in (False, True):
            packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
            ours = nf4_native.quantize(w, 64, dq)
            assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
            assert torch.equal(nf4_native.dequantize(ours), bf.dequantize_4bit(packed, state))


def test_dynamic_quantize_matches_reference_near_grid_edges():
    from fastpeft.quant.nf4 import quantize_dynamic_reference

    code = signed_dynamic_map()
    torch.manual_seed(22)
    values = torch.cat([torch.randn(10_000), torch.randn(1000) * 1e-4, torch.zeros(256), torch.ones(3)])
    q, absmax = torch.ops.fastpeft_native.dynamic_quantize(values, code, 256)
    q_ref, absmax_ref = quantize_dynamic_reference(values, code, 256)
    assert torch.equal(absmax, absmax_ref) and torch.equal(q, q_ref)


@pytest.mark.parametrize("call, exc, name", [
    (lambda: nf4_native.quantize(torch.randn(4, 64).double()), TypeError, "weight"),
    (lambda: nf4_native.quantize([1.0]), TypeError, "weight"),
    (lambda: nf4_native.quantize(torch.randn(4, 64), 100), ValueError, "blocksize"),
    (lambda: nf4_native.quantize(torch.randn(0, 64)), ValueError, "weight"),
    (lambda: nf4_native.quantize(torch.randn(4, 64, device="meta")), ValueError, "weight"),
    (lambda: nf4_native.dequantize(torch.randn(4, 64)), TypeError, "w"),
    (lambda: nf4_native.dequantize(NF4Weight.from_float(torch.randn(4, 64)), torch.int8), TypeError, "dtype"),
    (lambda: nf4_native.nested_scales(NF4Weight.from_float(torch.randn(4, 64))), ValueError, "double-quantized"),
])
def test_bad_input(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


@pytest.mark.parametrize("args, exc, name", [
    ((torch.zeros(32, dtype=torch.uint8), torch.ones(1), 64, 48, torch.float32), ValueError, "blocksize"),
    ((torch.zeros(32, dtype=torch.int8), torch.ones(1), 64, 64, torch.float32), TypeError, "packed"),
    ((torch.zeros(31, dtype=torch.uint8), torch.ones(1), 64, 64, torch.float32), ValueError, "packed"),
    ((torch.zeros(32, dtype=torch.uint8), torch.ones(2), 64, 64, torch.float32), ValueError, "absmax"),
    ((torch.zeros(32, dtype=torch.uint8), torch.ones(1).double(), 64, 64, torch.float32), TypeError, "absmax"),
    ((torch.zeros(32, dtype=torch.uint8), torch.ones(1), 64, 64, torch.int32), TypeError, "dtype"),
    ((torch.zeros(32, dtype=torch.uint8), torch.ones(1), 0, 64, torch.float32), ValueError, "numel"),
])
def test_native_op_rejects_bad_format(args, exc, name):
    """The C++ checks stand even when the Python wrapper is bypassed."""
    with pytest.raises(exc, match=name):
        torch.ops.fastpeft_native.nf4_dequantize(*args)
