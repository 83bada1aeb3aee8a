"""NF4 linear: ``y = x · dequant(W)ᵀ (+ bias)`` with a frozen NF4 weight, as an autograd op.

Layers (DESIGN.md §2): ``nf4_linear`` (functional API, validates) ->
``NF4LinearFunction`` (autograd: grads for x and bias, never for the frozen
weight) -> the ``fastpeft::nf4_linear_forward`` / ``fastpeft::nf4_linear_input_grad``
custom ops (fake implementations for ``torch.compile``) -> the backend picked
by ``fastpeft._backend.select_backend``:

- Triton (CUDA tensors, or CPU tensors under the interpreter):
  ``fastpeft.kernels.nf4`` fused dequant-matmul kernels;
- CPU: the native fused kernels of ``fastpeft.quant.nf4_cpu`` when the native
  extension builds on this machine; otherwise (no compiler, or float64 inputs,
  which the native kernels do not take) an explicit dequantize-then-matmul in
  torch (``cpu_path_uses_native`` says which one runs). The CPU path is chosen,
  never reached by falling back from a failing Triton/CUDA kernel.

Custom ops take tensors, not ``NF4Weight``: the packed bytes, the fp32 block
scales (``absmax_float()``, double quantization already resolved), the
codebook, and ``(out_features, in_features, blocksize)``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .._backend import Backend, select_backend
from .._validation import FLOAT_DTYPES, check_dim, check_same_device, check_same_dtype, check_tensor
from ..quant.nf4 import NF4Weight
from ._dispatch import custom_op_with_eager_path

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- CPU path
@functools.lru_cache(maxsize=None)
def _native_cpu():
    """``fastpeft.quant.nf4_cpu`` if its native extension loads here, else None."""
    try:
        from .. import _native
        from ..quant import nf4_cpu
    except ImportError:
        return None
    return nf4_cpu if _native.available() else None


def cpu_path_uses_native(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the CPU path runs the native fused kernels for inputs of ``dtype`` (builds them on first call)."""
    native = _native_cpu()
    return native is not None and dtype in native.ACTIVATION_DTYPES


def _weight_view(packed, absmax, code, n, k, blocksize, dtype) -> NF4Weight:
    # absmax is already fp32, so the container has no double-quant state to resolve.
    return NF4Weight(packed, (n, k), dtype if dtype in _TRITON_DTYPES else torch.float32, blocksize,
                     absmax, code=code)


def _dequantized(packed, absmax, code, n, k, blocksize, dtype) -> Tensor:
    return _weight_view(packed, absmax, code, n, k, blocksize, dtype).dequantize(dtype)


def cpu_nf4_matmul(x2d, packed, absmax, code, n, k, blocksize, bias=None) -> Tensor:
    """CPU path of ``x2d · dequant(W)ᵀ (+ bias)``."""
    if x2d.device.type == "cpu" and cpu_path_uses_native(x2d.dtype):
        return _native_cpu().nf4_matmul_packed(x2d, packed, absmax, n, k, blocksize, bias)
    w = _dequantized(packed, absmax, code, n, k, blocksize, x2d.dtype)
    return torch.nn.functional.linear(x2d, w, bias)


def cpu_nf4_matmul_transposed(dy2d, packed, absmax, code, n, k, blocksize) -> Tensor:
    """CPU path of ``dy2d · dequant(W)``."""
    if dy2d.device.type == "cpu" and cpu_path_uses_native(dy2d.dtype):
        return _native_cpu().nf4_matmul_transposed_packed(dy2d, packed, absmax, n, k, blocksize)
    return torch.mm(dy2d, _dequantized(packed, absmax, code, n, k, blocksize, dy2d.dtype))


def use_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """True when the Triton kernels run for these inputs (raises on a dtype they do not take)."""
    if select_backend(device) is not Backend.TRITON:
        return False
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton NF4 kernels take float32, float16 or bfloat16 inputs, not {dtype}")
    return True


# --------------------------------------------------------------------------- custom ops
def _forward_impl(x2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, out_features: int,
                  in_features: int, blocksize: int, bias: Optional[Tensor]) -> Tensor:
    if use_triton(x2d.device, x2d.dtype):
        from ..kernels import nf4 as triton_nf4

        return triton_nf4.nf4_matmul(x2d, packed.reshape(-1), absmax, code, out_features, in_features,
                                     blocksize, bias=bias)
    return cpu_nf4_matmul(x2d, packed, absmax, code, out_features, in_features, blocksize, bias)


_forward_op, _forward = custom_op_with_eager_path("fastpeft::nf4_linear_forward", _forward_impl)


