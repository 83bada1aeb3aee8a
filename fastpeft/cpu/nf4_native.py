"""NF4 on the CPU through the native C++ extension (fastpeft._native).

- ``nf4_matmul(x, w, bias)``: ``x @ dequant(W)ᵀ (+ bias)`` fused: for up to 8
  rows a decode-GEMV that never materialises W (``csrc/cpu/nf4_gemv.cpp``; with
  AVX-512 it decodes 128 codes per 64-byte load with a shift and a ``vpermps``
  per 16, and is compute-bound: at M = 1, 4096², one thread, 0.25-0.28x the CPU
  time of a dense fp32 ``F.linear``, before 0.50x; ``benchmarks/standalone/nf4_cpu_speed.py``
  has the command and the other shapes), for more rows W is dequantized
  panel by panel (about 1 MiB of fp32 at a time) into a BLAS GEMM; from
  ``F32_DEQUANT_MIN_ROWS`` fp32 rows W is dequantized in one piece of up to
  16 MiB and multiplied by one GEMM; bf16 below.
- ``nf4_matmul_transposed(dy, w)``: ``dy @ dequant(W)``, the input gradient.
- ``quantize`` / ``dequantize``: the format in C++, bytes equal to the
  pure-torch reference in ``nf4.py`` and to bitsandbytes.

Activations may be float32, float16 or bfloat16 with any leading dims; the
kernels accumulate in fp32 and return x's dtype. Matmuls need K % blocksize == 0.

bf16 activations (``bf16_forward_kernel`` says which kernel runs; nothing is
cached between calls, fp32 accumulation everywhere):
- from ``BF16_AMX_MIN_ROWS`` rows (forward) or ``BF16_GEMM_MIN_ROWS_TRANSPOSED``
  (input gradient) up to ``BF16_AMX_MAX_ROWS``, on a CPU with AMX-BF16: fused AMX kernels
  (``csrc/cpu/nf4_amx.cpp``): W decoded to bf16 a block at a time into L2
  (32 rows for the forward, 32 columns in VNNI pairs for the input gradient),
  TDPBF16PS tiles; W never exists in memory;
- more rows, or no AMX (from ``BF16_GEMM_MIN_ROWS`` for the forward): W
  dequantized to bf16 (bit-equal to ``NF4Weight.dequantize(torch.bfloat16)``,
  AVX-512 table lookups, at most 16 MiB of bf16 W at a time), then torch's
  bf16 GEMM (oneDNN: AMX / AVX512-BF16); the error is plain torch bf16's;
- fewer rows: the fp32 kernels (decode GEMVs that read only the packed bytes).

Measured with ``python -m benchmarks.standalone.nf4_cpu_bf16_speed --m 1 64 256
--rounds 30 --threads 1 --clock thread-cpu --sweep 1 4 6 8 12 16 64 256``
(Xeon with AMX-BF16, N = K = 2048, blocksize 64, double quant; one thread and
the calling thread's CPU time, because the 2-core machine was shared; medians
of 30 interleaved rounds). Native kernels on bf16 inputs, ms:

    M     forward: fp32 fused / dequant+mm / AMX    input grad: fp32 / dequant+mm / AMX
    1     0.52 / 2.08 / 0.96                        0.63 / 2.62 / 1.83
    4     1.01 / 2.10 / 1.40                        1.76 / 2.67 / 2.15
    6     1.39 / 2.31 / 1.49                        1.59 / 2.50 / 2.03
    8     2.14 / 2.28 / 1.39                        1.67 / 2.50 / 1.99
    12    2.10 / 2.32 / 1.40                        1.99 / 2.31 / 1.99
    16    5.70 / 2.46 / 1.57                        2.42 / 2.69 / 2.42
    64    8.64 / 2.76 / 1.49                        5.77 / 3.15 / 2.89
    256   28.9 / 9.38 / 6.45                        19.8 / 6.45 / 6.45

Where two kernels tie, the fp32 one (more accurate) keeps the rows: AMX from
8 rows forward, from 16 for the input gradient (which saves the 8 MiB bf16
copy of W there more than time). At 512-2048 rows dequant+mm beat the AMX
kernels by 1.0-1.5x, hence ``BF16_AMX_MAX_ROWS``.

Whole layers (``--m 1 64 256 --rounds 30 --threads 1 --clock thread-cpu``, final
code), fastpeft / peer time, median of per-round ratios, M = 1 / 64 / 256:

    bf16  NF4 vs bitsandbytes Linear4bit   fwd 0.29 / 0.57 / 0.68   fwd+bwd 0.20 / 0.52 / 0.63
    bf16  QLoRA r=16 vs PEFT on bnb        fwd 0.37 / 0.65 / 0.65   fwd+bwd 0.26 / 0.56 / 0.73
    fp32  NF4 vs bitsandbytes Linear4bit   fwd 0.24 / 1.04 / 0.99   fwd+bwd 0.23 / 0.81 / 0.96
    fp32  QLoRA r=16 vs PEFT on bnb        fwd 0.25 / 1.01 / 0.93   fwd+bwd 0.30 / 0.81 / 0.93

Errors against float64 equal plain torch bf16's (2.3e-3 NF4, 2.5e-3 QLoRA) or
are lower (1.6e-3: the fp32 GEMV at M = 1); fp32 errors are within 1.3x of
torch fp32's (the M = 1 input-gradient GEMV) or equal to them.

The extension is compiled on first call (see fastpeft/_native).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import _native
from .._native import cpu_isa
from ..quant.nf4 import (NESTED_BLOCKSIZE, NF4Weight, check_blocksize, check_double_quant, double_quant_offset,
                  signed_dynamic_map)

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# bf16 rows from which each bf16 kernel beats the fused fp32 decode GEMV (module docstring: measurements).
BF16_AMX_MIN_ROWS = 8  # forward, fused AMX kernel (where available)
BF16_GEMM_MIN_ROWS = 9  # forward without AMX: dequantize to bf16 + torch's bf16 GEMM
BF16_AMX_MAX_ROWS = 256  # above, oneDNN's blocking wins (the AMX kernels re-read x per block of W)
# fp32 forward from this many rows: W dequantized once (AVX-512 table lookups, up to 16 MiB at a time) and one
# GEMM, instead of the fused kernel's 1 MiB panels (M = 64: 9.9 vs 12.1 ms, M = 256: 19.7 vs 21.1 ms; same setup
# as the table above; ties below 16 rows). The fp32 input gradient keeps the fused kernel (it won or tied).
F32_DEQUANT_MIN_ROWS = 16
BF16_GEMM_MIN_ROWS_TRANSPOSED = 16  # input gradient: fused AMX kernel, or dequantize + torch's bf16 GEMM


def _check_weight(w) -> NF4Weight:
    if not isinstance(w, NF4Weight):
        raise TypeError(f"w must be an NF4Weight, got {type(w).__name__}")
    if w.device.type != "cpu":
        raise ValueError(f"w is on {w.device}; the CPU NF4 kernels need it on the CPU")
    w.check_matmul_layout("w")
    return w


def _check_activation(name: str, t, cols: int, cols_name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; the CPU NF4 kernels need CPU tensors")
    if t.dim() < 1 or t.shape[-1] != cols:
        raise ValueError(f"{name} must have shape (..., {cols_name}={cols}), got {tuple(t.shape)}")


def nf4_matmul(x: Tensor, w: NF4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ dequant(w)ᵀ (+ bias)``: x ``(..., K)`` -> ``(..., N)`` in x's dtype."""
    w = _check_weight(w)
    n, k = w.shape
    _check_activation("x", x, k, "K")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has {x.dtype}; cast them to one dtype")
        if bias.device.type != "cpu":
            raise ValueError(f"bias is on {bias.device}; the CPU NF4 kernels need CPU tensors")
    y = nf4_matmul_packed(x.reshape(-1, k), w.packed, w.absmax_float(), n, k, w.blocksize, bias)
    return y.reshape(*x.shape[:-1], n)


