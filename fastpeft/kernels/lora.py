"""Triton LoRA linear kernels: plain launchers (no autograd) and what the AOT report compiles.

Dispatch contract (``docs/architecture.md``): ``fastpeft.ops.lora`` validates
inputs and calls ``lora_forward`` / ``lora_backward`` / ``dropout_mask`` here
or in ``fastpeft.ops.lora_cpu``, which has the same functions.

Forward (two launches, after LoRAFusion):
  1. shrink: ``h = (keep ∘ x) Aᵀ / (1-p)`` ``[M, r]`` in x's dtype (fp32 accumulate; saved for backward);
  2. fused GEMM: the accumulator starts as ``s · h Bᵀ`` (scaled in fp32), then
     accumulates ``x Wᵀ``, adds the bias and stores ``y`` once.
Backward (each launch only when its output is needed):
  - shrink over dy: ``dh = dy B`` (in dy's dtype, needed by dx and dA);
  - reduce over M: ``dB = s · dyᵀ h`` and ``dA = s/(1-p) · dhᵀ (keep ∘ x)``,
    one program per output tile and row range (several ranges for long M, so
    the grid fills the GPU); the fp32 partials of the ranges are summed by
    torch in a fixed order and cast: deterministic, no atomics;
  - fused GEMM: ``dx = dy W`` with ``s/(1-p) · drop'(dh A)`` as the
    accumulator's initial value.
No gradient of W is ever computed here.

``lora_forward_with_base`` / ``lora_backward_with_base`` are that
orchestration with the frozen base's fused GEMM passed in, so QLoRA
(``fastpeft.kernels.qlora``) runs the same steps around its NF4 kernels.

Dropout, seeds, tile order and dot precision are the shared layer's
(``_common``): the mask follows HF PEFT (on x before A only), is never stored
and is regenerated from the seed by every kernel; fp32 inputs follow torch's
TF32 setting (exact ``ieee`` by default), fp16/bf16 accumulate in fp32.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import _lora_configs as cfg
from ._common import (cdiv, check_kernel_dtype, dot_precision, dropout_args, interpreter_upcast, launcher,
                      on_device_of, runs_on_tensor_cores, split_seed)
from ._lora_kernels import _dropout_keep_kernel, _lora_fused_gemm_kernel, _lora_reduce_kernel, _lora_shrink_kernel
from .aot_spec import launch_label, module_specs

__all__ = ["check_kernel_dtype", "dropout_mask", "lora_backward", "lora_backward_with_base", "lora_forward",
           "lora_forward_with_base", "lora_reduce", "lora_shrink"]

# M-split of the dA/dB reductions (see _reduce_splits).
_TARGET_PROGRAMS = 264
_MIN_SPLIT_ROWS = 512


def _precision_args(dtype: torch.dtype) -> dict:
    return dict(DOT_PRECISION=dot_precision(dtype), UPCAST=interpreter_upcast(dtype))


def lora_shrink(src: Tensor, mat: Tensor, mat_strides: tuple[int, int], out: Tensor, scale: float,
                dropout_p: float, seed: int) -> None:
    """out[M, R] = scale · drop(src) @ mat, with mat[l, r] at ``l*mat_strides[0] + r*mat_strides[1]``."""
    m, length = src.shape
    r = out.shape[1]
    config = cfg.pick_shrink(m, src.dtype)
    block_r = cfg.rank_block(r)
    grid = (cdiv(m, config.block_m), cdiv(r, block_r))
    _lora_shrink_kernel[grid](
        src, mat, out, m, length, r,
        src.stride(0), src.stride(1), mat_strides[0], mat_strides[1],
        float(scale), **dropout_args(dropout_p, seed),
        BLOCK_M=config.block_m, BLOCK_L=config.block_k, BLOCK_R=block_r, **_precision_args(src.dtype),
        **config.launch_options(),
    )


def lora_fused_gemm(src: Tensor, mat: Tensor, mat_strides: tuple[int, int], lhs: Tensor, lmat: Tensor,
                    lmat_strides: tuple[int, int], bias, out: Tensor, lora_scale: float, dropout_p: float,
                    seed: int) -> None:
    """out = lora_scale · drop'(lhs @ lmat) + src @ mat + bias; strides give mat[l, n] and lmat[r, n]."""
    m, length = src.shape
    n, r = out.shape[1], lhs.shape[1]
    config = cfg.pick_gemm(m, src.dtype, dropout_p > 0.0)
    grid = (cdiv(m, config.block_m) * cdiv(n, config.block_n),)
    _lora_fused_gemm_kernel[grid](
        src, mat, lhs, lmat, bias if bias is not None else out, out, m, n, length, r,
        src.stride(0), src.stride(1), mat_strides[0], mat_strides[1], lmat_strides[0], lmat_strides[1],
        bias.stride(0) if bias is not None else 0,
        float(lora_scale), **dropout_args(dropout_p, seed),
        HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_L=config.block_k,
        BLOCK_R=cfg.GEMM_RANK_BLOCK, RANK_STEPS=cfg.gemm_rank_steps(r), GROUP_M=config.group_m,
        **_precision_args(src.dtype),
        **config.launch_options(),
    )


