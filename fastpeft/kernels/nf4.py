"""Triton kernels for NF4 (bitsandbytes 4-bit NormalFloat) weights.

``y = x · dequant(W)ᵀ (+ bias) (+ h · Bᵀ)`` and ``dX = dy · dequant(W) (+ dh · A)``
with ``W`` kept packed: each program dequantizes the ``[BN, BK]`` weight tiles
it needs in registers, from the packed bytes, the fp32 per-block absmax and the
16-entry codebook, and never writes a dequantized weight to memory.

Dequantization is bit-identical to ``bitsandbytes.functional.dequantize_4bit``:
``fp32(code[nibble] * absmax)`` (one fp32 multiply), then a cast to x's dtype
before the product (``_dequant_tile``; ``nf4_dequantize`` runs the same helper
and is what tests compare against bitsandbytes).

Layout (DESIGN.md §5): weight ``[N, K]`` flattened row-major; element ``2j`` is
the high nibble of byte ``j``. The launchers require ``K % blocksize == 0`` so
a quantization block never straddles two rows; double-quantized absmax must be
resolved to fp32 by the caller (``NF4Weight.absmax_float()``).

Three matmul kernels:
- ``_nf4_matmul_kernel``: tiled ``tl.dot`` forward (prefill/training, M > 16).
- ``_nf4_gemv_kernel``: decode forward for M <= 16, one program per ``BN``
  output features, products summed with ``tl.sum`` (no tensor cores; the
  weight is read exactly once, which is what bounds a decode step).
- ``_nf4_matmul_t_kernel``: ``dX = dy · W`` for the backward pass.
The optional LoRA term enters the accumulator before it is stored (LoRAFusion):
``h = s · drop(x) Aᵀ`` (forward) or ``dh = s · dy B`` (backward) is computed
by the caller (the LoRA shrink kernel) and padded to ``R_PAD >= 16`` lanes in
the kernel; in backward the dropout mask is regenerated with the LoRA kernels'
``keep_mask``, so both ops draw the same mask for one seed.
Plain launchers only: no autograd here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._lora_kernels import keep_mask
from .aot_spec import KernelSpec
from .lora import split_seed

GEMV_MAX_M = 16
_DOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def _nf4_codes(packed_ptr, code_ptr, n, k, K, mask):
    """fp32 codebook values of elements (n, k) (broadcastable int tensors)."""
    element = n * K + k
    byte = tl.load(packed_ptr + (element >> 1), mask=mask, other=0).to(tl.int32)
    # K is even, so an element's parity is k's: even -> high nibble.
    shift = ((k & 1) ^ 1) * 4
    nibble = (byte >> shift) & 0xF
    return tl.load(code_ptr + nibble)


@triton.jit
def _dequant_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, offs_k, k_start, N, K,
                  BLOCKSIZE: tl.constexpr, BK: tl.constexpr, K_MAJOR: tl.constexpr):
    """fp32 ``code * absmax`` for rows ``offs_n`` x columns ``offs_k``.

    Shape ``[BN, BK]``, or ``[BK, BN]`` when ``K_MAJOR``. ``offs_k`` must be
    ``k_start + arange(BK)``. Out-of-range elements are 0 (or -0).
    """
    if K_MAJOR:
        n = offs_n[None, :]
        k = offs_k[:, None]
    else:
        n = offs_n[:, None]
        k = offs_k[None, :]
    mask = (n < N) & (k < K)
    codes = _nf4_codes(packed_ptr, code_ptr, n, k, K, mask)
    blocks_per_row = K // BLOCKSIZE
    if BK <= BLOCKSIZE:
        # k_start is a multiple of BK and BK divides BLOCKSIZE: one block per row.
        scale = tl.load(absmax_ptr + offs_n * blocks_per_row + k_start // BLOCKSIZE,
                        mask=offs_n < N, other=0.0)
        if K_MAJOR:
            scale2d = scale[None, :]
        else:
            scale2d = scale[:, None]
    else:
        scale2d = tl.load(absmax_ptr + n * blocks_per_row + k // BLOCKSIZE, mask=mask, other=0.0)
    return codes * scale2d


# --------------------------------------------------------------------------- kernels
@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, N, K,
                        BLOCKSIZE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, offs_k, pid_k * BK, N, K,
                      BLOCKSIZE, BK, False)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, h_ptr, lb_ptr, y_ptr,
                       M, N, K, R,
                       stride_xm, stride_xk, stride_ym, stride_yn,
                       stride_hm, stride_hr, stride_bn, stride_br,
                       BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                       R_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped launch order: GROUP_M row-tiles share each weight column-tile in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k_start in range(0, K, BK):
        offs_k = k_start + tl.arange(0, BK)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        w_t = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, offs_k, k_start, N, K,
                            BLOCKSIZE, BK, True)
        acc = tl.dot(x, w_t.to(dtype), acc, input_precision=INPUT_PRECISION)
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                    mask=m_mask[:, None] & (offs_r[None, :] < R), other=0.0)
        b_t = tl.load(lb_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                      mask=n_mask[None, :] & (offs_r[:, None] < R), other=0.0)
        acc = tl.dot(h.to(dtype), b_t.to(dtype), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, h_ptr, lb_ptr, y_ptr,
                     M, N, K, R,
                     stride_xm, stride_xk, stride_ym, stride_yn,
                     stride_hm, stride_hr, stride_bn, stride_br,
                     BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                     R_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k_start in range(0, K, BK):
        offs_k = k_start + tl.arange(0, BK)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        # Round the weight to x's dtype first, as the tl.dot kernel and torch do.
        w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, offs_k, k_start, N, K,
                          BLOCKSIZE, BK, False).to(dtype).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                    mask=m_mask[:, None] & (offs_r[None, :] < R), other=0.0).to(dtype).to(tl.float32)
        b = tl.load(lb_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_mask[:, None] & (offs_r[None, :] < R), other=0.0).to(tl.float32)
        acc += tl.sum(h[:, None, :] * b[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _nf4_matmul_t_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, dh_ptr, la_ptr, dx_ptr,
                         M, N, K, R,
                         stride_dym, stride_dyn, stride_dxm, stride_dxk,
                         stride_hm, stride_hr, stride_ar, stride_ak,
                         p, drop_scale, seed_lo, seed_hi,
                         BLOCKSIZE: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr,
                         DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    m_mask = offs_m < M
    k_mask = offs_k < K
    dtype = dy_ptr.dtype.element_ty
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n_start in range(0, N, BN):
        offs_n = n_start + tl.arange(0, BN)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=m_mask[:, None] & (offs_n[None, :] < N), other=0.0)
        w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, offs_k, pid_k * BK, N, K,
                          BLOCKSIZE, BK, False)
        acc = tl.dot(dy, w.to(dtype), acc, input_precision=INPUT_PRECISION)
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        dh = tl.load(dh_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                     mask=m_mask[:, None] & (offs_r[None, :] < R), other=0.0)
        a = tl.load(la_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=(offs_r[:, None] < R) & k_mask[None, :], other=0.0)
        if DROPOUT:
            # Same Philox mask as the LoRA kernels drew for x in the forward pass.
            lora = tl.dot(dh.to(dtype), a.to(dtype), input_precision=INPUT_PRECISION)
            keep = keep_mask(seed_lo, seed_hi, offs_m, offs_k, K, p)
            acc += tl.where(keep, lora * drop_scale, 0.0)
        else:
            acc = tl.dot(dh.to(dtype), a.to(dtype), acc, input_precision=INPUT_PRECISION)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes of one launch. ``BK`` may exceed ``blocksize`` (per-element absmax)."""

    BM: int
    BN: int
    BK: int
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 8


