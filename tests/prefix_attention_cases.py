"""Shared by the prefix-attention tests: inputs, the explicit-concatenation reference, a torch peer.

``attention_math`` is the softmax over the *explicit* concatenation ``[pk; k]``
(GQA by repeating K/V heads), written independently of the code under test;
in float64 it is the reference, in the input dtype it is "what plain torch
achieves" for the error budget of tests/numerics.py. A row that sees no key
(possible only without a prefix) is defined as output 0, LSE -inf, no
gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch


@dataclass(frozen=True)
class Case:
    b: int = 2
    hq: int = 6
    hkv: int = 2
    sq: int = 19
    skv: int = 23
    p: int = 5
    d: int = 40
    bp: int = 1
    causal: bool = False
    padding: Optional[str] = None  # None, "left", "right", "all" (one sample fully padded)
    layout: str = "hf"  # "hf": [B, S, H, D] transposed to [B, H, S, D]; "contiguous"

    def but(self, **kw) -> "Case":
        return replace(self, **kw)

    def __str__(self):
        return (f"B{self.b}_H{self.hq}/{self.hkv}_Sq{self.sq}_Skv{self.skv}_P{self.p}_D{self.d}_Bp{self.bp}"
                f"{'_causal' if self.causal else ''}{'_' + self.padding if self.padding else ''}_{self.layout}")


def make_inputs(case: Case, dtype: torch.dtype, device="cpu") -> dict:
    """Fresh random inputs in float64 then cast (so every dtype sees the same values)."""

    def rand(bsz, heads, seq):
        if case.layout == "hf":
            t = torch.randn(bsz, seq, heads, case.d, dtype=torch.float64).transpose(1, 2)
        else:
            t = torch.randn(bsz, heads, seq, case.d, dtype=torch.float64)
        return t.to(device=device, dtype=dtype)

    inputs = dict(q=rand(case.b, case.hq, case.sq), k=rand(case.b, case.hkv, case.skv),
                  v=rand(case.b, case.hkv, case.skv), prefix_k=None, prefix_v=None, key_padding_mask=None)
    if case.p is not None:
        inputs["prefix_k"] = rand(case.bp, case.hkv, case.p)
        inputs["prefix_v"] = rand(case.bp, case.hkv, case.p)
    if case.padding is not None:
        mask = torch.ones(case.b, case.skv, dtype=torch.bool, device=device)
        if case.padding == "left":
            for i in range(case.b):
                mask[i, : 3 + 2 * i] = False
        elif case.padding == "right":
            for i in range(case.b):
                mask[i, case.skv - (4 + 3 * i):] = False
        elif case.padding == "all":
            mask[0] = False
            mask[-1, 1::2] = False
        inputs["key_padding_mask"] = mask
    inputs["dout"] = rand(case.b, case.hq, case.sq)
    return inputs


def attention_math(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale=None, dtype=torch.float64):
    """``(out, lse)`` of the softmax over the explicit concatenation, computed in ``dtype`` (autograd-able)."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    p = 0 if prefix_k is None else prefix_k.shape[2]
    if p:
        k = torch.cat([prefix_k.to(dtype).expand(b, -1, -1, -1), k], 2)
        v = torch.cat([prefix_v.to(dtype).expand(b, -1, -1, -1), v], 2)
    k = k.repeat_interleave(hq // hkv, 1)
    v = v.repeat_interleave(hq // hkv, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    visible = torch.ones(b, 1, sq, p + skv, dtype=torch.bool)
    i = torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    if causal:
        visible[..., p:] &= j <= i + (skv - sq)
    if key_padding_mask is not None:
        visible[..., p:] &= key_padding_mask.cpu()[:, None, None, :]
    empty = ~visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~visible, -math.inf).masked_fill(empty, 0.0)
    probs = torch.softmax(scores.float() if dtype in (torch.float16, torch.bfloat16) else scores, -1)
    probs = probs.masked_fill(~visible | empty, 0.0).to(dtype)
    lse = torch.logsumexp(scores.detach().double(), -1).masked_fill(empty[..., 0], -math.inf)
    return probs @ v, lse


def reference(inputs: dict, causal: bool, scale=None, dtype=torch.float64, need_grads=True) -> dict:
    """Output, LSE and the gradient of every tensor input (float64 unless ``dtype``), from autograd."""
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    leaves = {n: inputs[n].detach().to(dtype).requires_grad_(need_grads) if inputs[n] is not None else None
              for n in names}
    with torch.enable_grad():
        out, lse = attention_math(*(leaves[n] for n in names), inputs["key_padding_mask"], causal, scale, dtype)
        result = dict(out=out.detach(), lse=lse)
        if need_grads:
            present = [n for n in names if leaves[n] is not None]
            grads = torch.autograd.grad(out, [leaves[n] for n in present], inputs["dout"].to(dtype),
                                        allow_unused=True)  # an empty prefix is unused
            result.update({f"d{n}": torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(present, grads)})
    return result


def poison_empty(monkeypatch):
    """Make torch.empty / torch.empty_like return NaN-filled (float) or -1-filled tensors."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan") if t.is_floating_point() else -1) if t.numel() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(real_empty_like(*a, **kw)))


def set_mode(monkeypatch, mode: str) -> None:
    """Force one CPU mode of fastpeft.cpu.prefix_attention: "torch" (no C++ kernel), "merged" (flash + prefix
    merge) or "direct" (one C++ pass at any length)."""
    from fastpeft.cpu import prefix_attention as prefix_attention_cpu

    if mode == "torch":
        monkeypatch.setattr(prefix_attention_cpu, "_direct_ops", lambda dtype: None)
    elif mode == "merged":
        monkeypatch.setattr(prefix_attention_cpu, "DIRECT_MAX_QUERY_ROWS", 0)
    else:
        monkeypatch.setattr(prefix_attention_cpu, "DIRECT_MAX_QUERY_ROWS", 1 << 30)
