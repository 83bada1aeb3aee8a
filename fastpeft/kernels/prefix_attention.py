"""Triton prefix attention: plain launchers (no autograd).

``fastpeft.ops.prefix_attention`` validates inputs and calls
``prefix_attention_forward`` / ``prefix_attention_backward``;
``fastpeft.cpu.prefix_attention`` implements the same contract with torch.

Math: ``softmax(scale · q [pk; k]ᵀ) [pv; v]`` with the prefix ``pk, pv``
read from its own buffer (the concatenation is never built: no tensor spans
``P + Skv`` keys). Every prefix key is visible to every query; sequence key
``j`` is visible to query ``i`` when ``key_padding_mask[b, j]`` (if given) and,
with ``causal``, when ``j <= i + Skv - Sq`` (bottom-right aligned).

Launches (kernels in ``_prefix_attention_kernels``):
  forward:  one kernel, output + natural-log LSE ``[B, Hq, Sq]`` fp32;
  backward: ``Δ = rowsum(O ∘ dO)``; one dK/dV launch over the sequence key
            blocks and the prefix key blocks (the ones whose gradients are
            asked for); one dQ launch. Prefix gradients come out of the kernel
            as fp32 per-batch partials; with a shared prefix (``Bp == 1``)
            torch sums them over the batch in a fixed order (deterministic,
            no atomics).

Precision (``_common.dot_precision``): fp16/bf16 multiply on tensor cores and
accumulate in fp32 (P and dS are rounded to the input dtype before their
dots, as FlashAttention does); fp32 follows torch's TF32 setting (exact
"ieee" by default).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _common
from ._common import LaunchConfig, cdiv, dot_precision, interpreter_upcast, launcher
from ._prefix_attention_kernels import (_prefix_attention_delta_kernel, _prefix_attention_dkdv_kernel,
                                        _prefix_attention_dq_kernel, _prefix_attention_fwd_kernel)

MAX_HEAD_DIM = 128


def check_kernel_dtype(what: str, dtype: torch.dtype) -> None:
    _common.check_kernel_dtype(what, dtype)


def head_block(d: int) -> int:
    """``BLOCK_D``: the head dim padded to a power of two (at least 16, the smallest dot)."""
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the Triton prefix-attention kernels take head_dim <= {MAX_HEAD_DIM}, got {d}")
    return max(16, 1 << (d - 1).bit_length())


# --------------------------------------------------------------------------- launch configs
# Picked with the kernel report (sm_80 and sm_90: 0 spills, tensor cores for fp16/bf16). fp32 "ieee"
# dots run on FMA units, whose operand layouts need many more registers: small tiles there.
_FWD = {
    (False, 64): LaunchConfig("fwd_d64", 128, 64, 0, num_warps=8, num_stages=3),
    (False, 128): LaunchConfig("fwd_d128", 64, 64, 0, num_warps=8, num_stages=3),
    (True, 64): LaunchConfig("fwd_fp32_d64", 32, 16, 0, num_warps=8, num_stages=1),
    (True, 128): LaunchConfig("fwd_fp32_d128", 16, 16, 0, num_warps=8, num_stages=1),
}
_FWD_DECODE = LaunchConfig("fwd_decode", 16, 32, 0, num_warps=4, num_stages=3)  # Sq <= 16, fp16/bf16
_DKDV = {
    (False, 64): LaunchConfig("dkdv_d64", 32, 64, 0, num_warps=8, num_stages=2),
    (False, 128): LaunchConfig("dkdv_d128", 32, 64, 0, num_warps=8, num_stages=2),
    (True, 64): LaunchConfig("dkdv_fp32_d64", 16, 16, 0, num_warps=4, num_stages=1),
    (True, 128): LaunchConfig("dkdv_fp32_d128", 32, 16, 0, num_warps=8, num_stages=1),
}
_DQ = {
    (False, 64): LaunchConfig("dq_d64", 64, 64, 0, num_warps=4, num_stages=2),
    (False, 128): LaunchConfig("dq_d128", 64, 32, 0, num_warps=4, num_stages=2),
    (True, 64): LaunchConfig("dq_fp32_d64", 32, 32, 0, num_warps=4, num_stages=1),
    (True, 128): LaunchConfig("dq_fp32_d128", 32, 16, 0, num_warps=8, num_stages=1),
}
_DELTA = LaunchConfig("delta", 64, 0, 0, num_warps=4, num_stages=1)


def _config_key(dtype: torch.dtype, block_d: int) -> tuple[bool, int]:
    return dtype == torch.float32, 64 if block_d <= 64 else 128


def forward_config(sq: int, dtype: torch.dtype, block_d: int) -> LaunchConfig:
    if sq <= 16 and dtype != torch.float32:
        return _FWD_DECODE
    return _FWD[_config_key(dtype, block_d)]


def backward_configs(dtype: torch.dtype, block_d: int) -> tuple[LaunchConfig, LaunchConfig]:
    """(dK/dV config, dQ config)."""
    key = _config_key(dtype, block_d)
    return _DKDV[key], _DQ[key]


# --------------------------------------------------------------------------- helpers
def _strides(t: Optional[Tensor], shared_batch: bool = False) -> tuple[int, int, int, int]:
    if t is None:
        return 0, 0, 0, 0
    s = t.stride()
    return (0 if shared_batch else s[0]), s[1], s[2], s[3]


def _mask_args(key_padding_mask: Optional[Tensor], like: Tensor):
    """(pointer tensor, stride_maskb, stride_maskn); bool masks are read as uint8 without a copy."""
    if key_padding_mask is None:
        return like, 0, 0
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
    return mask, mask.stride(0), mask.stride(1)


def _prefix_len(prefix_k: Optional[Tensor]) -> int:
    return 0 if prefix_k is None else prefix_k.shape[2]


def _scale(scale: Optional[float], d: int) -> float:
    return float(scale) if scale is not None else d ** -0.5


# --------------------------------------------------------------------------- forward
@launcher
def prefix_attention_forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
                             prefix_v: Optional[Tensor], key_padding_mask: Optional[Tensor], causal: bool,
                             scale: Optional[float], config: Optional[LaunchConfig] = None) -> tuple[Tensor, Tensor]:
    """``(out [B, Hq, Sq, D] in q's dtype and layout, lse [B, Hq, Sq] fp32, natural log)``.

    Inputs are validated by the op; any strides. ``prefix_k/prefix_v`` are
    ``[Bp, Hkv, P, D]`` with ``Bp`` in {1, B} and ``P >= 1``, or both None.
    ``config`` overrides the launch config (tests).
    """
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    p = _prefix_len(prefix_k)
    block_d = head_block(d)
    out = torch.empty_like(q)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    cfg = config or forward_config(sq, q.dtype, block_d)
    shared = p > 0 and prefix_k.shape[0] == 1
    mask, stride_maskb, stride_maskn = _mask_args(key_padding_mask, q)
    pk, pv = (prefix_k, prefix_v) if p else (k, v)
    grid = (cdiv(sq, cfg.block_m), b * hq)
    _prefix_attention_fwd_kernel[grid](
        q, k, v, pk, pv, mask, out, lse,
        hq, sq, skv, p, hq // hkv, d,
        *_strides(q), *_strides(k), *_strides(v),
        *_strides(prefix_k, shared), *_strides(prefix_v, shared),
        stride_maskb, stride_maskn, *_strides(out),
        _scale(scale, d) * math.log2(math.e),
        HAS_PREFIX=p > 0, IS_CAUSAL=bool(causal), HAS_MASK=key_padding_mask is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype), UPCAST=interpreter_upcast(q.dtype),
        **cfg.launch_options())
    return out, lse


# --------------------------------------------------------------------------- backward
@launcher
def prefix_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
                              prefix_v: Optional[Tensor], key_padding_mask: Optional[Tensor], out: Tensor,
                              lse: Tensor, causal: bool, scale: Optional[float], need_q: bool, need_kv: bool,
                              need_prefix: bool, configs: Optional[tuple] = None) -> tuple:
    """``(dq | None, dk | None, dv | None, dprefix_k | None, dprefix_v | None)``, each in its input's dtype.

    ``out``/``lse`` are what ``prefix_attention_forward`` returned. Gradients of
    a shared prefix (``Bp == 1``) are summed over the batch. ``need_kv`` asks
    for dk and dv, ``need_prefix`` for both prefix gradients.
    """
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    p = _prefix_len(prefix_k)
    need_prefix = need_prefix and p > 0
    block_d = head_block(d)
    dq = torch.empty_like(q) if need_q else None
    dk = torch.empty_like(k) if need_kv else None
    dv = torch.empty_like(v) if need_kv else None
    partial_shape = (b, hkv, p, d)
    dpk_partial = torch.empty(partial_shape, dtype=torch.float32, device=q.device) if need_prefix else None
    dpv_partial = torch.empty(partial_shape, dtype=torch.float32, device=q.device) if need_prefix else None
    dkdv_cfg, dq_cfg = configs or backward_configs(q.dtype, block_d)
    if sq == 0 or b * hq == 0:
        for t in (dk, dv, dpk_partial, dpv_partial):
            if t is not None:
                t.zero_()
    else:
        shared = p > 0 and prefix_k.shape[0] == 1
        mask, stride_maskb, stride_maskn = _mask_args(key_padding_mask, q)
        pk, pv = (prefix_k, prefix_v) if p else (k, v)
        sm_scale = _scale(scale, d)
        qk_scale = sm_scale * math.log2(math.e)
        precision = dict(DOT_PRECISION=dot_precision(q.dtype), UPCAST=interpreter_upcast(q.dtype))
        common = dict(IS_CAUSAL=bool(causal), HAS_MASK=key_padding_mask is not None, BLOCK_D=block_d, **precision)

        delta = row_delta(out, dout)

        num_seq_blocks = cdiv(skv, dkdv_cfg.block_n) if need_kv else 0
        num_prefix_blocks = cdiv(p, dkdv_cfg.block_n) if need_prefix else 0
        if num_seq_blocks + num_prefix_blocks:
            dk_arg = dk if need_kv else q
            dv_arg = dv if need_kv else q
            dpk_arg = dpk_partial if need_prefix else delta
            dpv_arg = dpv_partial if need_prefix else delta
            _prefix_attention_dkdv_kernel[(num_seq_blocks + num_prefix_blocks, b * hkv)](
                q, k, v, pk, pv, mask, dout, lse, delta, dk_arg, dv_arg, dpk_arg, dpv_arg,
                hq, hkv, sq, skv, p, hq // hkv, d, num_seq_blocks,
                *_strides(q), *_strides(k), *_strides(v),
                *_strides(prefix_k, shared), *_strides(prefix_v, shared),
                stride_maskb, stride_maskn, *_strides(dout),
                *_strides(dk_arg), *_strides(dv_arg),
                sm_scale, qk_scale,
                BLOCK_M=dkdv_cfg.block_m, BLOCK_N=dkdv_cfg.block_n, **common, **dkdv_cfg.launch_options())
        if need_q:
            _prefix_attention_dq_kernel[(cdiv(sq, dq_cfg.block_m), b * hq)](
                q, k, v, pk, pv, mask, dout, lse, delta, dq,
                hq, sq, skv, p, hq // hkv, d,
                *_strides(q), *_strides(k), *_strides(v),
                *_strides(prefix_k, shared), *_strides(prefix_v, shared),
                stride_maskb, stride_maskn, *_strides(dout), *_strides(dq),
                sm_scale, qk_scale, HAS_PREFIX=p > 0,
                BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n, **common, **dq_cfg.launch_options())

    dpk = dpv = None
    if need_prefix:
        dpk = _reduce_prefix_grad(dpk_partial, prefix_k)
        dpv = _reduce_prefix_grad(dpv_partial, prefix_v)
    return dq, dk, dv, dpk, dpv


@launcher
def row_delta(out: Tensor, dout: Tensor) -> Tensor:
    """``Δ = rowsum(out ∘ dout)`` as fp32 ``[B, Hq, Sq]``."""
    b, hq, sq, d = out.shape
    delta = torch.empty((b, hq, sq), dtype=torch.float32, device=out.device)
    _prefix_attention_delta_kernel[(cdiv(sq, _DELTA.block_m), b * hq)](
        out, dout, delta, hq, sq, d, *_strides(out), *_strides(dout),
        BLOCK_M=_DELTA.block_m, BLOCK_D=head_block(d), **_DELTA.launch_options())
    return delta


def _reduce_prefix_grad(partial: Tensor, prefix: Tensor) -> Tensor:
    """Per-batch fp32 partials -> the prefix's gradient (summed over the batch when it is shared)."""
    if prefix.shape[0] == 1 and partial.shape[0] != 1:
        partial = partial.sum(0, keepdim=True)
    return partial.to(prefix.dtype)
