"""Triton LoRA linear kernels: plain launchers (no autograd).

Dispatch contract (``docs/architecture.md``): ``fastpeft.ops.lora`` validates
inputs and calls ``lora_forward`` / ``lora_backward`` / ``dropout_mask`` here
or in ``fastpeft.cpu.lora``, which has the same functions.

Forward (two launches, after LoRAFusion; three when the shrink is split):
  1. shrink: ``h = (keep ∘ x) Aᵀ / (1-p)`` ``[M, r]`` in x's dtype (fp32 accumulate; saved for backward).
     Few rows (M below ~2000) leave SMs idle, so K is split (``_lora_configs.plan_shrink``): fp32 partials
     ``[splits, M, r]``, added in a fixed order by one more launch (deterministic, no atomics);
  2. fused GEMM: the accumulator starts as ``s · h Bᵀ`` (scaled in fp32), then
     accumulates ``x Wᵀ``, adds the bias and stores ``y`` once.
Backward (each launch only when its output is needed; at most five):
  - shrink over dy: ``dh = dy B`` (in dy's dtype, needed by dx and dA), split over N as in the forward;
  - reduce over M: ``dB = s · dyᵀ h`` and ``dA = s/(1-p) · dhᵀ (keep ∘ x)``,
    one program per output tile and row range (several ranges for long M and
    few columns, so the grid fills the GPU; never when the dh shrink is
    split); the fp32 partials of both reductions are summed by one launch in
    a fixed order: deterministic, no atomics;
  - fused GEMM: ``dx = dy W`` with ``s/(1-p) · drop'(dh A)`` as the
    accumulator's initial value.
Every launch at the benchmark's shapes has at least one program per SM of an
H100 (132): the plans in ``_lora_configs`` pick tiles and splits for that,
and the kernel report's grid gate checks it (``gates.aot.lora``' headline
launches).
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

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import _lora_configs as cfg
from ._common import (cdiv, check_kernel_dtype, dot_precision, dropout_args, interpreter_upcast, launcher,
                      on_device_of, split_seed)
from ._lora_kernels import (_dropout_keep_kernel, _lora_fused_gemm_kernel, _lora_reduce_kernel, _lora_shrink_kernel,
                            _lora_split_sum_kernel)

__all__ = ["check_kernel_dtype", "dropout_mask", "lora_backward", "lora_backward_with_base", "lora_forward",
           "lora_forward_with_base", "lora_reduce", "lora_shrink"]

SPLIT_SUM_BLOCK = 1024  # elements per program of _lora_split_sum_kernel


def _precision_args(dtype: torch.dtype) -> dict:
    return dict(DOT_PRECISION=dot_precision(dtype), UPCAST=interpreter_upcast(dtype))


@dataclass(frozen=True)
class SplitPartials:
    """fp32 partial sums ``[splits, rows, cols]`` of a split launch that still have to be added into ``out``."""

    partials: Tensor
    out: Tensor


def sum_partials(*pending: SplitPartials | None) -> None:
    """Adds up to two pending split reductions into their outputs, in one launch (fixed order: deterministic)."""
    jobs = [job for job in pending if job is not None]
    if not jobs:
        return
    if len(jobs) > 2:
        raise ValueError(f"pending: at most two split reductions per launch, got {len(jobs)}")

    def job_args(job: SplitPartials) -> tuple:
        splits, rows, cols = job.partials.shape
        return (job.partials, job.out, splits, rows, cols, job.out.stride(0), job.out.stride(1))

    first = job_args(jobs[0])
    blocks = cdiv(jobs[0].out.numel(), SPLIT_SUM_BLOCK)
    second = job_args(jobs[1]) if len(jobs) == 2 else first
    total = blocks + (cdiv(jobs[1].out.numel(), SPLIT_SUM_BLOCK) if len(jobs) == 2 else 0)
    _lora_split_sum_kernel[(total,)](*first, blocks, *second, HAS_SECOND=len(jobs) == 2, BLOCK=SPLIT_SUM_BLOCK,
                                     num_warps=4, num_stages=1)


def _split_target(out: Tensor, splits: int, rows: int, cols: int) -> Tensor:
    """Where a launch with ``splits`` splits writes: ``out`` itself for one, else fresh fp32 partials."""
    if splits == 1:
        return out
    return torch.empty((splits, rows, cols), dtype=torch.float32, device=out.device)


def lora_shrink(src: Tensor, mat: Tensor, mat_strides: tuple[int, int], out: Tensor, scale: float,
                dropout_p: float, seed: int) -> None:
    """out[M, R] (contiguous) = scale · drop(src) @ mat, with mat[l, r] at ``l*mat_strides[0] + r*mat_strides[1]``.

    When the row tiles alone leave SMs idle (small M), the long dimension is split
    (``_lora_configs.plan_shrink``): fp32 partials per split, summed in a fixed
    order by a second launch.
    """
    m, length = src.shape
    r = out.shape[1]
    config, splits, per_split = cfg.plan_shrink(m, length, r, src.dtype)
    block_r = cfg.rank_block(r)
    target = _split_target(out, splits, m, r)
    _lora_shrink_kernel[(cdiv(m, config.block_m), cdiv(r, block_r), splits)](
        src, mat, target, m, length, r, per_split,
        src.stride(0), src.stride(1), mat_strides[0], mat_strides[1],
        float(scale), **dropout_args(dropout_p, seed),
        BLOCK_M=config.block_m, BLOCK_L=config.block_k, BLOCK_R=block_r, **_precision_args(src.dtype),
        **config.launch_options(),
    )
    if splits > 1:
        sum_partials(SplitPartials(target, out))


def shrink_splits(m: int, length: int, r: int, dtype: torch.dtype) -> int:
    """How many launches' worth of splits ``lora_shrink`` uses for these sizes (1: one launch)."""
    return cfg.plan_shrink(m, length, r, dtype)[1]


