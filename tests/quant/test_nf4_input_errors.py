"""Bad arguments to the NF4 format code: a ValueError/TypeError naming the argument (or the state-dict entry)."""
import json

import pytest
import torch

from fastpeft.nn import NF4Linear, QLoRALinear
from fastpeft.cpu import nf4_native
from fastpeft.quant.nf4 import NF4Weight

BLOB_KEY = "weight.quant_state.bitsandbytes__nf4"


@pytest.mark.parametrize("double_quant", ["no", "False", 1, 0, None, 1.0, complex(1, 0)])
@pytest.mark.parametrize("build", [
    lambda dq: NF4Weight.from_float(torch.randn(4, 64), 64, double_quant=dq),
    lambda dq: nf4_native.quantize(torch.randn(4, 64), 64, double_quant=dq),
    lambda dq: NF4Linear.from_linear(torch.nn.Linear(64, 4), double_quant=dq),
    lambda dq: QLoRALinear.from_linear(torch.nn.Linear(64, 4), double_quant=dq),
], ids=["from_float", "native", "NF4Linear", "QLoRALinear"])
def test_double_quant_must_be_a_bool(build, double_quant):
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        build(double_quant)


@pytest.mark.parametrize("blocksize", [None, complex(64, 0), 64.0, "64"])
def test_blocksize_none_or_complex_names_blocksize(blocksize):
    with pytest.raises(TypeError, match="blocksize must be an int"):
        NF4Weight.from_float(torch.randn(4, 64), blocksize)


def _state_dict(double_quant=True):
    return NF4Weight.from_float(torch.randn(8, 128), 64, double_quant=double_quant).to_bnb_state_dict()


def _with_blob(blob: bytes, double_quant=True):
    sd = _state_dict(double_quant)
    sd[BLOB_KEY] = torch.tensor(list(blob), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("blob", [
    b"{not json",
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b'"nf4"',
    json.dumps({"quant_type": "nf4"}).encode(),
    json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 128],
                "nested_offset": "x"}).encode(),
    json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 128],
                "nested_offset": [0.1]}).encode(),
], ids=["truncated json", "not utf-8", "json list", "json string", "missing keys", "string offset", "list offset"])
def test_corrupted_quant_state_blob_names_the_entry(blob):
    with pytest.raises(ValueError, match=BLOB_KEY.replace(".", r"\.")):
        NF4Weight.from_bnb_state_dict(_with_blob(blob))


@pytest.mark.parametrize("blob", [torch.zeros(3, 4, dtype=torch.uint8), torch.zeros(5, dtype=torch.float32), [1, 2]],
                         ids=["2-D", "float", "list"])
def test_quant_state_blob_of_the_wrong_kind_names_the_entry(blob):
    sd = _state_dict()
    sd[BLOB_KEY] = blob
    with pytest.raises(ValueError, match=BLOB_KEY.replace(".", r"\.")):
        NF4Weight.from_bnb_state_dict(sd)


@pytest.mark.parametrize("double_quant", [False, True])
def test_intact_blob_still_loads(double_quant):
    sd = _state_dict(double_quant)
    w = NF4Weight.from_bnb_state_dict(sd)
    assert torch.equal(w.packed, sd["weight"]) and w.double_quant == double_quant
