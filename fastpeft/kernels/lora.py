"""Triton LoRA linear kernels: plain launchers (no autograd) and their AOT specs.

``fastpeft.ops.lora`` validates inputs and calls ``lora_forward`` /
``lora_backward`` / ``dropout_mask``; ``fastpeft.ops.lora_cpu`` implements the
same contract with torch ops.

Forward (two launches, after LoRAFusion):
  1. shrink: ``h = s/(1-p) · (keep ∘ x) Aᵀ`` as fp32 ``[M, r]`` (saved for backward);
  2. fused GEMM: the accumulator starts as ``h Bᵀ``, then accumulates ``x Wᵀ``,
     adds the bias and stores ``y`` once.
Backward (each launch only when its output is needed):
  - shrink over dy: ``dh = s · dy B`` (fp32, needed by dx and dA);
  - reduce over M: ``dB = dyᵀ h`` and ``dA = dhᵀ (keep ∘ x) / (1-p)``, one
    program per output tile and row range (several ranges for long M, so the
    grid fills the GPU); the fp32 partials of the ranges are summed by torch
    in a fixed order and cast: deterministic, no atomics;
  - fused GEMM: ``dx = dy W`` with ``dh A`` as the accumulator's initial value
    (through the regenerated mask and ``1/(1-p)`` when dropout is on).
No gradient of W is ever computed here.

Dropout follows HF PEFT (mask on x before A only, kept values scaled by
``1/(1-p)``). The mask is not stored: every kernel regenerates it from the
integer seed and the element index ``row * K + col`` with ``tl.rand``
(Philox). The seed, an int in ``[0, 2**62)``, is split into two 31-bit halves
that the kernels join into one 62-bit Philox key, so every seed gives its own
mask. With ``dropout_p == 0`` the ``DROPOUT`` constexpr is False and the mask
code is compiled away.

Launch configs: short explicit tables in ``_lora_configs`` picked by M and
dtype; ``aot_specs`` (built in ``_lora_aot``) lists every variant the
launchers run, for ``python -m fastpeft.tools.kernel_report``.

Numerics: fp32 accumulation everywhere. fp32 inputs use ``tl.dot(...,
input_precision="ieee")`` so results match torch fp32 on the CPU; set
``ALLOW_TF32 = True`` to trade that for TF32 tensor cores. fp16/bf16 inputs
multiply ``h``/``dh`` in the input dtype (as torch does), accumulate in fp32.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._backend import triton_interpreter_enabled
from . import _lora_configs as cfg
from ._lora_kernels import _dropout_keep_kernel, _lora_fused_gemm_kernel, _lora_reduce_kernel, _lora_shrink_kernel
from ._lora_aot import lora_aot_specs
from .aot_spec import KernelSpec

ALLOW_TF32 = False
_SEED_LIMIT = 2**62  # fastpeft.ops draws seeds in [0, 2**62)
# M-split of the dA/dB reductions (see _reduce_splits).
_TARGET_PROGRAMS = 264
_MIN_SPLIT_ROWS = 512


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_seed(seed: int) -> tuple[int, int]:
    seed = int(seed)
    assert 0 <= seed < _SEED_LIMIT, f"seed {seed} outside [0, 2**62)"
    return seed & 0x7FFFFFFF, seed >> 31


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if (dtype != torch.float32 or ALLOW_TF32) else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and triton_interpreter_enabled()


def _dropout_args(dropout_p: float, seed: int) -> dict:
    seed_lo, seed_hi = split_seed(seed) if dropout_p > 0.0 else (0, 0)
    return dict(p=float(dropout_p), seed_lo=seed_lo, seed_hi=seed_hi, DROPOUT=dropout_p > 0.0)


def lora_shrink(src: Tensor, mat: Tensor, mat_strides: tuple[int, int], out: Tensor, scale: float,
            dropout_p: float, seed: int) -> None:
    """out[M, R] = scale · drop(src) @ mat, with mat[l, r] at ``l*mat_strides[0] + r*mat_strides[1]``."""
    m, length = src.shape
    r = out.shape[1]
    config = cfg.pick_shrink(m, src.dtype)
    block_r = cfg.rank_block(r)
    grid = (_cdiv(m, config.block_a), _cdiv(r, block_r))
    _lora_shrink_kernel[grid](
        src, mat, out, m, length, r,
        src.stride(0), src.stride(1), mat_strides[0], mat_strides[1],
        float(scale), **_dropout_args(dropout_p, seed),
        BLOCK_M=config.block_a, BLOCK_L=config.block_b, BLOCK_R=block_r,
        PREC=_precision(src.dtype), UPCAST=_upcast(src.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _fused_gemm(src: Tensor, mat: Tensor, mat_strides: tuple[int, int], lhs: Tensor, lmat: Tensor,
                lmat_strides: tuple[int, int], bias, out: Tensor, dropout_p: float, seed: int) -> None:
    """out = drop'(lhs @ lmat) + src @ mat + bias; strides give mat[l, n] and lmat[r, n]."""
    m, length = src.shape
    n, r = out.shape[1], lhs.shape[1]
    config = cfg.pick_gemm(m, src.dtype, dropout_p > 0.0)
    grid = (_cdiv(m, config.block_m) * _cdiv(n, config.block_n),)
    _lora_fused_gemm_kernel[grid](
        src, mat, lhs, lmat, bias if bias is not None else out, out, m, n, length, r,
        src.stride(0), src.stride(1), mat_strides[0], mat_strides[1], lmat_strides[0], lmat_strides[1],
        1.0 / (1.0 - dropout_p), **_dropout_args(dropout_p, seed),
        HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_L=config.block_k,
        BLOCK_R=cfg.GEMM_RANK_BLOCK, GROUP_M=cfg.GROUP_M,
        PREC=_precision(src.dtype), UPCAST=_upcast(src.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _reduce_splits(m: int, programs: int) -> int:
    """How many row ranges the M-reduction is split into: enough programs to fill a large GPU,
    each range keeping at least ``_MIN_SPLIT_ROWS`` rows."""
    return max(1, min(_TARGET_PROGRAMS // max(programs, 1), m // _MIN_SPLIT_ROWS))


def lora_reduce(src: Tensor, hmat: Tensor, out: Tensor, scale: float, dropout_p: float, seed: int) -> None:
    """out[P, R] (any strides) = scale · drop(src)[:, p]ᵀ @ hmat[:, r]; src [M, P], hmat fp32 [M, R].

    The kernel writes fp32 partials ``[splits, P, R]`` (one per row range); they
    are summed in a fixed order and cast into ``out``.
    """
    m, p_len = src.shape
    r = hmat.shape[1]
    config = cfg.pick_reduce(src.dtype)
    block_r = cfg.rank_block(r)
    grid_pr = (_cdiv(p_len, config.block_a), _cdiv(r, block_r))
    splits = _reduce_splits(m, grid_pr[0] * grid_pr[1])
    rows_per_split = _cdiv(_cdiv(m, splits), config.block_b) * config.block_b
    splits = _cdiv(m, rows_per_split)
    partial = torch.empty((splits, p_len, r), dtype=torch.float32, device=src.device)
    _lora_reduce_kernel[grid_pr + (splits,)](
        src, hmat, partial, m, p_len, r, rows_per_split,
        src.stride(0), src.stride(1), partial.stride(0), partial.stride(1), partial.stride(2),
        float(scale), **_dropout_args(dropout_p, seed),
        BLOCK_P=config.block_a, BLOCK_M=config.block_b, BLOCK_R=block_r,
        PREC=_precision(src.dtype), UPCAST=_upcast(src.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    out.copy_(partial[0] if splits == 1 else partial.sum(0))


def lora_forward(x2d: Tensor, weight: Tensor, bias, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
    """``x2d [M,K]`` (any strides), ``weight [N,K]``, ``bias [N]`` or None, ``lora_A [r,K]``, ``lora_B [N,r]``.

    All fp32, fp16 or bf16 (one dtype). Returns ``y [M,N]`` contiguous in x's
    dtype and ``h [M,r]`` fp32 ``= scaling · dropout(x) @ lora_Aᵀ`` (saved for
    backward). The dropout mask comes from ``seed`` (see module docstring).
    """
    m, k = x2d.shape
    n, r = weight.shape[0], lora_A.shape[0]
    assert weight.shape[1] == k and lora_A.shape[1] == k and lora_B.shape == (n, r)
    h = torch.empty((m, r), dtype=torch.float32, device=x2d.device)
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0 or n == 0:
        return y, h
    if bias is not None:
        bias = bias.contiguous()
    lora_shrink(x2d, lora_A, (lora_A.stride(1), lora_A.stride(0)), h, scaling / (1.0 - dropout_p), dropout_p, seed)
    _fused_gemm(x2d, weight, (weight.stride(1), weight.stride(0)), h, lora_B, (lora_B.stride(1), lora_B.stride(0)),
                bias, y, 0.0, 0)
    return y, h


def lora_backward(dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
                  scaling: float, dropout_p: float, seed: int, need_dx: bool, need_dA: bool, need_dB: bool) -> tuple:
    """Returns ``(dx [M,K] in x's dtype | None, dA [r,K] | None, dB [N,r] | None)``.

    ``dh = s · dy B`` (fp32); ``dB = dyᵀ h``; ``dA = dhᵀ dropout(x)``;
    ``dx = dy W + dropout_backward(dh A)``. Only the asked-for outputs are
    computed (and ``dh`` only when dx or dA needs it). dA/dB are in the dtype
    of lora_A/lora_B. ``h`` is the fp32 tensor ``lora_forward`` returned.
    """
    m, k = x2d.shape
    n, r = weight.shape[0], lora_A.shape[0]
    assert dy.shape == (m, n) and h.shape == (m, r) and h.dtype == torch.float32
    h = h.contiguous()
    dx = dA = dB = None
    if need_dx:
        dx = torch.empty((m, k), dtype=x2d.dtype, device=x2d.device)
    if need_dA:
        dA = torch.empty((r, k), dtype=lora_A.dtype, device=lora_A.device)
    if need_dB:
        dB = torch.empty((n, r), dtype=lora_B.dtype, device=lora_B.device)
    if m == 0:
        for grad in (dA, dB):
            if grad is not None:
                grad.zero_()
        return dx, dA, dB
    if need_dB:
        lora_reduce(dy, h, dB, 1.0, 0.0, 0)
    if need_dx or need_dA:
        dh = torch.empty((m, r), dtype=torch.float32, device=dy.device)
        lora_shrink(dy, lora_B, (lora_B.stride(0), lora_B.stride(1)), dh, scaling, 0.0, 0)
        if need_dA:
            lora_reduce(x2d, dh, dA.t(), 1.0 / (1.0 - dropout_p), dropout_p, seed)
        if need_dx:
            _fused_gemm(dy, weight, (weight.stride(0), weight.stride(1)), dh, lora_A,
                        (lora_A.stride(0), lora_A.stride(1)), None, dx, dropout_p, seed)
    return dx, dA, dB


def dropout_mask(shape, dropout_p: float, seed: int, device) -> Tensor:
    """Bool keep-mask ``[M, K]`` (True = kept) exactly as the kernels apply it for ``seed``."""
    m, k = (int(s) for s in shape)
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    if m == 0 or k == 0:
        return out.bool()
    seed_lo, seed_hi = split_seed(seed)
    block_m, block_k = cfg.MASK_BLOCK
    grid = (_cdiv(m, block_m), _cdiv(k, block_k))
    _dropout_keep_kernel[grid](out, m, k, float(dropout_p), seed_lo, seed_hi, BLOCK_M=block_m, BLOCK_K=block_k,
                               num_warps=4, num_stages=1)
    return out.bool()


def aot_specs() -> list[KernelSpec]:
    """Every (kernel, role, launch config, dtype) the launchers can run, for the kernel report.

    fp32 specs use the default exact ``ieee`` dot, which has no tensor-core
    form, so they are not marked ``is_gemm`` (unless ``ALLOW_TF32``).
    """
    return lora_aot_specs(_precision, lambda dtype: dtype != torch.float32 or ALLOW_TF32)
