"""Prefix attention ``softmax(q [pk; k]ᵀ · scale) [pv; v]``: fastpeft against what a user runs otherwise.

Providers:
- ``sdpa``: ``F.scaled_dot_product_attention`` over the sequence alone, no
  prefix: the floor a prefix can only add to (the overhead baseline);
- ``fastpeft``: ``fastpeft.ops.prefix_attention`` (prefix read from its own buffer);
- ``concat_sdpa``: what HF PEFT's prefix tuning effectively runs: the prefix
  concatenated in front of K/V (the cache), a boolean mask that keeps every
  prefix key visible and the sequence causal, then SDPA;
- ``torch``: the same math unfused (explicit scores, mask, softmax);
- ``compile``: ``torch.compile`` of the unfused function.

A shape is a causal self-attention layer of ``tokens = B · S`` query tokens
with ``S = seq`` (training / prefill), or at ``tokens = 1`` one decode step
against a cache of ``seq`` keys. Heads ``Hq/Hkv`` keep Llama's 4:1 GQA ratio
(32/8 on GPU; 8/2 on the 2-core CPU, where 32 heads make the suite too slow).
In the backward modes q, k, v and the prefix need grad (the prefix is what
trains; q, k, v carry the gradient to earlier layers' prefixes).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..suite.spec import FORWARD, FORWARD_BACKWARD, Built, Case, OpBench, Provider, requires_grad_in
from .common import N_ROTATE, case_tensors, compiled, missing_import


def _shapes(device_type: str, level: str) -> list:
    def grid(tokens, prefixes, dims, seq, heads):
        return [dict(tokens=m, seq=seq, P=p, D=d, Hq=heads[0], Hkv=heads[1])
                for d in dims for p in prefixes for m in tokens]

    if device_type == "cuda":
        if level == "quick":
            return grid([1, 4096], [30], [128], 4096, (32, 8))
        return grid([1, 4096, 16384], [10, 30, 128], [64, 128], 4096, (32, 8))
    if level == "quick":
        return grid([1, 512], [30], [64], 512, (8, 2))
    return grid([1, 512, 2048], [10, 30, 128], [64, 128], 512, (8, 2))


def _layout(shape: dict) -> tuple[int, int, int]:
    """(B, Sq, Skv): training/prefill layers of ``seq`` tokens, or one decode step at ``tokens == 1``."""
    m, s = shape["tokens"], shape["seq"]
    if m == 1:
        return 1, 1, s
    return max(1, m // s), min(m, s), min(m, s)


def _make_case(shape: dict, device, dtype, mode: str) -> Case:
    b, sq, skv = _layout(shape)
    hq, hkv, p, d = shape["Hq"], shape["Hkv"], shape["P"], shape["D"]
    grad = requires_grad_in(mode)

    def rand(*dims):
        return torch.randn(*dims, device=device, dtype=dtype)

    # HF layout: projections [B, S, H, D] viewed as [B, H, S, D]
    xs = [rand(b, sq, hq, d).transpose(1, 2).requires_grad_(grad) for _ in range(N_ROTATE)]
    tensors = dict(k=rand(b, skv, hkv, d).transpose(1, 2).requires_grad_(grad),
                   v=rand(b, skv, hkv, d).transpose(1, 2).requires_grad_(grad),
                   prefix_k=rand(1, hkv, p, d).requires_grad_(grad), prefix_v=rand(1, hkv, p, d).requires_grad_(grad))
    dy = rand(b, hq, sq, d) if grad else None
    return Case(shape, device, dtype, mode, xs, dy, tensors)


def _causal(q, k) -> bool:
    """Causal self-attention; a decode step (one query) sees its whole cache."""
    return q.shape[2] > 1


def concat_mask(sq: int, p: int, skv: int, device):
    """Boolean ``[Sq, P + Skv]`` mask (True = attend): every prefix key, the sequence bottom-right causal."""
    seq = torch.ones(sq, skv, dtype=torch.bool, device=device).tril(skv - sq)
    return torch.cat([torch.ones(sq, p, dtype=torch.bool, device=device), seq], 1)


def concat_sdpa(q, k, v, prefix_k, prefix_v, causal: bool):
    b = q.shape[0]
    keys = torch.cat([prefix_k.expand(b, -1, -1, -1), k], 2)
    values = torch.cat([prefix_v.expand(b, -1, -1, -1), v], 2)
    mask = concat_mask(q.shape[2], prefix_k.shape[2], k.shape[2], q.device) if causal else None
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def unfused_prefix_attention(q, k, v, prefix_k, prefix_v, causal: bool):
    b, hq, sq, d = q.shape
    group = hq // k.shape[1]
    keys = torch.cat([prefix_k.expand(b, -1, -1, -1), k], 2).repeat_interleave(group, 1)
    values = torch.cat([prefix_v.expand(b, -1, -1, -1), v], 2).repeat_interleave(group, 1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * d ** -0.5
    if causal:
        scores = scores.masked_fill(~concat_mask(sq, prefix_k.shape[2], k.shape[2], q.device), -math.inf)
    return torch.matmul(torch.softmax(scores.float(), -1).to(q.dtype), values)


def _prefix_grads(case: Case) -> list:
    return list(case_tensors(case, "k", "v", "prefix_k", "prefix_v"))


def _sdpa(case: Case) -> Built:
    k, v = case_tensors(case, "k", "v")
    return Built(lambda q: F.scaled_dot_product_attention(q, k, v, is_causal=_causal(q, k), enable_gqa=True),
                 [k, v], note="no prefix")


def _fastpeft(case: Case) -> Built:
    from fastpeft.ops.prefix_attention import prefix_attention

    k, v, pk, pv = case_tensors(case, "k", "v", "prefix_k", "prefix_v")
    return Built(lambda q: prefix_attention(q, k, v, pk, pv, causal=_causal(q, k)), _prefix_grads(case))


def _concat_sdpa(case: Case) -> Built:
    k, v, pk, pv = case_tensors(case, "k", "v", "prefix_k", "prefix_v")
    return Built(lambda q: concat_sdpa(q, k, v, pk, pv, _causal(q, k)), _prefix_grads(case))


def _torch(case: Case) -> Built:
    k, v, pk, pv = case_tensors(case, "k", "v", "prefix_k", "prefix_v")
    return Built(lambda q: unfused_prefix_attention(q, k, v, pk, pv, _causal(q, k)), _prefix_grads(case))


def _compiled(case: Case) -> Built:
    k, v, pk, pv = case_tensors(case, "k", "v", "prefix_k", "prefix_v")
    fn = compiled(unfused_prefix_attention)
    return Built(lambda q: fn(q, k, v, pk, pv, _causal(q, k)), _prefix_grads(case), note="dynamic=True")


def _work(shape: dict, mode: str, provider: str, dtype) -> tuple:
    """Ideal (flops, bytes): the visible score entries (half the causal square, every prefix key) times
    ``4·D`` flops forward (QKᵀ and PV), ``10·D`` backward (five matmuls); q, k, v, prefix, out (and
    dout, dq, dk, dv, dprefix) read or written once."""
    b, sq, skv = _layout(shape)
    hq, hkv, d = shape["Hq"], shape["Hkv"], shape["D"]
    p = 0 if provider == "sdpa" else shape["P"]
    e = torch.empty((), dtype=dtype).element_size()
    seq_pairs = sq * skv - (sq * (sq - 1) // 2 if sq > 1 else 0)
    pairs = b * hq * (seq_pairs + sq * p)
    fwd_bytes = e * (2 * b * hq * sq * d + 2 * b * hkv * skv * d + 2 * hkv * p * d)
    fwd = (4 * d * pairs, fwd_bytes)
    bwd = (10 * d * pairs, 2 * fwd_bytes + e * b * hq * sq * d)
    if mode == FORWARD:
        return fwd
    if mode == FORWARD_BACKWARD:
        return fwd[0] + bwd[0], fwd[1] + bwd[1]
    return bwd


OP = OpBench(
    name="prefix_attention",
    title="Prefix attention",
    providers=[
        Provider("sdpa", _sdpa),
        Provider("fastpeft", _fastpeft, missing_import("fastpeft.ops.prefix_attention"), ours=True),
        Provider("concat_sdpa", _concat_sdpa),
        Provider("torch", _torch),
        Provider("compile", _compiled),
    ],
    shapes=_shapes,
    make_case=_make_case,
    work=_work,
    modes=(FORWARD, FORWARD_BACKWARD),
    baseline="sdpa",
    reference="torch",
    headline=("sdpa", "fastpeft", "concat_sdpa"),
)
