"""NF4 linear on the CPU path: the native fused kernels, or dequantize-then-matmul in torch.

Dispatch contract (``docs/architecture.md``): the same functions as
``fastpeft.kernels.nf4`` (``nf4_forward``, ``nf4_input_grad``). The native
kernels of ``fastpeft.cpu.nf4_native`` run when the native extension builds on
this machine; otherwise (no compiler, or float64 inputs, which the native
kernels do not take) an explicit dequantize-then-matmul in torch runs
(``cpu_path_uses_native`` says which). bf16 inputs take the native bf16
kernels from a few rows on (fused AMX tiles, or bf16 dequantization + torch's
bf16 GEMM; ``fastpeft.cpu.nf4_native.bf16_forward_kernel`` says which, its
docstring has the measurements); QLoRA's CPU path reaches them through
``nf4_forward`` / ``nf4_input_grad``. Also runs on CUDA tensors when
``FASTPEFT_BACKEND=cpu`` forces it (the torch form).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..quant.nf4 import NF4Weight

# The dtypes an NF4Weight records as its original weight dtype.
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _native_cpu():
    """``fastpeft.cpu.nf4_native`` if its native extension loads here, else None."""
    try:
        from .. import _native
        from . import nf4_native
    except ImportError:
        return None
    return nf4_native if _native.available() else None


def cpu_path_uses_native(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the CPU path runs the native fused kernels for inputs of ``dtype`` (builds them on first call)."""
    native = _native_cpu()
    return native is not None and dtype in native.ACTIVATION_DTYPES


def _weight_view(packed, absmax, code, n, k, blocksize, dtype) -> NF4Weight:
    # absmax is already fp32, so the container has no double-quant state to resolve.
    return NF4Weight(packed, (n, k), dtype if dtype in _WEIGHT_DTYPES else torch.float32, blocksize,
                     absmax, code=code)


def _dequantized(packed, absmax, code, n, k, blocksize, dtype) -> Tensor:
    return _weight_view(packed, absmax, code, n, k, blocksize, dtype).dequantize(dtype)


def nf4_forward(x2d, packed, absmax, code, n, k, blocksize, bias=None) -> Tensor:
    """``x2d · dequant(W)ᵀ (+ bias)``."""
    if x2d.device.type == "cpu" and cpu_path_uses_native(x2d.dtype):
        return _native_cpu().nf4_matmul_packed(x2d, packed, absmax, n, k, blocksize, bias)
    w = _dequantized(packed, absmax, code, n, k, blocksize, x2d.dtype)
    return torch.nn.functional.linear(x2d, w, bias)


def nf4_input_grad(dy2d, packed, absmax, code, n, k, blocksize) -> Tensor:
    """``dy2d · dequant(W)``."""
    if dy2d.device.type == "cpu" and cpu_path_uses_native(dy2d.dtype):
        return _native_cpu().nf4_matmul_transposed_packed(dy2d, packed, absmax, n, k, blocksize)
    return torch.mm(dy2d, _dequantized(packed, absmax, code, n, k, blocksize, dy2d.dtype))