def nf4_matmul_packed(x2d: Tensor, packed: Tensor, absmax: Tensor, n: int, k: int, blocksize: int,
                      bias: Optional[Tensor] = None) -> Tensor:
    """``nf4_matmul`` on raw state (fp32 ``absmax``), unchecked: for callers that validated already.

    ``fastpeft.ops.nf4`` calls this per step; skipping the container and its
    checks saves about 40 µs a call, a twentieth of a 4096² decode GEMV.
    """
    return _native.op(forward_kernel(x2d))(x2d, packed, absmax, n, k, blocksize, bias)


def forward_kernel(x2d: Tensor) -> str:
    """Name of the native op that ``nf4_matmul_packed`` runs for ``x2d`` (by dtype and row count)."""
    bf16 = bf16_forward_kernel(x2d)
    if bf16 is not None:
        return bf16
    if x2d.dtype == torch.float32 and x2d.shape[0] >= F32_DEQUANT_MIN_ROWS:
        return "nf4_matmul_f32_dequantized"
    return "nf4_matmul"


def bf16_forward_kernel(x2d: Tensor) -> Optional[str]:
    """Name of the native bf16 forward op that ``nf4_matmul_packed`` runs for ``x2d``; None: the fp32 kernels."""
    if x2d.dtype != torch.bfloat16:
        return None
    m = x2d.shape[0]
    if BF16_AMX_MIN_ROWS <= m <= BF16_AMX_MAX_ROWS and amx_available():
        return "nf4_matmul_bf16_amx"
    return "nf4_matmul_bf16" if m >= BF16_GEMM_MIN_ROWS else None