# Tensor-core GEMM tiles by (dtype, precision): forward for M < 1024 / M >= 1024, and
# backward over (M, K). fp32 "ieee" runs on FMA units, whose dot needs much
# smaller tiles to stay within registers; tf32 sits in between.
_GEMM = {
    "16bit": dict(small=MatmulConfig(BM=64, BN=64, BK=64, num_warps=4, num_stages=3),
                  large=MatmulConfig(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
                  bwd=MatmulConfig(BM=64, BN=64, BK=64, num_warps=4, num_stages=3)),
    "tf32": dict(small=MatmulConfig(BM=64, BN=64, BK=32, num_warps=4, num_stages=3),
                 large=MatmulConfig(BM=128, BN=64, BK=32, num_warps=8, num_stages=3),
                 bwd=MatmulConfig(BM=64, BN=32, BK=64, num_warps=4, num_stages=3)),
    "ieee": dict(small=MatmulConfig(BM=32, BN=64, BK=16, num_warps=4, num_stages=2),
                 large=MatmulConfig(BM=64, BN=64, BK=16, num_warps=8, num_stages=2),
                 bwd=MatmulConfig(BM=32, BN=16, BK=64, num_warps=4, num_stages=2)),
}
# Decode GEMV, by BM = next power of two >= M: BM * BN * BK stays <= 8192.
_GEMV = {
    1: MatmulConfig(BM=1, BN=32, BK=64, num_warps=4, num_stages=3),
    2: MatmulConfig(BM=2, BN=32, BK=64, num_warps=4, num_stages=3),
    4: MatmulConfig(BM=4, BN=32, BK=64, num_warps=4, num_stages=3),
    8: MatmulConfig(BM=8, BN=16, BK=64, num_warps=4, num_stages=3),
    16: MatmulConfig(BM=16, BN=16, BK=32, num_warps=4, num_stages=3),
}


def _cap_bk(config: MatmulConfig, blocksize: int) -> MatmulConfig:
    """Keep BK within one quantization block (one absmax load per row per step)."""
    if config.BK <= blocksize:
        return config
    return MatmulConfig(config.BM, config.BN, max(blocksize, 16), config.num_warps, config.num_stages,
                        config.GROUP_M)


def _gemm_family(dtype: torch.dtype) -> str:
    return "16bit" if dtype != torch.float32 else _input_precision(dtype)


def forward_config(m: int, blocksize: int, dtype: torch.dtype = torch.float16) -> MatmulConfig:
    if m <= GEMV_MAX_M:
        return _cap_bk(_GEMV[triton.next_power_of_2(max(m, 1))], blocksize)
    return _cap_bk(_GEMM[_gemm_family(dtype)]["large" if m >= 1024 else "small"], blocksize)


def backward_config(m: int, blocksize: int, dtype: torch.dtype = torch.float16) -> MatmulConfig:
    return _cap_bk(_GEMM[_gemm_family(dtype)]["bwd"], blocksize)


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _check_layout(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
                  blocksize: int) -> None:
    # The op layer validates user input; these guard direct launcher calls.
    if k % blocksize or blocksize % 2:
        raise ValueError(f"in_features={k} must be a multiple of blocksize={blocksize}")
    if packed.dtype != torch.uint8 or packed.numel() * 2 != n * k or not packed.is_contiguous():
        raise ValueError(f"packed must be contiguous uint8 with {n * k // 2} bytes for a [{n}, {k}] weight")
    if absmax.dtype != torch.float32 or absmax.numel() != n * k // blocksize or not absmax.is_contiguous():
        raise ValueError(f"absmax must be contiguous fp32 with {n * k // blocksize} blocks")
    if code.dtype != torch.float32 or code.numel() != 16 or not code.is_contiguous():
        raise ValueError("code must be a contiguous fp32 tensor of 16 values")
    if n * k >= 2**31:
        raise ValueError(f"weight of {n * k} elements exceeds the kernels' int32 indexing")


def _output(out: Optional[torch.Tensor], shape: tuple, like: torch.Tensor, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name} must be a {list(shape)} {like.dtype} tensor on {like.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


# --------------------------------------------------------------------------- launchers
def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
                   blocksize: int, dtype: torch.dtype = torch.float32,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense ``[n, k]`` weight in ``dtype``, from the same helper the matmuls use."""
    _check_layout(packed, absmax, code, n, k, blocksize)
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=packed.device)
    elif out.shape != (n, k) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {k}] tensor, got {tuple(out.shape)}")
    bn, bk = 32, min(64, blocksize)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _nf4_dequant_kernel[grid](packed, absmax, code, out, n, k, BLOCKSIZE=blocksize, BN=bn, BK=bk)
    return out


def nf4_matmul(x2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               n: int, k: int, blocksize: int, bias: Optional[torch.Tensor] = None,
               lora_h: Optional[torch.Tensor] = None, lora_B: Optional[torch.Tensor] = None,
               config: Optional[MatmulConfig] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2d [M, k] · dequant(W)ᵀ (+ bias [n]) (+ lora_h [M, r] · lora_B[n, r]ᵀ)`` -> ``[M, n]``.

    ``lora_h`` is the already scaled ``s · drop(x) Aᵀ``. Picks the GEMV kernel
    for M <= 16 and the ``tl.dot`` kernel otherwise (``config`` overrides tiles;
    a config with ``BM <= 16`` and ``M <= BM`` selects the GEMV kernel).
    ``out``: an ``[M, n]`` tensor of x's dtype to write into.
    """
    _check_layout(packed, absmax, code, n, k, blocksize)
    m = x2d.shape[0]
    y = _output(out, (m, n), x2d, "out")
    if m == 0:
        return y
    cfg = config or forward_config(m, blocksize, x2d.dtype)
    has_lora = lora_h is not None
    r = lora_h.shape[1] if has_lora else 0
    h = lora_h if has_lora else y
    lb = lora_B if has_lora else y
    b = bias if bias is not None else y
    common = (x2d, packed, absmax, code, b, h, lb, y, m, n, k, r,
              x2d.stride(0), x2d.stride(1), y.stride(0), y.stride(1),
              h.stride(0), h.stride(1), lb.stride(0), lb.stride(1))
    if cfg.BM <= GEMV_MAX_M and m <= cfg.BM:
        grid = (triton.cdiv(n, cfg.BN),)
        _nf4_gemv_kernel[grid](*common, BLOCKSIZE=blocksize, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
                               R_PAD=_r_pad(r), BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
                               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        grid = (triton.cdiv(m, cfg.BM) * triton.cdiv(n, cfg.BN),)
        _nf4_matmul_kernel[grid](*common, BLOCKSIZE=blocksize, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
                                 R_PAD=_r_pad(r), INPUT_PRECISION=_input_precision(x2d.dtype),
                                 BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def nf4_matmul_transposed(dy2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                          n: int, k: int, blocksize: int, lora_dh: Optional[torch.Tensor] = None,
                          lora_A: Optional[torch.Tensor] = None,
                          dropout_p: float = 0.0, seed: int = 0,
                          config: Optional[MatmulConfig] = None,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dy2d [M, n] · dequant(W) (+ drop'(lora_dh [M, r] · lora_A [r, k]))`` -> ``[M, k]`` in dy's dtype.

    With ``dropout_p > 0`` the LoRA term is masked by the keep-mask of
    ``fastpeft.kernels.lora`` for ``seed`` (the one x saw in the forward pass)
    and scaled by ``1/(1-p)``: the input gradient of ``drop(x) Aᵀ``.
    """
    _check_layout(packed, absmax, code, n, k, blocksize)
    m = dy2d.shape[0]
    dx = _output(out, (m, k), dy2d, "out")
    if m == 0:
        return dx
    cfg = config or backward_config(m, blocksize, dy2d.dtype)
    has_lora = lora_dh is not None
    r = lora_dh.shape[1] if has_lora else 0
    dh = lora_dh if has_lora else dx
    la = lora_A if has_lora else dx
    dropout = has_lora and dropout_p > 0.0
    seed_lo, seed_hi = split_seed(seed) if dropout else (0, 0)
    grid = (triton.cdiv(m, cfg.BM), triton.cdiv(k, cfg.BK))
    _nf4_matmul_t_kernel[grid](dy2d, packed, absmax, code, dh, la, dx, m, n, k, r,
                               dy2d.stride(0), dy2d.stride(1), dx.stride(0), dx.stride(1),
                               dh.stride(0), dh.stride(1), la.stride(0), la.stride(1),
                               float(dropout_p), 1.0 / (1.0 - dropout_p), seed_lo, seed_hi,
                               BLOCKSIZE=blocksize, HAS_LORA=has_lora, R_PAD=_r_pad(r), DROPOUT=dropout,
                               INPUT_PRECISION=_input_precision(dy2d.dtype),
                               BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
                               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dx


# --------------------------------------------------------------------------- AOT report
_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_STRIDE_ARGS_FWD = ("stride_xm", "stride_xk", "stride_ym", "stride_yn",
                    "stride_hm", "stride_hr", "stride_bn", "stride_br")
_STRIDE_ARGS_BWD = ("stride_dym", "stride_dyn", "stride_dxm", "stride_dxk",
                    "stride_hm", "stride_hr", "stride_ar", "stride_ak")


def _forward_signature(t: str, extra_constexprs: tuple[str, ...]) -> dict:
    sig = {"x_ptr": f"*{t}", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
           "bias_ptr": f"*{t}", "h_ptr": "*fp32", "lb_ptr": f"*{t}", "y_ptr": f"*{t}",
           "M": "i32", "N": "i32", "K": "i32", "R": "i32"}
    sig.update({s: "i32" for s in _STRIDE_ARGS_FWD})
    sig.update({c: "constexpr" for c in extra_constexprs})
    return sig


def aot_specs() -> list[KernelSpec]:
    """Every (kernel, config, dtype) the launchers can pick, with and without LoRA."""
    specs = []
    blocksize = 64
    for dtype, t in _TRITON_TYPE.items():
        for has_lora in (False, True):
            lora = "_lora" if has_lora else ""
            precisions = ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)
            for prec in precisions:
                # fp32 with ieee precision runs on FMA units, not tensor cores.
                is_gemm = not (dtype == torch.float32 and prec == "ieee")
                tag = f"{t}{lora}" + (f"_{prec}" if dtype == torch.float32 else "")
                family = _GEMM["16bit" if dtype != torch.float32 else prec]
                for label in ("small", "large"):
                    cfg = _cap_bk(family[label], blocksize)
                    names = ("BLOCKSIZE", "HAS_BIAS", "HAS_LORA", "R_PAD", "INPUT_PRECISION",
                             "BM", "BN", "BK", "GROUP_M")
                    specs.append(KernelSpec(
                        name=f"nf4_matmul_{label}_{tag}", fn=_nf4_matmul_kernel,
                        signature=_forward_signature(t, names),
                        constexprs=dict(BLOCKSIZE=blocksize, HAS_BIAS=True, HAS_LORA=has_lora, R_PAD=16,
                                        INPUT_PRECISION=prec, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
                                        GROUP_M=cfg.GROUP_M),
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, is_gemm=is_gemm))
                cfg = _cap_bk(family["bwd"], blocksize)
                sig = {"dy_ptr": f"*{t}", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                       "dh_ptr": "*fp32", "la_ptr": f"*{t}", "dx_ptr": f"*{t}",
                       "M": "i32", "N": "i32", "K": "i32", "R": "i32"}
                sig.update({s: "i32" for s in _STRIDE_ARGS_BWD})
                sig.update({"p": "fp32", "drop_scale": "fp32", "seed_lo": "i32", "seed_hi": "i32"})
                names = ("BLOCKSIZE", "HAS_LORA", "R_PAD", "DROPOUT", "INPUT_PRECISION", "BM", "BN", "BK")
                sig.update({c: "constexpr" for c in names})
                for dropout in ((False, True) if has_lora else (False,)):
                    specs.append(KernelSpec(
                        name=f"nf4_matmul_t_{tag}" + ("_dropout" if dropout else ""), fn=_nf4_matmul_t_kernel,
                        signature=sig,
                        constexprs=dict(BLOCKSIZE=blocksize, HAS_LORA=has_lora, R_PAD=16, DROPOUT=dropout,
                                        INPUT_PRECISION=prec, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK),
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, is_gemm=is_gemm))
            for bm, cfg in _GEMV.items():
                cfg = _cap_bk(cfg, blocksize)
                names = ("BLOCKSIZE", "HAS_BIAS", "HAS_LORA", "R_PAD", "BM", "BN", "BK")
                specs.append(KernelSpec(
                    name=f"nf4_gemv_m{bm}_{t}{lora}", fn=_nf4_gemv_kernel,
                    signature=_forward_signature(t, names),
                    constexprs=dict(BLOCKSIZE=blocksize, HAS_BIAS=True, HAS_LORA=has_lora, R_PAD=16,
                                    BM=cfg.BM, BN=cfg.BN, BK=cfg.BK),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, is_gemm=False))
        specs.append(KernelSpec(
            name=f"nf4_dequant_{t}", fn=_nf4_dequant_kernel,
            signature={"packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": f"*{t}",
                       "N": "i32", "K": "i32", "BLOCKSIZE": "constexpr", "BN": "constexpr", "BK": "constexpr"},
            constexprs=dict(BLOCKSIZE=blocksize, BN=32, BK=64), is_gemm=False))
    return specs
