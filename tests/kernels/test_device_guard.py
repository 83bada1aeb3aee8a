"""Every public Triton launcher launches on its tensors' device, not on the current CUDA device.

Triton launches on ``torch.cuda.current_device()``; with a model spread over
two GPUs that is the wrong one for half the layers. The launchers enter
``_common.on_device_of(tensor)``; here a recorder stands in for it (no GPU on
this machine) and must see each launcher's input tensor before any kernel runs.
"""
import contextlib

import pytest
import torch

from fastpeft.kernels import _common, lora, nf4, qlora
from fastpeft.quant.nf4 import NF4Weight


@pytest.fixture
def entered(monkeypatch):
    seen = []

    def recorder(where):
        seen.append(where)
        return contextlib.nullcontext()

    monkeypatch.setattr(_common, "on_device_of", recorder)
    monkeypatch.setattr(lora, "on_device_of", recorder)
    return seen


def _nf4(n=16, k=64):
    w = NF4Weight.from_float(torch.randn(n, k), blocksize=64)
    return w.packed, w.absmax_float(), w.code, n, k, 64


def test_every_public_launcher_enters_its_tensors_device(entered):
    m, k, n, r = 3, 64, 16, 2
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    a, bb, dy = torch.randn(r, k), torch.randn(n, r), torch.randn(m, n)
    packed, absmax, code, n, k, bs = _nf4(n, k)
    calls = {
        "lora_forward": lambda: lora.lora_forward(x, w, b, a, bb, 1.0, 0.0, 0),
        "lora_backward": lambda: lora.lora_backward(dy, x, w, a, bb, torch.zeros(m, r), 1.0, 0.0, 0, True, True, True),
        "dropout_mask": lambda: lora.dropout_mask((m, k), 0.5, 1, x.device),
        "nf4_dequantize": lambda: nf4.nf4_dequantize(packed, absmax, code, n, k, bs),
        "nf4_matmul": lambda: nf4.nf4_matmul(x, packed, absmax, code, n, k, bs),
        "nf4_matmul_transposed": lambda: nf4.nf4_matmul_transposed(dy, packed, absmax, code, n, k, bs),
        "nf4_forward": lambda: nf4.nf4_forward(x, packed, absmax, code, n, k, bs),
        "nf4_input_grad": lambda: nf4.nf4_input_grad(dy, packed, absmax, code, n, k, bs),
        "qlora_forward": lambda: qlora.qlora_forward(x, packed, absmax, code, n, k, bs, None, a, bb, 1.0, 0.0, 0),
        "qlora_backward": lambda: qlora.qlora_backward(dy, x, packed, absmax, code, n, k, bs, a, bb,
                                                       torch.zeros(m, r), 1.0, 0.0, 0, True, True, True),
    }
    for name, call in calls.items():
        entered.clear()
        call()
        assert entered, f"{name} launched without entering a device"
        first = entered[0]
        device = first.device if isinstance(first, torch.Tensor) else torch.device(first)
        assert device == x.device, name