@functools.lru_cache(maxsize=None)
def amx_available() -> bool:
    """Whether the fused AMX kernel runs here (built with AMX-BF16, the OS grants AMX tiles, and
    ``FASTPEFT_NF4_AMX=0`` does not keep it off: ``fastpeft._native.cpu_isa``)."""
    return cpu_isa.amx_allowed() and bool(_native.op("amx_bf16_available")())


def nf4_matmul_transposed(dy: Tensor, w: NF4Weight) -> Tensor:
    """``dy @ dequant(w)``: dy ``(..., N)`` -> ``(..., K)`` in dy's dtype (the input gradient of nf4_matmul)."""
    w = _check_weight(w)
    n, k = w.shape
    _check_activation("dy", dy, n, "N")
    dx = nf4_matmul_transposed_packed(dy.reshape(-1, n), w.packed, w.absmax_float(), n, k, w.blocksize)
    return dx.reshape(*dy.shape[:-1], k)


def nf4_matmul_transposed_packed(dy2d: Tensor, packed: Tensor, absmax: Tensor, n: int, k: int,
                                 blocksize: int) -> Tensor:
    """``nf4_matmul_transposed`` on raw state (fp32 ``absmax``), unchecked: see ``nf4_matmul_packed``."""
    return _native.op(bf16_input_grad_kernel(dy2d) or "nf4_matmul_transposed")(dy2d, packed, absmax, n, k, blocksize)


def bf16_input_grad_kernel(dy2d: Tensor) -> Optional[str]:
    """Name of the native bf16 op that ``nf4_matmul_transposed_packed`` runs for ``dy2d``; None: the fp32 kernels."""
    m = dy2d.shape[0]
    if dy2d.dtype != torch.bfloat16 or m < BF16_GEMM_MIN_ROWS_TRANSPOSED:
        return None
    return "nf4_matmul_transposed_bf16_amx" if m <= BF16_AMX_MAX_ROWS and amx_available() else \
        "nf4_matmul_transposed_bf16"


def quantize(weight: Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """C++ quantization of a CPU float weight; the same bytes as ``NF4Weight.from_float``."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.device.type != "cpu":
        raise ValueError(f"weight is on {weight.device}; use NF4Weight.from_float for other devices")
    if weight.dim() == 0 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty tensor with at least one dimension, got shape {tuple(weight.shape)}")
    check_blocksize(blocksize)
    check_double_quant(double_quant)
    packed, absmax = _native.op("nf4_quantize")(weight.detach(), blocksize)
    if not double_quant:
        return NF4Weight(packed, weight.shape, weight.dtype, blocksize, absmax)
    offset = double_quant_offset(absmax)
    code2 = signed_dynamic_map()
    qabsmax, nested_absmax = _native.op("dynamic_quantize")(absmax - offset, code2, NESTED_BLOCKSIZE)
    return NF4Weight(packed, weight.shape, weight.dtype, blocksize, qabsmax,
                     nested_absmax=nested_absmax, nested_code=code2, offset=float(offset))


def nested_scales(w: NF4Weight) -> Tensor:
    """C++ decode of a double-quantized weight's block scales (equal to ``w.absmax_float()``)."""
    if not isinstance(w, NF4Weight) or not w.double_quant:
        raise ValueError("w must be a double-quantized NF4Weight")
    return _native.op("nested_scales")(w.absmax, w.nested_absmax, w.nested_code, w.offset)


def dequantize(w: NF4Weight, dtype: Optional[torch.dtype] = None) -> Tensor:
    """C++ dequantization to ``dtype`` (default: w's original dtype); equal to ``w.dequantize``."""
    if not isinstance(w, NF4Weight):
        raise TypeError(f"w must be an NF4Weight, got {type(w).__name__}")
    if w.device.type != "cpu":
        raise ValueError(f"w is on {w.device}; the CPU NF4 kernels need it on the CPU")
    dtype = w.dtype if dtype is None else dtype
    if dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    flat = _native.op("nf4_dequantize")(w.packed, w.absmax_float(), w.numel, w.blocksize, dtype)
    return flat.reshape(w.shape)
