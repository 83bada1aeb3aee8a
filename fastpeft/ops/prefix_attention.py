"""Prefix attention: ``softmax(scale · q [pk; k]ᵀ) [pv; v]`` without building the concatenation.

Prefix tuning and P-tuning v2 prepend ``P`` trainable key/value vectors to
every attention layer. This op reads them from their own buffers: the Triton
kernels (``fastpeft.kernels.prefix_attention``) never allocate a tensor that
spans ``P + Skv`` keys, the CPU path (``fastpeft.cpu.prefix_attention``)
merges two partial attentions by their log-sum-exps.

Layers (``docs/architecture.md``): ``prefix_attention`` (validates) ->
``PrefixAttentionFunction`` (autograd; gradients for q, k, v, prefix_k,
prefix_v) -> the ``fastpeft::prefix_attention_forward`` /
``fastpeft::prefix_attention_backward`` custom ops (fake implementations, so
``torch.compile(fullgraph=True)`` traces them) -> the implementation
``fastpeft.ops._dispatch.implementation`` picks for the device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._backend import Backend, select_backend
from .._validation import FLOAT_DTYPES, check_probability, check_same_device, check_same_dtype, check_tensor
from ._autocast import any_autocast_enabled, autocast_inputs, autocast_off, outside_autocast
from ._autograd import forward_ad_active, gradients, needs, once_differentiable
from ._dispatch import custom_op_with_eager_path, implementation, not_computed

OP = "prefix_attention"
TRITON_MAX_HEAD_DIM = 128


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _in_layout_of(like: Tensor, t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` with the strides ``torch.empty_like(like)`` has (what the fake implementations promise)."""
    if t is None:
        return None
    target = torch.empty_like(like)
    if target.stride() == t.stride():
        return t
    return target.copy_(t)


# --------------------------------------------------------------------------- custom ops
def _forward_impl(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
                  key_padding_mask: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    impl = implementation(OP, q.device, q.dtype)
    out, lse = impl.prefix_attention_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
    return _in_layout_of(q, out), lse.contiguous()


_forward_op, _forward = custom_op_with_eager_path("fastpeft::prefix_attention_forward", _forward_impl)


@_forward_op.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


def _backward_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
                   prefix_v: Optional[Tensor], key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor,
                   causal: bool, scale: float, need_q: bool, need_kv: bool,
                   need_prefix: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = implementation(OP, q.device, q.dtype)
    dq, dk, dv, dpk, dpv = impl.prefix_attention_backward(dout, q, k, v, prefix_k, prefix_v, key_padding_mask,
                                                          out, lse, causal, scale, need_q, need_kv, need_prefix)
    if need_prefix and dpk is None:  # an empty prefix (P == 0)
        dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    grads = (_in_layout_of(q, dq), _in_layout_of(k, dk), _in_layout_of(v, dv),
             None if dpk is None else dpk.contiguous(), None if dpv is None else dpv.contiguous())
    return not_computed(grads, q)


_backward_op, _backward = custom_op_with_eager_path("fastpeft::prefix_attention_backward", _backward_impl)


@_backward_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, need_q, need_kv, need_prefix):
    def maybe(needed, like, same_layout=True):
        if not needed:
            return q.new_empty(0)
        return torch.empty_like(like) if same_layout else like.new_empty(like.shape)

    return (maybe(need_q, q), maybe(need_kv, k), maybe(need_kv, v),
            maybe(need_prefix, prefix_k, False), maybe(need_prefix, prefix_v, False))


# --------------------------------------------------------------------------- autograd
PREFIX_ATTENTION_INPUTS = ("q", "k", "v", "prefix_k", "prefix_v", "key_padding_mask", "causal", "scale")


