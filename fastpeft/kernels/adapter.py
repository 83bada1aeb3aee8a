"""Triton bottleneck-adapter kernels: plain launchers (no autograd).

``fastpeft.ops.adapter`` validates inputs and calls ``adapter_forward`` /
``adapter_backward`` / ``dropout_mask``; ``fastpeft.cpu.adapter``
implements the same contract with torch ops. The kernels are described in
``_adapter_kernels``.

Forward: one launch for many rows. Each program keeps its rows' bottleneck
``z = act(x W_dᵀ + b_d)`` on chip and writes ``y`` tile by tile; ``pre`` is
stored (fp32 ``[M, b]``) only when backward will need it. For few rows (at
most a quarter of ``TARGET_PROGRAMS`` row blocks, e.g. one token at batch 1)
one program per row block would read all of ``W_d`` alone, so the
down-projection first runs split over K ranges (``_adapter_down_kernel``, at
least ``SPLIT_K_MIN`` columns each, fp32 partials) and the forward kernel sums
the partials in a fixed order; the output columns are then split over extra
programs (``_column_groups``).
Backward (each launch only when its outputs are needed):
  1. rows kernel: ``da`` (fp32 ``[M, b]``), ``dx = da W_d``, and per-row-block
     fp32 partials of ``db_u`` and ``dscale``, reading ``dy`` once for all;
  2. reduce kernel for ``dW_u = (s∘g)ᵀ act(pre)`` and for ``dW_d = daᵀ x``:
     fp32 partials per row range, summed by torch in a fixed order.
  ``db_d = Σ da`` and the partial sums are torch reductions: deterministic,
  no atomics anywhere.

Limits: the bottleneck size ``b`` must be at most ``MAX_BOTTLENECK`` (256) on
this path (it is held in registers); larger ``b`` raises a ValueError that
names the CPU path (``FASTPEFT_BACKEND=cpu``) as the alternative.

Numerics: fp32 accumulation; fp32 operands follow ``_common.dot_precision``
(exact "ieee" unless the user allowed TF32 for torch matmuls); fp16/bf16
operands multiply on tensor cores. ``z``, ``s·g`` and ``da`` are rounded to
the input dtype before their GEMMs, as torch does.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ..activations import activation_id
from . import _common
from ._adapter_kernels import (_adapter_backward_rows_kernel, _adapter_down_kernel, _adapter_forward_kernel,
                               _adapter_keep_kernel, _adapter_reduce_kernel)
from ._common import (LaunchConfig, cdiv, dot_precision, dropout_args, interpreter_upcast, launcher, on_device_of,
                      split_seed)

check_kernel_dtype = _common.check_kernel_dtype

MAX_BOTTLENECK = 256
TARGET_PROGRAMS = _common.TARGET_SMS  # about one wave on an H100; more column groups below this many row blocks
_MIN_SPLIT_ROWS = 512  # a reduce split keeps at least this many rows
SPLIT_K_MIN = 256  # columns of x per program of the split-K down-projection
MAX_DOWN_SPLITS = 16
MASK_BLOCK = (32, 64)


def bottleneck_block(b: int) -> int:
    """``BLOCK_B``: b padded to a power of two (at least 16, the smallest dot size)."""
    if b > MAX_BOTTLENECK:
        raise ValueError(f"down_weight: the Triton adapter kernels take bottleneck sizes up to {MAX_BOTTLENECK}, "
                         f"got {b}; use the CPU path (FASTPEFT_BACKEND=cpu) or a larger reduction factor")
    return max(16, triton.next_power_of_2(b))


# Launch configs by (BLOCK_B, fp32 operands): (forward, backward rows, reduce); ``block_n`` of the reduce config
# is its BLOCK_R, ``block_k`` its row step. fp32 "ieee" dots run on FMA units and hold whole tiles in
# registers, so their tiles are smaller. Chosen for 0 spills in the kernel report at every activation.
def _config_table(block_b: int, fp32: bool) -> tuple[LaunchConfig, LaunchConfig, LaunchConfig]:
    name = f"b{block_b}" + ("-fp32" if fp32 else "")
    warps = 4 if block_b <= 64 else 8
    if fp32:
        forward = LaunchConfig(name, 32, 64, 32, warps, 2)
        # 16-wide column steps at every b: 32 spilled 12 B on sm_80 at b = 64 once relu's backward selects
        rows = LaunchConfig(name, 16, 16, 0, warps, 1 if block_b <= 64 else 2)
    else:
        # b = 256: 32-wide output tiles (64-wide ones spill 8 B on sm_80 in the few-rows path with biases)
        forward = LaunchConfig(name, 32 if block_b == 256 else 64, 32 if block_b == 256 else 64,
                               64 if block_b <= 64 else 32, warps, 3 if block_b <= 64 else 2)
        rows = LaunchConfig(name, 32 if block_b == 256 else 64, 32, 0, 8, 2)
    reduce = LaunchConfig(name, 64, min(block_b, 128), 32, warps, 1 if fp32 else 2)
    return forward, rows, reduce


def configs(b: int, dtype: torch.dtype) -> tuple[LaunchConfig, LaunchConfig, LaunchConfig]:
    """(forward, backward rows, reduce) launch configs for bottleneck size ``b`` and operand dtype."""
    return _config_table(bottleneck_block(b), dtype == torch.float32 and dot_precision(dtype) == "ieee")


def _column_groups(row_blocks: int, col_tiles: int) -> int:
    return max(1, min(col_tiles, TARGET_PROGRAMS // max(row_blocks, 1)))


def _down_splits(row_blocks: int, h: int) -> int:
    """K ranges of the down-projection: 1 (fused in the forward kernel) unless the rows alone leave the GPU idle."""
    if row_blocks * 4 > TARGET_PROGRAMS:
        return 1
    return max(1, min(MAX_DOWN_SPLITS, cdiv(h, SPLIT_K_MIN), TARGET_PROGRAMS // max(row_blocks, 1)))


def _scale_args(scaling: float, scale: Optional[Tensor], fallback: Tensor) -> dict:
    """Kernel arguments for the scale: the float (mode 0), a 0-dim tensor (1) or a per-channel one (2)."""
    if scale is None:
        return dict(scale_ptr=fallback, scale=float(scaling), SCALE=0)
    return dict(scale_ptr=scale.contiguous(), scale=1.0, SCALE=1 if scale.dim() == 0 else 2)


def _dense(vector: Optional[Tensor]) -> Optional[Tensor]:
    """A bias with stride 1 (a view with another stride is copied: ``[b]`` or ``[H]`` elements)."""
    return vector if vector is None else vector.contiguous()


def _dot_args(dtype: torch.dtype) -> dict:
    return dict(DOT_PRECISION=dot_precision(dtype), UPCAST=interpreter_upcast(dtype))


@launcher
def adapter_forward(x2d: Tensor, down_weight: Tensor, up_weight: Tensor, down_bias: Optional[Tensor],
                    up_bias: Optional[Tensor], residual2d: Optional[Tensor], scaling: float, scale: Optional[Tensor],
                    act: str, dropout_p: float, seed: int, store_pre: bool):
    """Returns ``(y [M, H] contiguous in x's dtype, pre [M, b] fp32 or None unless store_pre)``.

    ``x2d``, ``residual2d`` and the weights may have any strides; ``scale``
    (``[]`` or ``[H]``, x's dtype) replaces the float ``scaling`` when given.
    The kernels read the vectors (biases, scale) with stride 1: they are made contiguous here.
    """
    down_bias, up_bias = _dense(down_bias), _dense(up_bias)
    m, h = x2d.shape
    b = down_weight.shape[0]
    config = configs(b, x2d.dtype)[0]
    y = torch.empty((m, h), dtype=x2d.dtype, device=x2d.device)
    pre = torch.empty((m, b), dtype=torch.float32, device=x2d.device) if store_pre else None
    if m == 0 or h == 0:
        return y, pre
    row_blocks = cdiv(m, config.block_m)
    splits = _down_splits(row_blocks, h)
    parts = None
    if splits > 1:
        k_per_split = cdiv(cdiv(h, splits), config.block_k) * config.block_k
        splits = cdiv(h, k_per_split)
        parts = torch.empty((splits, m, b), dtype=torch.float32, device=x2d.device)
        _adapter_down_kernel[(row_blocks, splits)](
            x2d, down_weight, parts, m, h, b, k_per_split,
            x2d.stride(0), x2d.stride(1), down_weight.stride(0), down_weight.stride(1),
            BLOCK_M=config.block_m, BLOCK_K=config.block_k, BLOCK_B=bottleneck_block(b),
            **_dot_args(x2d.dtype), **config.launch_options(),
        )
    groups = _column_groups(row_blocks, cdiv(h, config.block_n))
    residual = residual2d if residual2d is not None else y
    scale_args = _scale_args(scaling, scale, y)
    _adapter_forward_kernel[(row_blocks, groups)](
        x2d, down_weight, down_bias if down_bias is not None else y, up_weight,
        up_bias if up_bias is not None else y, residual, scale_args["scale_ptr"], y, pre if pre is not None else y,
        parts if parts is not None else y,
        m, h, b, groups * config.block_n, splits,
        x2d.stride(0), x2d.stride(1), down_weight.stride(0), down_weight.stride(1),
        up_weight.stride(0), up_weight.stride(1), residual.stride(0), residual.stride(1),
        scale_args["scale"], **dropout_args(dropout_p, seed), ACT=activation_id(act),
        HAS_DOWN_BIAS=down_bias is not None, HAS_UP_BIAS=up_bias is not None, HAS_RESIDUAL=residual2d is not None,
        SCALE=scale_args["SCALE"], STORE_PRE=pre is not None, FROM_PARTS=parts is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_B=bottleneck_block(b),
        **_dot_args(x2d.dtype), **config.launch_options(),
    )
    return y, pre


def _reduce_splits(m: int, programs: int) -> int:
    """Row ranges of the M-reduction: enough programs to fill a large GPU, each range >= _MIN_SPLIT_ROWS rows."""
    return max(1, min(TARGET_PROGRAMS // max(programs, 1), m // _MIN_SPLIT_ROWS))


def _reduce(src: Tensor, h: Tensor, activate: bool, act: str, dropout_p: float, seed: int) -> Tensor:
    """fp32 ``[P, R] = Σ_m drop(src)[m, P] h'[m, R]`` (``h' = act(h)`` when ``activate``), no scalar factors."""
    m, p_len = src.shape
    r = h.shape[1]
    config = configs(r, src.dtype)[2]
    block_r = min(config.block_n, bottleneck_block(r))
    grid_pr = (cdiv(p_len, config.block_m), cdiv(r, block_r))
    splits = _reduce_splits(m, grid_pr[0] * grid_pr[1])
    rows_per_split = cdiv(cdiv(m, splits), config.block_k) * config.block_k
    splits = cdiv(m, rows_per_split)
    partial = torch.empty((splits, p_len, r), dtype=torch.float32, device=src.device)
    drop = dropout_args(dropout_p, seed)
    _adapter_reduce_kernel[grid_pr + (splits,)](
        src, h, partial, m, p_len, r, rows_per_split,
        src.stride(0), src.stride(1), partial.stride(0), partial.stride(1), partial.stride(2),
        drop["p"], drop["seed_lo"], drop["seed_hi"], ACT=activation_id(act) if activate else 0, ACTIVATE_H=activate,
        DROPOUT=drop["DROPOUT"], BLOCK_P=config.block_m, BLOCK_M=config.block_k, BLOCK_R=block_r,
        **_dot_args(src.dtype), **config.launch_options(),
    )
    return partial[0] if splits == 1 else partial.sum(0)


@launcher
def adapter_backward(dy: Tensor, x2d: Tensor, down_weight: Tensor, up_weight: Tensor, up_bias: Optional[Tensor],
                     pre: Tensor, scaling: float, scale: Optional[Tensor], act: str, dropout_p: float, seed: int,
                     need_dx: bool, need_down_weight: bool, need_up_weight: bool, need_down_bias: bool,
                     need_up_bias: bool, need_scale: bool):
    """Returns ``(dx, d_down_weight, d_up_weight, d_down_bias, d_up_bias, d_scale)``; ``None`` where not asked.

    ``pre`` is the fp32 ``[M, b]`` tensor ``adapter_forward`` stored; ``dy``
    and ``x2d`` may have any strides. Gradients have the dtype (and shape) of
    their inputs; ``d_scale`` only when ``scale`` is given.
    """
    up_bias = _dense(up_bias)
    m, h = x2d.shape
    b = down_weight.shape[0]
    _, rows_config, _ = configs(b, dy.dtype)
    pre = pre.contiguous()
    need_da = need_dx or need_down_weight or need_down_bias
    need_scale = need_scale and scale is not None
    dx = d_down_weight = d_up_weight = d_down_bias = d_up_bias = d_scale = None
    dtype, device = dy.dtype, dy.device
    if m == 0:  # nothing to reduce over: zero weight gradients
        return (torch.empty_like(x2d) if need_dx else None,
                torch.zeros_like(down_weight) if need_down_weight else None,
                torch.zeros_like(up_weight) if need_up_weight else None,
                torch.zeros(b, dtype=dtype, device=device) if need_down_bias else None,
                torch.zeros(h, dtype=dtype, device=device) if need_up_bias else None,
                torch.zeros_like(scale) if need_scale else None)
    scale_args = _scale_args(scaling, scale, dy)
    if need_da or need_up_bias or need_scale:
        row_blocks = cdiv(m, rows_config.block_m)
        da = torch.empty((m, b), dtype=torch.float32, device=device) if need_da else None
        dx = torch.empty((m, h), dtype=dtype, device=device) if need_dx else None
        dbu_part = torch.empty((row_blocks, h), dtype=torch.float32, device=device) if need_up_bias else None
        dscale_part = torch.empty((row_blocks, h), dtype=torch.float32, device=device) if need_scale else None
        _adapter_backward_rows_kernel[(row_blocks,)](
            dy, pre, up_weight, up_bias if up_bias is not None else dy, down_weight, scale_args["scale_ptr"],
            da if da is not None else pre, dx if dx is not None else dy,
            dscale_part if dscale_part is not None else pre, dbu_part if dbu_part is not None else pre,
            m, h, b, dy.stride(0), dy.stride(1), up_weight.stride(0), up_weight.stride(1),
            down_weight.stride(0), down_weight.stride(1),
            scale_args["scale"], **dropout_args(dropout_p, seed), ACT=activation_id(act),
            HAS_UP_BIAS=up_bias is not None, SCALE=scale_args["SCALE"], NEED_DA=need_da, NEED_DX=need_dx,
            NEED_DSCALE=need_scale, NEED_DBU=need_up_bias,
            BLOCK_M=rows_config.block_m, BLOCK_N=rows_config.block_n, BLOCK_B=bottleneck_block(b),
            **_dot_args(dtype), **rows_config.launch_options(),
        )
        if need_up_bias:
            d_up_bias = dbu_part.sum(0).to(dtype)
        if need_scale:
            per_channel = dscale_part.sum(0)
            d_scale = (per_channel if scale.dim() == 1 else per_channel.sum()).to(scale.dtype)
        if need_down_bias:
            d_down_bias = da.sum(0).to(down_weight.dtype)
        if need_down_weight:
            d_down_weight = _reduce(x2d, da, False, act, 0.0, 0).t().to(down_weight.dtype)
    if need_up_weight:
        g_z = _reduce(dy, pre, True, act, dropout_p, seed)  # Σ keep ∘ dy ⊗ act(pre), without s/(1-p)
        factor = (scale.float()[:, None] if scale is not None and scale.dim() == 1
                  else scale.float() if scale is not None else scaling)
        d_up_weight = g_z.mul_(factor).mul_(1.0 / (1.0 - dropout_p)).to(up_weight.dtype)
    return dx, d_down_weight, d_up_weight, d_down_bias, d_up_bias, d_scale


def dropout_mask(shape, dropout_p: float, seed: int, device) -> Tensor:
    """Bool keep-mask ``[M, H]`` (True = kept) exactly as the kernels apply it to the adapter output."""
    m, h = (int(s) for s in shape)
    out = torch.empty((m, h), dtype=torch.int8, device=device)
    if m == 0 or h == 0:
        return out.bool()
    seed_lo, seed_hi = split_seed(seed)
    block_m, block_n = MASK_BLOCK
    with on_device_of(out):
        _adapter_keep_kernel[(cdiv(m, block_m), cdiv(h, block_n))](out, m, h, float(dropout_p), seed_lo, seed_hi,
                                                                   BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
                                                                   num_stages=1)
    return out.bool()