def lora_fused_gemm(src: Tensor, mat: Tensor, mat_strides: tuple[int, int], lhs: Tensor, lmat: Tensor,
                    lmat_strides: tuple[int, int], bias, out: Tensor, lora_scale: float, dropout_p: float,
                    seed: int) -> None:
    """out = lora_scale · drop'(lhs @ lmat) + src @ mat + bias; strides give mat[l, n] and lmat[r, n]."""
    m, length = src.shape
    n, r = out.shape[1], lhs.shape[1]
    config = cfg.pick_gemm(m, n, src.dtype, dropout_p > 0.0)
    grid = (cdiv(m, config.block_m) * cdiv(n, config.block_n),)
    _lora_fused_gemm_kernel[grid](
        src, mat, lhs, lmat, bias if bias is not None else out, out, m, n, length, r,
        src.stride(0), src.stride(1), mat_strides[0], mat_strides[1], lmat_strides[0], lmat_strides[1],
        bias.stride(0) if bias is not None else 0,
        float(lora_scale), **dropout_args(dropout_p, seed),
        HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_L=config.block_k,
        BLOCK_R=cfg.GEMM_RANK_BLOCK, RANK_STEPS=cfg.gemm_rank_steps(r),
        UNROLLED_RANK_STEPS=cfg.GEMM_UNROLLED_RANK_STEPS, GROUP_M=config.group_m,
        **_precision_args(src.dtype),
        **config.launch_options(),
    )


def lora_reduce(src: Tensor, hmat: Tensor, out: Tensor, scale: float, dropout_p: float, seed: int,
                may_split: bool = True, defer_sum: bool = False) -> SplitPartials | None:
    """out[P, R] (any strides) = scale · drop(src)[:, p]ᵀ @ hmat[:, r]; src [M, P], hmat [M, R] contiguous.

    With one row range the kernel writes ``out`` directly (one launch). With
    several (``_lora_configs.plan_reduce``; never when ``may_split`` is False)
    it writes fp32 partials ``[splits, P, R]``, which ``sum_partials`` adds in a
    fixed order into ``out`` (deterministic): right away, or by the caller when
    ``defer_sum`` (then they are returned).
    """
    m, p_len = src.shape
    r = hmat.shape[1]
    config, splits, rows_per_split = cfg.plan_reduce(m, p_len, r, src.dtype, may_split)
    block_r = cfg.rank_block(r)
    grid_pr = (cdiv(p_len, config.block_m), cdiv(r, block_r))
    target = _split_target(out, splits, p_len, r)
    if splits == 1:
        target = target.unsqueeze(0)
    _lora_reduce_kernel[grid_pr + (splits,)](
        src, hmat, target, m, p_len, r, rows_per_split,
        src.stride(0), src.stride(1), target.stride(0), target.stride(1), target.stride(2),
        float(scale), **dropout_args(dropout_p, seed),
        BLOCK_P=config.block_m, BLOCK_M=config.block_k, BLOCK_R=block_r, **_precision_args(src.dtype),
        **config.launch_options(),
    )
    if splits == 1:
        return None
    pending = SplitPartials(target, out)
    if defer_sum:
        return pending
    sum_partials(pending)
    return None


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
    # At most five launches: dB, dh (+ the sum of its splits), dA, [one sum of dA's and dB's splits], dx. The
    # reductions split only when the dh shrink does not (M long enough to fill the GPU by rows).
    may_split = shrink_splits(m, dy.shape[1], r, dy.dtype) == 1 if (need_dx or need_dA) else True
    dx = pending_dB = pending_dA = None
    if need_dB:
        pending_dB = lora_reduce(dy, h.contiguous(), dB, scaling, 0.0, 0, may_split, defer_sum=True)
    if need_dx or need_dA:
        dh = torch.empty((m, r), dtype=dy.dtype, device=dy.device)
        lora_shrink(dy, lora_B, (lora_B.stride(0), lora_B.stride(1)), dh, 1.0, 0.0, 0)
        if need_dA:
            pending_dA = lora_reduce(x2d, dh, dA.t(), scaling / (1.0 - dropout_p), dropout_p, seed, may_split,
                                     defer_sum=True)
        sum_partials(pending_dB, pending_dA)
        if need_dx:
            dx = base_grad_plus_lora(dh)
    else:
        sum_partials(pending_dB)
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
