"""NF4 format: the pure-torch reference against hand-derived facts, and NF4Weight's checks.

Equality with bitsandbytes itself lives in test_nf4_bnb_interop.py.
"""
import json

import pytest
import torch

from fastpeft.quant.nf4 import (
    NF4_CODE_VALUES,
    VALID_BLOCKSIZES,
    NF4Weight,
    dynamic_lookup_table,
    nf4_code,
    nf4_midpoints,
    quantize_dynamic_reference,
    quantize_nf4_reference,
    signed_dynamic_map,
    unpack_nibbles,
)


def test_codebook_is_the_published_table():
    code = nf4_code()
    assert code.dtype == torch.float32 and code.numel() == 16
    assert code.tolist() == [float(torch.tensor(v, dtype=torch.float32)) for v in NF4_CODE_VALUES]
    assert torch.all(code[1:] > code[:-1])


def test_each_code_value_quantizes_to_itself():
    # one block with absmax exactly 1: value code[k] must get index k
    w = nf4_code().repeat(4)
    packed, absmax = quantize_nf4_reference(w, 64)
    assert absmax.tolist() == [1.0]
    assert unpack_nibbles(packed, 64).tolist() == list(range(16)) * 4


def test_value_on_a_midpoint_takes_the_lower_code():
    mids = nf4_midpoints()
    w = torch.cat([mids, torch.tensor([1.0]), torch.zeros(48)])  # absmax 1, so x * (1/absmax) == x
    packed, _ = quantize_nf4_reference(w, 64)
    idx = unpack_nibbles(packed, 64)
    assert idx[:15].tolist() == list(range(15))
    # one fp32 step above the midpoint moves to the upper code
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    packed, _ = quantize_nf4_reference(torch.cat([above, torch.tensor([1.0]), torch.zeros(48)]), 64)
    assert unpack_nibbles(packed, 64)[:15].tolist() == list(range(1, 16))


def test_high_nibble_holds_the_even_element():
    w = torch.tensor([-1.0, 1.0] + [0.0] * 62)  # indices 0 and 15
    packed, _ = quantize_nf4_reference(w, 64)
    assert packed.shape == (32, 1) and packed.dtype == torch.uint8
    assert packed[0, 0].item() == 0x0F
    assert packed[1, 0].item() == 0x77  # two zeros: code index 7 each


def test_odd_numel_pads_with_the_zero_code():
    w = torch.randn(3, 5)
    packed, absmax = quantize_nf4_reference(w, 64)
    assert packed.shape == (8, 1) and absmax.shape == (1,)
    assert packed[-1, 0].item() & 0xF == 7