@_forward_op.register_fake
def _(x2d, packed, absmax, code, out_features, in_features, blocksize, bias):
    return x2d.new_empty((x2d.shape[0], out_features))


def _input_grad_impl(dy2d: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, out_features: int,
                     in_features: int, blocksize: int) -> Tensor:
    if use_triton(dy2d.device, dy2d.dtype):
        from ..kernels import nf4 as triton_nf4

        return triton_nf4.nf4_matmul_transposed(dy2d, packed.reshape(-1), absmax, code, out_features,
                                                in_features, blocksize)
    return cpu_nf4_matmul_transposed(dy2d, packed, absmax, code, out_features, in_features, blocksize)


_input_grad_op, _input_grad = custom_op_with_eager_path("fastpeft::nf4_linear_input_grad", _input_grad_impl)


@_input_grad_op.register_fake
def _(dy2d, packed, absmax, code, out_features, in_features, blocksize):
    return dy2d.new_empty((dy2d.shape[0], in_features))


# --------------------------------------------------------------------------- autograd
class NF4LinearFunction(torch.autograd.Function):
    """Autograd for ``nf4_linear``; inputs are already validated. The weight gets no gradient."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, out_features, in_features, blocksize, bias):
        x2d = x.reshape(-1, in_features)
        y2d = _forward(x2d, packed, absmax, code, out_features, in_features, blocksize, bias)
        ctx.save_for_backward(packed, absmax, code)
        ctx.dims = (out_features, in_features, blocksize)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y2d.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        packed, absmax, code = ctx.saved_tensors
        out_features, in_features, blocksize = ctx.dims
        dy2d = dy.reshape(-1, out_features)
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = _input_grad(dy2d, packed, absmax, code, out_features, in_features, blocksize)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[7] and ctx.has_bias:
            db = dy2d.sum(0)
        return dx, None, None, None, None, None, None, db


def nf4_linear(x: Tensor, w_nf4: NF4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """``x · dequant(w_nf4)ᵀ (+ bias)`` with the NF4 weight kept packed.

    Shapes: ``x [..., K]``, ``w_nf4`` an ``NF4Weight`` of shape ``[N, K]`` with
    ``K % blocksize == 0``, ``bias [N]`` of x's dtype. x is fp32, fp16 or bf16
    (fp64 too on the CPU path); the weight is dequantized to x's dtype (bit-equal
    to bitsandbytes) and products accumulate in fp32. Returns ``[..., N]``.
    Gradients flow to x and bias; the NF4 weight is frozen.
    """
    validate_nf4_weight("w_nf4", w_nf4)
    n, k = w_nf4.shape
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., in_features]")
    check_dim("x", x.shape[-1], k, "last dimension (in_features)")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_dim("bias", bias.shape[0], n, "length (out_features)")
    check_same_device("x", x, w_nf4=w_nf4.packed, bias=bias)
    check_same_dtype("x", x, bias=bias)
    return NF4LinearFunction.apply(x, w_nf4.packed, w_nf4.absmax_float(), w_nf4.code, n, k,
                                   w_nf4.blocksize, bias)


def validate_nf4_weight(name: str, w) -> None:
    """Checks an ``NF4Weight`` for the NF4 kernels: 2-D, K divisible by blocksize, consistent state."""
    if not isinstance(w, NF4Weight):
        raise TypeError(f"{name} must be a fastpeft.quant.NF4Weight, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"{name} must be a 2-D [out_features, in_features] weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    if k % w.blocksize:
        raise ValueError(f"{name}: in_features={k} is not divisible by blocksize={w.blocksize}; the NF4 kernels "
                         "need every quantization block inside one row (re-quantize with a blocksize dividing it)")
    if not isinstance(w.packed, Tensor) or w.packed.dtype != torch.uint8:
        raise TypeError(f"{name}.packed must be a uint8 tensor, got "
                        f"{getattr(w.packed, 'dtype', type(w.packed).__name__)}")
    if w.packed.numel() * 2 != n * k:
        raise ValueError(f"{name}.packed has {w.packed.numel()} bytes; shape {tuple(w.shape)} needs {n * k // 2}")
    absmax = w.absmax_float()
    if absmax.dtype != torch.float32 or absmax.numel() != n * k // w.blocksize:
        raise ValueError(f"{name}: quantization state does not match the weight: {absmax.numel()} "
                         f"{absmax.dtype} block scales for {n * k // w.blocksize} blocks of {w.blocksize}")
    check_same_device(f"{name}.packed", w.packed, **{f"{name}.absmax": absmax, f"{name}.code": w.code})
