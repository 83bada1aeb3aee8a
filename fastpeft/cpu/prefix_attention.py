"""CPU path of prefix attention: the same functions as ``fastpeft.kernels.prefix_attention``.

fp32 and fp64 run the C++ kernel ``csrc/cpu/prefix_attention.cpp`` (native
extension, ``fastpeft._native``), in one of two modes:

- **direct** (at most ``DIRECT_MAX_QUERY_ROWS`` query positions: decode and
  short blocks): one pass per query row over ``[prefix; sequence]`` (scores,
  softmax, ``P·V``) and one backward pass that recomputes the probabilities
  from the saved LSE. At one token the cost of torch's flash kernel plus a
  separate prefix partial and merge is per-call overhead, several times the
  arithmetic; the kernel reads K/V in place and never builds ``[pk; k]``.
- **merged** (longer blocks): torch's fused CPU flash kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the LSE
  and has a matching backward) for the sequence with the causal rule and the
  padding mask, then one C++ pass over the prefix that merges into the flash
  output in place (the online-softmax update started from the flash partial's
  output and LSE). The prefix is packed transposed once per call (``[D, P]``,
  tiny) so that scores need no horizontal sums, and the four query heads of a
  GQA group at one position share every prefix load. Backward: the C++ pass
  returns the prefix keys' share of ``dq`` and the prefix gradients, computed
  with the *merged* output and LSE (with the global LSE each partial's
  probabilities are the true ones and ``Δ = rowsum(dO ∘ O)`` is the global one:
  FlashAttention-2's split-KV rule), and the flash backward the sequence's.

GQA without copies (the kernel maps query head ``h`` to KV head
``h // (Hq / Hkv)``, the flash kernel takes fewer KV heads natively); any
strides with head_dim the fastest axis (HF's ``[B, S, H, D]`` projections seen
as ``[B, H, S, D]``), other layouts are copied first (aten's flash kernel reads
garbage otherwise). A shared prefix's gradient is summed over the batch from
per-sample partials, deterministically.

fp16/bf16, and fp32/fp64 where the native extension cannot be built (no
compiler), run the torch-ops form of the merged mode: the prefix partial in two
explicit matmuls (fp32 for half inputs) merged by ``lse = logaddexp(lse_a,
lse_b)``, ``out = Σ exp(lse_i − lse) · out_i``.

Measured against PEFT's way (SDPA over ``cat([pk; k])`` with an explicit
mask) in the benchmark suite: ``python -m benchmarks --op prefix_attention``.

Rows that see no key (only possible without a prefix) get output 0 and LSE
``-inf`` and no gradient, as on the Triton path.

NaN and inf propagate as in torch's softmax over the explicit concatenation
(``_math_forward``): a row whose largest score is NaN or +inf is NaN (its LSE
NaN or +inf, as ``torch.logsumexp`` gives it), keys a row does not see never
reach it. The C++ kernel gives such rows itself; torch's flash kernel lets a
hidden NaN key reach rows that do not see it, and a backward from non-finite
outputs differs in where ``0 · inf`` lands, so a call whose output or LSE is
not finite (one check over the output, never over the scores) is recomputed
by ``_math_forward`` and differentiated through it. LSE is fp32 (fp64 for fp64
inputs). Tensors on other devices (``FASTPEFT_BACKEND=cpu`` with CUDA
tensors) run the same math in plain torch ops.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _native

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def check_kernel_dtype(what: str, dtype: torch.dtype) -> None:  # the CPU path takes every float dtype
    return None


def _scale(scale: Optional[float], d: int) -> float:
    return float(scale) if scale is not None else d ** -0.5


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- native kernel
DIRECT_MAX_QUERY_ROWS = 16  # at most this many query positions: one C++ pass over [prefix; sequence]
NATIVE_DTYPES = (torch.float32, torch.float64)
_native_ops: list = []  # [(forward, backward)] once resolved, [None] when the extension cannot be built


def _direct_ops(dtype: torch.dtype):
    """The C++ kernels (csrc/cpu/prefix_attention.cpp) for fp32/fp64, or None (half dtypes, no compiler)."""
    if dtype not in NATIVE_DTYPES:
        return None
    if not _native_ops:
        try:
            _native_ops.append((_native.op("prefix_attention_direct_forward"),
                                _native.op("prefix_attention_direct_backward")))
        except RuntimeError:
            _native_ops.append(None)
    return _native_ops[0]


def _rows(t: Tensor) -> Tensor:
    """``t`` with stride 1 in its last dimension (what the C++ kernel reads; HF's layouts already are)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _native_prefix(q: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor], hkv: int):
    if prefix_k is None:
        empty = q.new_empty((1, hkv, 0, q.shape[-1]))
        return empty, empty
    return _rows(prefix_k), _rows(prefix_v)


def _direct_mode(q: Tensor, k: Tensor) -> bool:
    return q.shape[2] <= DIRECT_MAX_QUERY_ROWS or k.shape[2] == 0


def _native_forward(ops, q, k, v, prefix_k, prefix_v, mask, causal, sm_scale):
    """Decode and short blocks: the whole attention in one C++ call. Longer: torch's flash kernel for the
    sequence, then one C++ pass over the prefix that merges into its output (the online-softmax update
    started from the flash partial's output and LSE)."""
    b, hq, sq, d = q.shape
    skv = k.shape[2]
    pk, pv = _native_prefix(q, prefix_k, prefix_v, k.shape[1])
    mask = None if mask is None else mask.contiguous()
    if _direct_mode(q, k):
        return ops[0](_rows(q), _rows(k), _rows(v), pk, pv, mask, causal, sm_scale, True, None, None)
    out_s, lse_s = _sequence_partial(q, k, v, mask, causal, sm_scale)
    if pk.shape[2] == 0:
        return out_s, lse_s.to(q.dtype)
    no_keys = q.new_empty((b, k.shape[1], 0, d))
    return ops[0](_rows(q), no_keys, no_keys, pk, pv, None, causal, sm_scale, False, _rows(out_s),
                  lse_s.to(q.dtype))


def _native_backward(ops, dout, q, k, v, prefix_k, prefix_v, mask, out, lse, causal, sm_scale, need_q, need_kv,
                     need_prefix):
    b, hq, sq, d = q.shape
    skv = k.shape[2]
    pk, pv = _native_prefix(q, prefix_k, prefix_v, k.shape[1])
    need_prefix = need_prefix and pk.shape[2] > 0
    mask = None if mask is None else mask.contiguous()
    dout, out, lse = _rows(dout), _rows(out), lse.to(q.dtype)
    dk = dv = None
    if _direct_mode(q, k):
        dq, dk, dv, dpk, dpv = ops[1](dout, _rows(q), _rows(k), _rows(v), pk, pv, mask, out, lse, causal, sm_scale,
                                      True, need_q, need_kv and skv > 0, need_prefix, None)
    else:
        dq = dpk = dpv = None
        if need_q or need_kv:
            plan = _SequencePlan(q, k, mask, causal)
            dq, dk, dv = _flash_backward(dout, _rows(q), _rows(k), _rows(v), out,
                                         lse.masked_fill(lse == -math.inf, 0.0), 0.0,
                                         plan.is_causal, attn_mask=plan.attn_mask, scale=sm_scale)
        if need_prefix or (need_q and pk.shape[2] > 0):  # the prefix keys' share, added to the flash dq in place
            no_keys = q.new_empty((b, k.shape[1], 0, d))
            dq, _, _, dpk, dpv = ops[1](dout, _rows(q), no_keys, no_keys, pk, pv, None, out, lse, causal, sm_scale,
                                        False, need_q, False, need_prefix, _rows(dq) if need_q else None)
    if need_kv and dk is None:
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    if need_prefix:
        dpk, dpv = _prefix_grad(dpk, prefix_k), _prefix_grad(dpv, prefix_v)
    return (dq if need_q else None, dk if need_kv else None, dv if need_kv else None,
            dpk if need_prefix else None, dpv if need_prefix else None)


# --------------------------------------------------------------------------- layout helpers
def _batch(prefix: Tensor, b: int) -> Tensor:
    return prefix.expand(b, -1, -1, -1)


def _first_visible_key(mask: Optional[Tensor], b: int, skv: int, device) -> Tensor:
    """``[B]`` index of the first unpadded key (``Skv`` when every key is padded)."""
    if mask is None:
        return torch.zeros(b, dtype=torch.long, device=device)
    idx = torch.arange(skv, device=device).expand(b, skv)
    return torch.where(mask, idx, skv).amin(1) if skv else torch.zeros(b, dtype=torch.long, device=device)


def _empty_rows(mask: Optional[Tensor], causal: bool, b: int, sq: int, skv: int, device) -> Optional[Tensor]:
    """``[B, 1, Sq]`` bool: query rows that see no sequence key (None when there are none)."""
    if mask is None and not (causal and sq > skv) and skv > 0:
        return None
    first = _first_visible_key(mask, b, skv, device)[:, None, None]
    rows = torch.arange(sq, device=device)[None, None, :]
    last_visible = rows + (skv - sq) if causal else torch.full_like(rows, skv - 1)
    return last_visible < first


class _SequencePlan:
    """How the sequence partial calls the flash kernel (which takes GQA heads natively): causal flag, mask."""

    def __init__(self, q: Tensor, k: Tensor, mask: Optional[Tensor], causal: bool):
        sq, skv = q.shape[2], k.shape[2]
        row_dependent = causal and sq > 1  # decode (Sq == 1) sees every key under the causal rule
        self.is_causal = row_dependent and sq == skv and mask is None
        self.attn_mask = None
        if row_dependent and not self.is_causal:
            visible = torch.ones(1, 1, sq, skv, dtype=torch.bool, device=q.device).tril(skv - sq)
            if mask is not None:
                visible = visible & mask[:, None, None, :]
            self.attn_mask = _additive(visible, q.dtype)
        elif mask is not None:
            self.attn_mask = _additive(mask[:, None, None, :], q.dtype)


def _additive(visible: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, -math.inf)


# --------------------------------------------------------------------------- forward
def prefix_attention_forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
                             prefix_v: Optional[Tensor], key_padding_mask: Optional[Tensor], causal: bool,
                             scale: Optional[float]) -> tuple[Tensor, Tensor]:
    """``(out [B, Hq, Sq, D], lse [B, Hq, Sq])``, see ``fastpeft.kernels.prefix_attention``."""
    if q.device.type != "cpu":
        return _math_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    sm_scale = _scale(scale, d)
    lse_dtype = _lse_dtype(q.dtype)
    if q.numel() == 0:
        return torch.empty_like(q), torch.full((b, hq, sq), -math.inf, dtype=lse_dtype, device=q.device)
    ops = _direct_ops(q.dtype)
    if ops is not None:
        out, lse = _native_forward(ops, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, sm_scale)
        if _direct_mode(q, k) or _finite(out, lse):  # the one-pass kernel gives NaN rows as torch does
            return out, lse
        return _math_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)

    partials = []
    if prefix_k is not None and prefix_k.shape[2] > 0:
        partials.append(_prefix_partial(q, prefix_k, prefix_v, sm_scale))
    if skv > 0:
        partials.append(_sequence_partial(q, k, v, key_padding_mask, causal, sm_scale))
    if not partials:
        return torch.zeros_like(q), torch.full((b, hq, sq), -math.inf, dtype=lse_dtype, device=q.device)
    out, lse = _merge(partials, q.dtype)
    if not _finite(out, lse):
        return _math_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
    return out, lse.to(lse_dtype)