def _reduce_splits(m: int, programs: int) -> int:
    """How many row ranges the M-reduction is split into: enough programs to fill a large GPU,
    each range keeping at least ``_MIN_SPLIT_ROWS`` rows."""
    return max(1, min(_TARGET_PROGRAMS // max(programs, 1), m // _MIN_SPLIT_ROWS))


def lora_reduce(src: Tensor, hmat: Tensor, out: Tensor, scale: float, dropout_p: float, seed: int) -> None:
    """out[P, R] (any strides) = scale · drop(src)[:, p]ᵀ @ hmat[:, r]; src [M, P], hmat [M, R] contiguous.

    With one row range the kernel writes ``out`` directly (one launch). With
    several it writes fp32 partials ``[splits, P, R]`` (one per row range),
    which are summed in a fixed order and cast into ``out``: deterministic.
    """
    m, p_len = src.shape
    r = hmat.shape[1]
    config = cfg.pick_reduce(src.dtype)
    block_r = cfg.rank_block(r)
    grid_pr = (cdiv(p_len, config.block_m), cdiv(r, block_r))
    splits = _reduce_splits(m, grid_pr[0] * grid_pr[1])
    rows_per_split = cdiv(cdiv(m, splits), config.block_k) * config.block_k
    splits = cdiv(m, rows_per_split)
    target = out.unsqueeze(0) if splits == 1 else torch.empty((splits, p_len, r), dtype=torch.float32,
                                                                device=src.device)
    _lora_reduce_kernel[grid_pr + (splits,)](
        src, hmat, target, m, p_len, r, rows_per_split,
        src.stride(0), src.stride(1), target.stride(0), target.stride(1), target.stride(2),
        float(scale), **dropout_args(dropout_p, seed),
        BLOCK_P=config.block_m, BLOCK_M=config.block_k, BLOCK_R=block_r, **_precision_args(src.dtype),
        **config.launch_options(),
    )
    if splits > 1:
        out.copy_(target.sum(0))


def lora_forward_with_base(x2d: Tensor, lora_A: Tensor, dropout_p: float, seed: int,
                           base_plus_lora: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``h = drop(x) Aᵀ / (1-p)`` (x's dtype, saved), then ``y = base_plus_lora(h)``; returns ``(y, h)``.

    ``base_plus_lora(h)`` must return the base layer's output plus ``s · h Bᵀ``
    (and bias) from one fused kernel.
    """
    h = torch.empty((x2d.shape[0], lora_A.shape[0]), dtype=x2d.dtype, device=x2d.device)
    if x2d.shape[0] > 0:
        lora_shrink(x2d, lora_A, (lora_A.stride(1), lora_A.stride(0)), h, 1.0 / (1.0 - dropout_p), dropout_p, seed)
    return base_plus_lora(h), h


def lora_backward_with_base(dy: Tensor, x2d: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor, scaling: float,
                            dropout_p: float, seed: int, need_dx: bool, need_dA: bool, need_dB: bool,
                            base_grad_plus_lora: Callable[[Tensor], Tensor]) -> tuple:
    """Returns ``(dx | None, dA | None, dB | None)``; see the module docstring for the steps.

    ``base_grad_plus_lora(dh)`` must return ``dy W + s/(1-p) · drop'(dh A)``
    from one fused kernel (``dh = dy B``, dy's dtype). dA/dB are in the dtype of
    lora_A/lora_B; ``h`` is the tensor the forward returned.
    """
    m, r = x2d.shape[0], lora_A.shape[0]
    assert h.shape == (m, r) and h.dtype == x2d.dtype
    dA = torch.empty_like(lora_A) if need_dA else None
    dB = torch.empty_like(lora_B) if need_dB else None
    if m == 0:
        for grad in (dA, dB):
            if grad is not None:
                grad.zero_()
        return (x2d.new_empty(x2d.shape) if need_dx else None), dA, dB
    dx = None
    if need_dB:
        lora_reduce(dy, h.contiguous(), dB, scaling, 0.0, 0)
    if need_dx or need_dA:
        dh = torch.empty((m, r), dtype=dy.dtype, device=dy.device)
        lora_shrink(dy, lora_B, (lora_B.stride(0), lora_B.stride(1)), dh, 1.0, 0.0, 0)
        if need_dA:
            lora_reduce(x2d, dh, dA.t(), scaling / (1.0 - dropout_p), dropout_p, seed)
        if need_dx:
            dx = base_grad_plus_lora(dh)
    return dx, dA, dB


@launcher
def lora_forward(x2d: Tensor, weight: Tensor, bias, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
    """``x2d [M,K]`` (any strides), ``weight [N,K]``, ``bias [N]`` or None, ``lora_A [r,K]``, ``lora_B [N,r]``.

    All fp32, fp16 or bf16 (one dtype). Returns ``y [M,N]`` contiguous in x's
    dtype and ``h [M,r]`` in x's dtype ``= dropout(x) @ lora_Aᵀ / (1-p)`` (saved for
    backward). The dropout mask comes from ``seed`` (see module docstring).
    """
    m = x2d.shape[0]
    n = weight.shape[0]

    def base_plus_lora(h: Tensor) -> Tensor:
        y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
        if m > 0 and n > 0:
            lora_fused_gemm(x2d, weight, (weight.stride(1), weight.stride(0)), h, lora_B,
                            (lora_B.stride(1), lora_B.stride(0)), bias, y, scaling, 0.0, 0)
        return y

    return lora_forward_with_base(x2d, lora_A, dropout_p, seed, base_plus_lora)


@launcher
def lora_backward(dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
                  scaling: float, dropout_p: float, seed: int, need_dx: bool, need_dA: bool, need_dB: bool) -> tuple:
    """Returns ``(dx [M,K] in x's dtype | None, dA [r,K] | None, dB [N,r] | None)``; only the asked-for ones."""
    def base_grad_plus_lora(dh: Tensor) -> Tensor:
        dx = torch.empty(x2d.shape, dtype=x2d.dtype, device=x2d.device)
        lora_fused_gemm(dy, weight, (weight.stride(0), weight.stride(1)), dh, lora_A,
                        (lora_A.stride(0), lora_A.stride(1)), None, dx, scaling / (1.0 - dropout_p),
                        dropout_p, seed)
        return dx

    return lora_backward_with_base(dy, x2d, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_dA, need_dB,
                                   base_grad_plus_lora)


def dropout_mask(shape, dropout_p: float, seed: int, device) -> Tensor:
    """Bool keep-mask ``[M, K]`` (True = kept) exactly as the kernels apply it for ``seed``."""
    m, k = (int(s) for s in shape)
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    if m == 0 or k == 0:
        return out.bool()
    seed_lo, seed_hi = split_seed(seed)
    block_m, block_k = cfg.MASK_BLOCK
    grid = (cdiv(m, block_m), cdiv(k, block_k))
    with on_device_of(out):
        _dropout_keep_kernel[grid](out, m, k, float(dropout_p), seed_lo, seed_hi, BLOCK_M=block_m, BLOCK_K=block_k,
                                   num_warps=4, num_stages=1)
    return out.bool()


# --------------------------------------------------------------------------- AOT report
# What the report launches: r = 8 (PEFT's default; not a multiple of 16, so R carries no divisibility hint)
# and r = 4 (the same variants as r = 8, reported under r8), 16, 32, 64 and 128. The fused GEMM unrolls a
# power-of-two number of 16-wide rank chunks (``_lora_configs.gemm_rank_steps``), so each of 16 ... 128 is a
# variant of its own (the longest unroll with dropout is the register-heaviest; r = 256 compiles alike);
# the shrink and reduce kernels compile alike for every r >= 64. One token count M per row-tile config (M is
# never specialised); K = N = 4096 as in the benchmark's Llama-style layers.
AOT_RANKS = (8, 4, 16, 32, 64, 128)
AOT_TOKENS = (16, 64, 2048)
AOT_FEATURES = 4096


def aot_launches() -> None:
    """Runs the launchers on realistic contiguous arguments: every dtype, rank class, config and flag."""
    from ._common import TRITON_DTYPE

    k = n = AOT_FEATURES
    for dtype, t in TRITON_DTYPE.items():
        gemm = runs_on_tensor_cores(dtype, dot_precision(dtype))
        weight, bias = torch.empty((n, k), dtype=dtype), torch.empty(n, dtype=dtype)
        for r in AOT_RANKS:
            lora_A, lora_B = torch.empty((r, k), dtype=dtype), torch.empty((n, r), dtype=dtype)
            for m in AOT_TOKENS:
                x, dy = torch.empty((m, k), dtype=dtype), torch.empty((m, n), dtype=dtype)
                h = torch.empty((m, r), dtype=dtype)
                for p, tag in ((0.0, "fwd"), (0.1, "fwd_dropout")):
                    with launch_label(f"{t},r{r},m{m},{tag}", gemm):
                        lora_forward(x, weight, bias, lora_A, lora_B, 2.0, p, 1)
                with launch_label(f"{t},r{r},m{m},bwd", gemm):
                    lora_backward(dy, x, weight, lora_A, lora_B, h, 2.0, 0.0, 0, True, True, True)
                with launch_label(f"{t},r{r},m{m},bwd_dropout", gemm):
                    lora_backward(dy, x, weight, lora_A, lora_B, h, 2.0, 0.1, 1, True, True, False)
    with launch_label("mask", False):
        dropout_mask((64, k), 0.1, 1, "cpu")


def aot_specs():
    """Every variant ``aot_launches`` makes (see ``fastpeft.kernels.aot_spec``)."""
    return list(module_specs(__name__))