class PrefixAttentionFunction(torch.autograd.Function):
    """Autograd for ``prefix_attention``; inputs are already validated. Returns ``(out, lse)``."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
        out, lse = _forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    @outside_autocast
    def backward(ctx, dout, _dlse):
        q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse = ctx.saved_tensors
        need = needs(ctx, PREFIX_ATTENTION_INPUTS)
        need_kv = need["k"] or need["v"]
        need_prefix = prefix_k is not None and (need["prefix_k"] or need["prefix_v"])
        if not (need["q"] or need_kv or need_prefix):
            return gradients(PREFIX_ATTENTION_INPUTS)
        dq, dk, dv, dpk, dpv = _backward(dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse,
                                         ctx.causal, ctx.scale, need["q"], need_kv, need_prefix)
        return gradients(PREFIX_ATTENTION_INPUTS,
                         q=dq if need["q"] else None, k=dk if need["k"] else None, v=dv if need["v"] else None,
                         prefix_k=dpk if need["prefix_k"] else None, prefix_v=dpv if need["prefix_v"] else None)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor] = None,
                     prefix_v: Optional[Tensor] = None, *, causal: bool = False,
                     key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                     dropout_p: float = 0.0, training: bool = False, return_lse: bool = False):
    """Attention over ``P`` prefix keys/values and the sequence's own, as if concatenated.

    Shapes: ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Skv, D]``, ``prefix_k,
    prefix_v [Bp, Hkv, P, D]`` with ``Bp`` in {1, B} (one prefix shared by the
    batch, or one per sample) and ``Hq % Hkv == 0`` (MHA, GQA, MQA). Any
    strides (e.g. HF's ``[B, S, H, D]`` projections transposed), no copies on
    the Triton path. ``prefix_k/prefix_v`` both None (or ``P == 0``) is plain
    attention. One floating dtype for all (fp32, fp16, bf16; fp64 on the CPU
    path); ``D <= 128`` on the Triton path.

    - softmax over the prefix keys and the sequence keys, ``scale`` default
      ``D ** -0.5``;
    - ``causal``: query ``i`` sees sequence keys ``j <= i + (Skv - Sq)``
      (bottom-right aligned: a decode step against a cache is correct) and
      **every** prefix key;
    - ``key_padding_mask [B, Skv]`` bool, True = attend (HF's 1 = keep);
      prefix keys are never masked;
    - a query row that sees no key at all (possible only without a prefix)
      gets output 0, LSE ``-inf`` and no gradient.

    Returns ``out [B, Hq, Sq, D]`` in q's dtype, and with ``return_lse`` also
    the natural-log LSE ``[B, Hq, Sq]`` in fp32 (fp64 for fp64 inputs; not
    differentiable). Gradients flow to q, k, v, prefix_k and prefix_v (a
    shared prefix's gradient is summed over the batch, deterministically).

    Attention dropout is not implemented: ``dropout_p > 0`` with
    ``training=True`` raises ValueError (with ``training=False`` it is ignored,
    as in ``torch.nn.functional.dropout``).

    Under ``torch.autocast`` q, k, v and the prefix run in the autocast dtype
    (not fp64), as torch's ``scaled_dot_product_attention`` does; gradients
    flow back to each in its own dtype (``fastpeft.ops._autocast``). First
    derivatives only: a double backward raises.
    """
    autocast = any_autocast_enabled()
    if autocast:
        q, k, v, prefix_k, prefix_v = autocast_inputs(q, k, v, prefix_k, prefix_v)
    dropout_p = check_probability("dropout_p", dropout_p)
    if training and dropout_p > 0.0:
        raise ValueError(f"prefix_attention does not implement attention dropout (dropout_p={dropout_p} with "
                         "training=True); pass dropout_p=0.0 or training=False")
    _validate(q, k, v, prefix_k, prefix_v, key_padding_mask)
    scale = _check_scale(scale, q.shape[-1])
    if not autocast:
        out, lse = _run(q, k, v, prefix_k, prefix_v, key_padding_mask, bool(causal), scale)
    else:
        with autocast_off(q.device.type):
            out, lse = _run(q, k, v, prefix_k, prefix_v, key_padding_mask, bool(causal), scale)
    return (out, lse) if return_lse else out


def _run(q, k, v, prefix_k, prefix_v, key_padding_mask, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """``PrefixAttentionFunction.apply``, or its forward alone when no gradient can be asked for.

    A decode step under ``no_grad`` would build the Function's node, ``ctx``
    and saved tensors only to drop them: the forward runs directly, with the
    same result (as in the LoRA ops). Inside a forward-AD level the Function
    runs, so dual inputs raise rather than lose their tangents.
    """
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, prefix_k, prefix_v))) \
            or forward_ad_active():
        return PrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
    return _forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)


def _check_scale(scale, d: int) -> float:
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _validate(q, k, v, prefix_k, prefix_v, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES)
    check_same_device("q", q, k=k, v=v)
    check_same_dtype("q", q, k=k, v=v)
    b, hq, sq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape [B, Hkv, Skv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    bk, hkv, skv, dk = k.shape
    if bk != b:
        raise ValueError(f"k: batch size is {bk}, q's is {b}")
    if dk != d:
        raise ValueError(f"k: head_dim is {dk}, q's is {d}")
    if d == 0:
        raise ValueError("q: head_dim must be positive")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q has {hq} heads and k/v {hkv}: the query heads must be a multiple of the KV heads "
                         "(Hq % Hkv == 0)")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together (or both None)")
    if prefix_k is not None:
        check_tensor("prefix_k", prefix_k, ndim=4)
        check_tensor("prefix_v", prefix_v, ndim=4)
        check_same_device("q", q, prefix_k=prefix_k, prefix_v=prefix_v)
        check_same_dtype("q", q, prefix_k=prefix_k, prefix_v=prefix_v)
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(f"prefix_k and prefix_v must have one shape [Bp, Hkv, P, D], got "
                             f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
        bp, hp, _, dp = prefix_k.shape
        if bp not in (1, b):
            raise ValueError(f"prefix_k: batch size is {bp}; it must be 1 (shared) or q's batch size {b}")
        if hp != hkv:
            raise ValueError(f"prefix_k: {hp} heads, k/v have {hkv} (the prefix has the KV heads)")
        if dp != d:
            raise ValueError(f"prefix_k: head_dim is {dp}, q's is {d}")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        check_same_device("q", q, key_padding_mask=key_padding_mask)
        if tuple(key_padding_mask.shape) != (b, skv):
            raise ValueError(f"key_padding_mask must have shape [B, Skv] = {(b, skv)}, got "
                             f"{tuple(key_padding_mask.shape)}")
    if select_backend(q.device) is Backend.TRITON and d > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim {d} > {TRITON_MAX_HEAD_DIM}, the largest the Triton kernels take")