def test_dequantize_is_one_fp32_multiply():
    torch.manual_seed(3)
    w = torch.randn(37, 128) * 3
    q = NF4Weight.from_float(w, 64)
    idx = unpack_nibbles(q.packed, w.numel())
    expected = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)[idx] * q.absmax.repeat_interleave(64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(q.dequantize(dtype), expected.reshape(37, 128).to(dtype))
    assert q.dequantize().dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantization_error_is_bounded_by_half_the_widest_gap(dtype):
    torch.manual_seed(4)
    w = torch.randn(65, 192).to(dtype)
    q = NF4Weight.from_float(w, 64)
    err = (q.dequantize(torch.float32) - w.float()).abs().reshape(-1, 64)
    widest_gap = float((nf4_code()[1:] - nf4_code()[:-1]).max())
    bound = q.absmax.unsqueeze(1) * (widest_gap / 2) * (1 + 1e-5)
    assert torch.all(err <= bound)


def test_signed_dynamic_map_shape_and_symmetry():
    m = signed_dynamic_map()
    assert m.shape == (256,) and m.dtype == torch.float32
    assert torch.all(m[1:] > m[:-1])
    assert m[-1].item() == 1.0 and (m == 0).sum().item() == 1
    neg, pos = m[m < 0], m[(m > 0) & (m < 1)]
    assert torch.equal(torch.sort(-neg).values, pos)
    assert abs(pos.min().item() - 0.55e-6) < 1e-12  # smallest decade: midpoint of [0.1, 1] times 1e-6


def test_dynamic_quantizer_picks_a_neighbouring_code():
    torch.manual_seed(5)
    code = signed_dynamic_map()
    x = torch.randn(1000)
    q, absmax = quantize_dynamic_reference(x, code, 256)
    assert absmax.shape == (4,)
    normed = x / absmax.repeat_interleave(256)[:1000]
    # the 65536-point grid may miss the exactly nearest code, never by more than one neighbour
    exact = (normed.unsqueeze(1) - code).abs().argmin(dim=1)
    assert (q.long() - exact).abs().max().item() <= 1
    assert (q.long() == exact).float().mean().item() > 0.99
    lut = dynamic_lookup_table(code)
    assert lut.shape == (65536,) and lut[0].item() == 0 and lut[-1].item() == 255


def test_dynamic_quantizer_zero_block_stores_index_zero():
    q, absmax = quantize_dynamic_reference(torch.zeros(300), signed_dynamic_map(), 256)
    assert absmax.tolist() == [0.0, 0.0]
    assert q.tolist() == [0] * 300


@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
def test_double_quant_absmax_close_to_plain(blocksize):
    torch.manual_seed(6)
    w = torch.randn(64, 4096 + 64 * 3)
    plain = NF4Weight.from_float(w, blocksize)
    dq = NF4Weight.from_float(w, blocksize, double_quant=True)
    assert dq.double_quant and not plain.double_quant
    assert dq.absmax.dtype == torch.uint8 and dq.nested_absmax.numel() == -(-plain.num_blocks // 256)
    assert torch.equal(dq.packed, plain.packed)
    a = dq.absmax_float()
    assert a is dq.absmax_float()  # cached
    assert torch.allclose(a, plain.absmax, rtol=2e-2, atol=1e-6)


def test_to_and_device():
    q = NF4Weight.from_float(torch.randn(8, 64), 64, double_quant=True)
    m = q.to("meta")
    assert m.device.type == "meta" and m.packed.device.type == "meta" and m.nested_code.device.type == "meta"
    c = q.to(torch.device("cpu"))
    assert c is not q and c.device.type == "cpu" and c.shape == q.shape and c.offset == q.offset
    assert torch.equal(c.dequantize(), q.dequantize())


def test_repr_and_numel():
    q = NF4Weight.from_float(torch.randn(3, 128), 128, double_quant=True)
    assert "double_quant" in repr(q) and q.numel == 384 and q.num_blocks == 3


# ---------------------------------------------------------------------------
# Bad input: every check names its argument
# ---------------------------------------------------------------------------

def _parts(double_quant=False):
    q = NF4Weight.from_float(torch.randn(16, 128), 64, double_quant=double_quant)
    return dict(packed=q.packed, shape=q.shape, dtype=q.dtype, blocksize=q.blocksize, absmax=q.absmax,
                nested_absmax=q.nested_absmax, nested_code=q.nested_code, offset=q.offset, code=q.code)


@pytest.mark.parametrize("blocksize, exc", [(32, ValueError), (96, ValueError), (8192, ValueError),
                                            (0, ValueError), (64.0, TypeError), (True, TypeError)])
def test_bad_blocksize(blocksize, exc):
    with pytest.raises(exc, match="blocksize"):
        NF4Weight.from_float(torch.randn(4, 64), blocksize)
    with pytest.raises(exc, match="blocksize"):
        NF4Weight(**{**_parts(), "blocksize": blocksize})


@pytest.mark.parametrize("change, exc, name", [
    (dict(packed=torch.zeros(512, 1, dtype=torch.int8)), TypeError, "packed"),
    (dict(packed=torch.zeros(511, 1, dtype=torch.uint8)), ValueError, "packed"),
    (dict(packed=[0] * 512), TypeError, "packed"),
    (dict(absmax=torch.ones(31)), ValueError, "absmax"),
    (dict(absmax=torch.ones(32, dtype=torch.float16)), TypeError, "absmax"),
    (dict(dtype=torch.int8), TypeError, "dtype"),
    (dict(shape=(16, 0)), ValueError, "shape"),
    (dict(shape="16x128"), TypeError, "shape"),
    (dict(code=signed_dynamic_map()[:16]), ValueError, "code"),
    (dict(code=nf4_code().double()), TypeError, "code"),
    (dict(absmax=torch.ones(32, device="meta")), ValueError, "absmax"),
])
def test_bad_container_fields(change, exc, name):
    with pytest.raises(exc, match=name):
        NF4Weight(**{**_parts(), **change})


@pytest.mark.parametrize("change, exc, name", [
    (dict(absmax=torch.ones(32)), TypeError, "absmax"),
    (dict(nested_absmax=torch.ones(2)), ValueError, "nested_absmax"),
    (dict(nested_absmax=torch.ones(1, dtype=torch.float16)), TypeError, "nested_absmax"),
    (dict(nested_code=torch.ones(255)), ValueError, "nested_code"),
    (dict(offset=float("nan")), ValueError, "offset"),
    (dict(offset=None), ValueError, "offset"),
])
def test_bad_double_quant_fields(change, exc, name):
    with pytest.raises(exc, match=name):
        NF4Weight(**{**_parts(double_quant=True), **change})


@pytest.mark.parametrize("weight, exc, name", [
    ([1.0, 2.0], TypeError, "weight"),
    (torch.ones(4, 64, dtype=torch.int32), TypeError, "weight"),
    (torch.ones(4, 64, dtype=torch.float64), TypeError, "weight"),
    (torch.ones(0, 64), ValueError, "weight"),
    (torch.tensor(1.0), ValueError, "weight"),
])
def test_bad_from_float_weight(weight, exc, name):
    with pytest.raises(exc, match=name):
        NF4Weight.from_float(weight)


def test_bad_dequantize_dtype():
    with pytest.raises(TypeError, match="dtype"):
        NF4Weight.from_float(torch.randn(4, 64)).dequantize(torch.int32)


def test_state_dict_bad_input():
    q = NF4Weight.from_float(torch.randn(16, 128), 64)
    sd = q.to_bnb_state_dict()
    with pytest.raises(TypeError, match="state_dict"):
        NF4Weight.from_bnb_state_dict([sd])
    with pytest.raises(KeyError, match="quant_state"):
        NF4Weight.from_bnb_state_dict(sd, prefix="other")
    missing = {k: v for k, v in sd.items() if not k.endswith(".absmax")}
    with pytest.raises(KeyError, match="weight.absmax"):
        NF4Weight.from_bnb_state_dict(missing)
    fp4 = {k.replace("__nf4", "__fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="fp4"):
        NF4Weight.from_bnb_state_dict(fp4)
    blob = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    blob["quant_type"] = "fp4"
    lying = dict(sd)
    lying["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="fp4"):
        NF4Weight.from_bnb_state_dict(lying)
    bad_bs = dict(sd)
    blob = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    blob["blocksize"] = 48
    bad_bs["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="blocksize"):
        NF4Weight.from_bnb_state_dict(bad_bs)


def test_state_dict_round_trip_without_bnb():
    for dq in (False, True):
        q = NF4Weight.from_float(torch.randn(24, 320).to(torch.bfloat16), 64, double_quant=dq)
        back = NF4Weight.from_bnb_state_dict(q.to_bnb_state_dict(prefix="layer.weight"), prefix="layer.weight")
        assert back.dtype == torch.bfloat16 and back.shape == q.shape and back.double_quant == dq
        assert torch.equal(back.dequantize(), q.dequantize())