def _finite(out: Tensor, lse: Tensor) -> bool:
    """No NaN or inf in ``out`` and none in ``lse`` but the -inf of rows without keys.

    One reduction over ``out`` (a NaN or inf reaches its fp32 sum; an overflowing sum only sends a finite
    call down the exact path) and a comparison over the ``[B, Hq, Sq]`` LSE."""
    return bool(torch.isfinite(out.sum(dtype=torch.float32 if out.dtype != torch.float64 else None))) \
        and bool((lse < math.inf).all())


def _sequence_partial(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool,
                      sm_scale: float) -> tuple[Tensor, Tensor]:
    """Attention over the sequence keys alone: torch's flash kernel, LSE -inf for rows without a key.

    The aten kernel reads garbage when head_dim is not the fastest axis (SDPA's wrapper copies first): such
    inputs are copied here too."""
    b, sq, skv = q.shape[0], q.shape[2], k.shape[2]
    plan = _SequencePlan(q, k, mask, causal)
    out_s, lse_s = _flash(_rows(q), _rows(k), _rows(v), is_causal=plan.is_causal, attn_mask=plan.attn_mask,
                          scale=sm_scale)
    empty = _empty_rows(mask, causal, b, sq, skv, q.device)
    if empty is not None:  # the flash kernel reports LSE 0 for a row without keys
        lse_s = lse_s.masked_fill(empty, -math.inf)
    return out_s, lse_s


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _grouped(t: Tensor, hkv: int) -> Tensor:
    """``[B, Hq, S, X]`` -> ``[B, Hkv, G, S, X]``: a view (splitting the head axis never copies)."""
    b, hq = t.shape[:2]
    return t.view(b, hkv, hq // hkv, *t.shape[2:])


def _prefix_scores(q5: Tensor, prefix_k: Tensor, scale: float) -> Tensor:
    """``[B, Hkv, G, Sq, P]`` scores of the grouped queries against the prefix keys (fp32 for half inputs)."""
    work = _work_dtype(q5.dtype)
    return torch.matmul(q5.to(work), prefix_k.to(work)[:, :, None].transpose(-1, -2)) * scale


def _prefix_partial(q: Tensor, prefix_k: Tensor, prefix_v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Attention over the prefix alone, explicit: with tens of keys two matmuls beat the flash kernel (~2x).

    The query heads of a KV group broadcast against the prefix through a 5-D view, so HF's transposed
    ``q`` is never copied.
    """
    b, hq, sq, d = q.shape
    scores = _prefix_scores(_grouped(q, prefix_k.shape[1]), prefix_k, scale)
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, prefix_v.to(probs.dtype)[:, :, None])
    return out.reshape(b, hq, sq, d), lse.reshape(b, hq, sq)


def _prefix_partial_backward(dout: Tensor, q: Tensor, out: Tensor, lse: Tensor, prefix_k: Tensor,
                             prefix_v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq [B, Hq, Sq, D], per-sample dpk, dpv [B, Hkv, P, D]) of the prefix keys' share, from the merged
    output and LSE (so the probabilities and Δ are the global ones)."""
    hkv = prefix_k.shape[1]
    work = _work_dtype(q.dtype)
    q5, dout5 = _grouped(q, hkv).to(work), _grouped(dout, hkv).to(work)
    probs = torch.exp(_prefix_scores(q5, prefix_k, scale) - _grouped(lse, hkv).to(work).unsqueeze(-1))
    delta = (dout5 * _grouped(out, hkv).to(work)).sum(-1, keepdim=True)
    dp = torch.matmul(dout5, prefix_v.to(work)[:, :, None].transpose(-1, -2))
    ds = probs * (dp - delta)
    dq = torch.matmul(ds, prefix_k.to(work)[:, :, None]) * scale
    dpk = torch.matmul(ds.transpose(-1, -2), q5).sum(2) * scale
    dpv = torch.matmul(probs.transpose(-1, -2), dout5).sum(2)
    return dq.reshape(q.shape), dpk, dpv


def _merge(partials: list, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if len(partials) == 1:
        out, lse = partials[0]
        return out.to(dtype), lse
    (out_a, lse_a), (out_b, lse_b) = partials
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1)
    out = torch.addcmul(out_b.to(w_b.dtype) * w_b, out_a.to(w_a.dtype), w_a)
    return out.to(dtype), lse


# --------------------------------------------------------------------------- backward
def prefix_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
                              prefix_v: Optional[Tensor], key_padding_mask: Optional[Tensor], out: Tensor,
                              lse: Tensor, causal: bool, scale: Optional[float], need_q: bool, need_kv: bool,
                              need_prefix: bool) -> tuple:
    """``(dq, dk, dv, dprefix_k, dprefix_v)`` (None where not asked), see the Triton module."""
    if q.device.type != "cpu" or not _finite(out, lse):
        return _math_backward(dout, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale,
                              need_q, need_kv, need_prefix)
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    has_prefix = prefix_k is not None and prefix_k.shape[2] > 0
    need_prefix = need_prefix and has_prefix
    sm_scale = _scale(scale, d)
    ops = _direct_ops(q.dtype)
    if ops is not None and q.numel() > 0:
        return _native_backward(ops, dout, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal,
                                sm_scale, need_q, need_kv, need_prefix)
    dq = torch.zeros(q.shape, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype, device=q.device) \
        if need_q else None
    dk = dv = dpk = dpv = None
    # A row without keys has LSE -inf; LSE 0 gives it zero probabilities (every score is -inf) and no NaN.
    lse = lse.masked_fill(lse == -math.inf, 0.0)
    lse_flash = lse.float() if q.dtype != torch.float64 else lse
    dout, out = dout.contiguous(), out.contiguous()
    if has_prefix and (need_q or need_prefix) and sq > 0:
        gq, gk, gv = _prefix_partial_backward(dout, q, out, lse_flash, prefix_k, prefix_v, sm_scale)
        if need_q:
            dq += gq
        if need_prefix:
            dpk, dpv = _prefix_grad(gk, prefix_k), _prefix_grad(gv, prefix_v)
    if skv > 0 and (need_q or need_kv) and sq > 0:
        plan = _SequencePlan(q, k, key_padding_mask, causal)
        gq, gk, gv = _flash_backward(dout, _rows(q), _rows(k), _rows(v), out, lse_flash, 0.0, plan.is_causal,
                                     attn_mask=plan.attn_mask, scale=sm_scale)
        if need_q:
            dq += gq
        if need_kv:
            dk, dv = gk, gv
    if need_kv and dk is None:
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    if need_prefix and dpk is None:
        dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    return (dq.to(q.dtype) if need_q else None, dk, dv, dpk, dpv)


def _prefix_grad(grad: Tensor, prefix: Tensor) -> Tensor:
    if prefix.shape[0] == 1 and grad.shape[0] != 1:
        grad = grad.sum(0, keepdim=True, dtype=torch.float32 if grad.dtype != torch.float64 else None)
    return grad.to(prefix.dtype)


# --------------------------------------------------------------------------- other devices
def _math_forward(q, k, v, prefix_k, prefix_v, mask, causal, scale):
    """Plain torch ops on any device: ``torch.softmax`` over the concatenated keys in fp32 (fp64 for fp64),
    hidden keys masked out before and after it (so NaN and inf propagate exactly as torch's own attention
    over the explicit concatenation propagates them)."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys, values = k, v
    p = 0
    if prefix_k is not None and prefix_k.shape[2] > 0:
        p = prefix_k.shape[2]
        keys = torch.cat([_batch(prefix_k, b), k], 2)
        values = torch.cat([_batch(prefix_v, b), v], 2)
    g = hq // hkv
    keys = keys.to(work).repeat_interleave(g, 1)
    values = values.to(work).repeat_interleave(g, 1)
    scores = torch.matmul(q.to(work), keys.transpose(-1, -2)) * _scale(scale, d)
    visible = torch.ones(1, 1, sq, skv, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(skv - sq)
    if mask is not None:
        visible = visible & mask[:, None, None, :]
    visible = torch.cat([torch.ones(*visible.shape[:3], p, dtype=torch.bool, device=q.device), visible], -1)
    empty = ~visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~visible, -math.inf).masked_fill(empty, 0.0)
    lse = torch.logsumexp(scores, -1).masked_fill(empty[..., 0], -math.inf)
    probs = torch.softmax(scores, -1).masked_fill(~visible | empty, 0.0)
    return torch.matmul(probs, values).to(q.dtype), lse.to(_lse_dtype(q.dtype))


def _math_backward(dout, q, k, v, prefix_k, prefix_v, mask, causal, scale, need_q, need_kv, need_prefix):
    has_prefix = prefix_k is not None and prefix_k.shape[2] > 0
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (q, k, v, prefix_k, prefix_v)]
        out, _ = _math_forward(*leaves, mask, causal, scale)
        wanted = [need_q, need_kv, need_kv, need_prefix and has_prefix, need_prefix and has_prefix]
        inputs = [t for t, w in zip(leaves, wanted) if w]
        grads = iter(torch.autograd.grad(out, inputs, dout, allow_unused=True) if inputs else ())
    result = []
    for t, w in zip(leaves, wanted):
        g = next(grads) if w else None
        result.append(torch.zeros_like(t) if (w and g is None) else g)
    return tuple(result)
