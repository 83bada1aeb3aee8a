"""The shared __host__ __device__ header (csrc/include/fastpeft/nf4_codec.h) through the CPU build.

The CUDA kernels use the same functions, so this is the test of their element arithmetic.
Expected values come from the pure-torch format module and the published NF4 table, never from C++.
"""
import pytest
import torch

from fastpeft import _native
from fastpeft.quant.nf4 import NF4_CODE_VALUES, nf4_midpoints, unpack_nibbles


@pytest.fixture(scope="module")
def ops():
    _native.load_cpu()
    return torch.ops.fastpeft_native


def test_code_table_and_midpoints(ops):
    table = ops.codec_table()
    assert table[:16].tolist() == torch.tensor(NF4_CODE_VALUES, dtype=torch.float32).tolist()
    assert torch.equal(table[16:], nf4_midpoints())


def test_encode_midpoints_take_the_lower_code(ops):
    mids = nf4_midpoints()
    assert ops.codec_encode(mids).tolist() == list(range(15))
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    assert ops.codec_encode(above).tolist() == list(range(1, 16))
    codes = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)
    assert ops.codec_encode(codes).tolist() == list(range(16))


def test_encode_nan_takes_the_last_code_like_bucketize(ops):
    nan = torch.tensor([float("nan")])
    assert ops.codec_encode(nan).tolist() == torch.bucketize(nan, nf4_midpoints()).tolist() == [15]


def test_encode_random_values_match_bucketize(ops):
    x = torch.rand(100_003) * 2 - 1
    expected = torch.bucketize(x, nf4_midpoints())
    assert torch.equal(ops.codec_encode(x).long(), expected)


def test_decode_is_one_fp32_multiply(ops):
    q = torch.randint(0, 16, (5001,), dtype=torch.uint8)
    absmax = torch.rand(5001) * 10
    expected = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)[q.long()] * absmax
    assert torch.equal(ops.codec_decode(q, absmax), expected)


@pytest.mark.parametrize("numel", [1, 2, 7, 64, 1001])
def test_unpack_high_nibble_first(ops, numel):
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8)
    assert torch.equal(ops.codec_unpack(packed, numel).long(), unpack_nibbles(packed, numel))


def test_simd_flag_is_a_bool(ops):
    assert isinstance(ops.simd_enabled(), bool)
