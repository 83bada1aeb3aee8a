"""LoRA-carrying ops refuse sparse tensors, and the mask helper unknown devices, with errors naming the argument.

The per-call fast predicate (``_validation.lora_adapter_ok``) once let a sparse
``x`` through to the kernels; it now sends any non-strided tensor to the full
checks, which raise.
"""
import pytest
import torch

from fastpeft.ops import lora_dropout_mask, lora_linear, qlora_linear
from fastpeft.quant.nf4 import NF4Weight

K, N, R = 64, 12, 4


def _pair():
    return torch.randn(R, K), torch.randn(N, R)


@pytest.mark.parametrize("which", ["x", "lora_A", "lora_B"])
def test_lora_linear_refuses_sparse_inputs(which):
    args = dict(x=torch.randn(5, K), lora_A=_pair()[0], lora_B=_pair()[1])
    args[which] = args[which].to_sparse()
    with pytest.raises(TypeError, match=which):
        lora_linear(args["x"], torch.randn(N, K), args["lora_A"], args["lora_B"], 2.0)


def test_qlora_linear_refuses_a_sparse_x():
    lora_A, lora_B = _pair()
    w = NF4Weight.from_float(torch.randn(N, K), blocksize=64)
    with pytest.raises(TypeError, match="x"):
        qlora_linear(torch.randn(5, K).to_sparse(), w, lora_A, lora_B, 2.0)


@pytest.mark.parametrize("device, error", [("gpu", ValueError), (3.5, TypeError), (True, TypeError)])
def test_lora_dropout_mask_names_a_bad_device(device, error):
    with pytest.raises(error, match="device"):
        lora_dropout_mask((4, 8), 0.1, 7, device)
