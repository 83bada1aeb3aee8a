"""AOT launches of ``fastpeft.kernels.prefix_attention``: what the kernel report compiles for prefix attention.

See ``gates.aot_spec``.
"""
from __future__ import annotations

import torch

from fastpeft.kernels import _common
from fastpeft.kernels._common import dot_precision
from fastpeft.kernels.prefix_attention import (backward_configs, forward_config, head_block, prefix_attention_backward,
                                               prefix_attention_forward, row_delta)

from ..aot_spec import launch_label, module_specs
from ..headline_shapes import distinct, gpu_shapes

KERNEL_MODULE = "fastpeft.kernels.prefix_attention"


def aot_launches() -> None:
    """Every kernel variant the launchers run: each dtype, D in {64, 128}; HF's transposed layout;
    training and decode lengths (lengths are not specialised, so one variant serves every length
    of a config); causal and not, with a padding mask, without a prefix."""
    hq, hkv = 8, 2
    shapes = ((2, 128, 128, 32), (2, 100, 100, 10), (1, 1, 1, 10), (2, 1, 100, 10))  # (B, Sq, Skv, P)
    for dtype, t in _common.TRITON_DTYPE.items():
        is_gemm = _common.runs_on_tensor_cores(dtype, dot_precision(dtype))
        for d in (64, 128):
            def hf(b, s, h):  # [B, S, H, D] viewed as [B, H, S, D]
                return torch.zeros(b, s, h, d, dtype=dtype).transpose(1, 2)

            for b, sq, skv, p in shapes:
                q, k, v = hf(b, sq, hq), hf(b, skv, hkv), hf(b, skv, hkv)
                pk, pv = torch.zeros(1, hkv, p, d, dtype=dtype), torch.zeros(1, hkv, p, d, dtype=dtype)
                flags = [(True, False, False), (True, True, False)]
                if sq == skv == 100:
                    flags += [(True, True, True), (False, True, False)]
                for has_prefix, causal, has_mask in flags:
                    tag = ("prefix" if has_prefix else "noprefix") + (",causal" if causal else "") + \
                          (",mask" if has_mask else "")
                    prefix = (pk, pv) if has_prefix else (None, None)
                    mask = torch.ones(b, skv, dtype=torch.bool) if has_mask else None
                    fwd_cfg = forward_config(sq, dtype, head_block(d))
                    with launch_label(f"{t},d{d},{tag},{fwd_cfg.name}", is_gemm=is_gemm):
                        out, lse = prefix_attention_forward(q, k, v, *prefix, mask, causal, None)
                    dout = torch.empty_like(out)
                    with launch_label(f"{t},d{d},delta", is_gemm=False):  # first label wins: not a GEMM
                        row_delta(out, dout)
                    dkdv_cfg, dq_cfg = backward_configs(dtype, head_block(d))
                    with launch_label(f"{t},d{d},{tag},{dkdv_cfg.name}+{dq_cfg.name}", is_gemm=is_gemm):
                        prefix_attention_backward(dout, q, k, v, *prefix, mask, out, lse, causal, None,
                                                  True, True, True)
    _aot_headline_launches()


def _aot_headline_launches() -> None:
    """The GPU benchmark's shapes (benchmarks/ops/prefix_attention.py: bf16, Hq = 32, Hkv = 8, 4096 keys, one
    decode step or 4096 / 16384 tokens in 4096-token sequences, causal) as headline launches: the kernel
    report's grid gate checks their grids."""
    shapes = gpu_shapes("prefix_attention", "default")
    dtype, ((hq, hkv, seq),) = torch.bfloat16, distinct(shapes, "Hq", "Hkv", "seq")
    for d in distinct(shapes, "D"):
        for p in distinct(shapes, "P"):
            for batch, sq in ((max(1, t // seq), min(t, seq)) for t in distinct(shapes, "tokens")):
                q = torch.zeros(batch, sq, hq, d, dtype=dtype).transpose(1, 2)
                k = torch.zeros(batch, seq, hkv, d, dtype=dtype).transpose(1, 2)
                pk = torch.zeros(1, hkv, p, d, dtype=dtype)
                with launch_label(f"bf16,d{d},p{p},b{batch},s{sq}", is_gemm=True, headline=True):
                    out, lse = prefix_attention_forward(q, k, k, pk, pk, None, True, None)
                    prefix_attention_backward(torch.empty_like(out), q, k, k, pk, pk, None, out, lse, True, None,
                                              True, True, True)


def aot_specs():
    return list(module_specs(KERNEL_MODULE))
