"""NF4Weight against bitsandbytes (CPU), the oracle: bytes, scales, dequantized values, state dicts."""
import logging

import pytest
import torch

from fastpeft.quant.nf4 import VALID_BLOCKSIZES, NF4Weight, signed_dynamic_map

import bitsandbytes as bnb  # a test dependency: missing means fail, not skip
import bitsandbytes.functional as BF

# bitsandbytes dequantizes odd shapes through torch.compile; keep its recompile chatter out of the log.
torch._logging.set_logs(dynamo=logging.ERROR)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_same_as_bnb(w, blocksize, double_quant):
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    ours = NF4Weight.from_float(w, blocksize, double_quant=double_quant)
    assert torch.equal(ours.packed, packed), "packed bytes differ"
    assert torch.equal(ours.absmax, state.absmax), "absmax differs"
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_code, state.state2.code)
        assert ours.offset == float(state.offset)
        bnb_scales = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(ours.absmax_float(), bnb_scales)
    assert torch.equal(ours.dequantize(), BF.dequantize_4bit(packed, state))


def test_dynamic_map_equals_bnb():
    assert torch.equal(signed_dynamic_map(), BF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_blocksizes_and_dtypes(dtype, blocksize, double_quant):
    torch.manual_seed(blocksize + 7 * double_quant)
    w = (torch.randn(96, 4096 + 2 * blocksize) * 2.5).to(dtype)  # > 256 blocks: nested groups of 256 and a tail
    _assert_same_as_bnb(w, blocksize, double_quant)


@pytest.mark.parametrize("shape", [(1, 64), (7, 9), (3, 1000), (129, 257), (300, 130), (5, 4096), (1, 1)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_odd_shapes_and_partial_blocks(shape, double_quant):
    torch.manual_seed(shape[0] * 31 + shape[1])
    for dtype in DTYPES:
        _assert_same_as_bnb(torch.randn(shape).to(dtype), 64, double_quant)


def test_wide_dynamic_range_and_zero_blocks():
    torch.manual_seed(11)
    w = torch.randn(64, 512) * torch.logspace(-6, 3, 64).unsqueeze(1)
    w[5] = 0.0  # whole zero blocks
    w[9, :3] = 0.0
    for dq in (False, True):
        _assert_same_as_bnb(w, 64, dq)
        _assert_same_as_bnb(w, 256, dq)


def test_nan_and_inf_weights():
    w = torch.randn(8, 256)
    w[1, 7] = float("nan")
    w[4, 100] = float("inf")
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = NF4Weight.from_float(w, 64)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax.isnan(), state.absmax.isnan())
    assert torch.equal(ours.absmax.nan_to_num(), state.absmax.nan_to_num())


@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_params_and_linear(double_quant):
    torch.manual_seed(12)
    lin = bnb.nn.Linear4bit(320, 48, bias=True, compute_dtype=torch.float32,
                            compress_statistics=double_quant, quant_type="nf4").to("cpu")
    ref = BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    for obj in (lin, lin.weight):
        w = NF4Weight.from_bnb(obj)
        assert w.double_quant == double_quant and tuple(w.shape) == (48, 320)
        assert torch.equal(w.dequantize(), ref)


def test_from_bnb_rejects_unquantized_and_fp4():
    with pytest.raises(ValueError, match="quant_state"):
        NF4Weight.from_bnb(torch.nn.Linear(64, 8))
    lin = bnb.nn.Linear4bit(64, 8, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="fp4"):
        NF4Weight.from_bnb(lin)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear4bit_state_dict_loads_identically(dtype, double_quant):
    torch.manual_seed(13)
    lin = bnb.nn.Linear4bit(192, 40, bias=True, compute_dtype=dtype,
                            compress_statistics=double_quant, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(40, 192).to(dtype), requires_grad=False,
                                   compress_statistics=double_quant, quant_type="nf4")
    lin = lin.to("cpu")
    sd = lin.state_dict()
    ours = NF4Weight.from_bnb_state_dict(sd, prefix="weight")
    assert ours.dtype == dtype
    assert torch.equal(ours.dequantize(), BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_to_bnb_state_dict_matches_bnb_and_loads(dtype, double_quant):
    torch.manual_seed(14)
    w = torch.randn(40, 192).to(dtype)
    bias = torch.randn(40).to(dtype)
    lin = bnb.nn.Linear4bit(192, 40, bias=True, compute_dtype=dtype,
                            compress_statistics=double_quant, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant, quant_type="nf4")
    lin.bias = torch.nn.Parameter(bias)
    lin = lin.to("cpu")
    bnb_sd = {k: v for k, v in lin.state_dict().items() if k.startswith("weight")}

    ours = NF4Weight.from_float(w, 64, double_quant=double_quant).to_bnb_state_dict("weight")
    assert set(ours) == set(bnb_sd)
    for k in ours:
        assert ours[k].dtype == bnb_sd[k].dtype and torch.equal(ours[k], bnb_sd[k]), k

    # bitsandbytes 0.50's Linear4bit.load_state_dict rejects its own quant-state keys (even from its
    # own state_dict); loaders (transformers) go through Params4bit.from_prequantized, as here.
    fresh = bnb.nn.Linear4bit(192, 40, bias=True, compute_dtype=dtype,
                              compress_statistics=double_quant, quant_type="nf4")
    stats = {k[len("weight."):]: v for k, v in ours.items() if k != "weight"}
    fresh.weight = bnb.nn.Params4bit.from_prequantized(ours["weight"], stats, device="cpu", module=fresh)
    fresh.bias = torch.nn.Parameter(bias)
    x = torch.randn(3, 192).to(dtype)
    assert torch.equal(fresh(x), lin(x))
