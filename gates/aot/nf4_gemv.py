"""AOT launches of ``fastpeft.kernels.nf4_gemv``: what the kernel report compiles for the decode GEMV.

See ``gates.aot_spec``.
"""
from __future__ import annotations

import torch

from fastpeft.kernels._common import TRITON_DTYPE
from fastpeft.kernels.nf4_gemv import nf4_gemv

from ..aot_spec import launch_label, module_specs
from .nf4 import aot_weight

KERNEL_MODULE = "fastpeft.kernels.nf4_gemv"


AOT_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (N, K) of a 7-8B model's decode GEMVs
AOT_TOKENS = (1, 2, 4, 8, 16)
AOT_RAGGED_K = 4160  # K / 2 not a multiple of the 512-byte step: the masked last step (EVEN_K False)


def aot_launches() -> None:
    """Every dtype and token-row config, with and without bias and LoRA (r = 8 and 16: a rank that is not a multiple
    of 16 drops the strides' divisibility hints), at blocksize 64 and 128 and a ragged K."""
    weights = [(n, k, 64) for n, k in AOT_SHAPES] + [(n, k, 128) for n, k in AOT_SHAPES[:1]]
    weights += [(4096, AOT_RAGGED_K, 64)]
    for n, k, blocksize in weights:
        weight = aot_weight(n, k, blocksize)
        for dtype, t in TRITON_DTYPE.items():
            for has_bias, rank in ((False, 0), (True, 0), (False, 8), (True, 8), (False, 16), (True, 16)):
                extra = {}
                if has_bias:
                    extra["bias"] = torch.empty(n, dtype=dtype)
                if rank:
                    extra.update(lora_B=torch.empty((n, rank), dtype=dtype), lora_scale=2.0)
                for m in AOT_TOKENS:
                    if rank:
                        extra["lora_h"] = torch.empty((m, rank), dtype=dtype)
                    label = f"{t},m{m},n{n},k{k},b{blocksize}" + ",bias" * has_bias + f",r{rank}" * bool(rank)
                    with launch_label(label, False, headline=n == k == 4096 and blocksize == 64):
                        nf4_gemv(torch.empty((m, k), dtype=dtype), *weight, n, k, blocksize, **extra)


def aot_specs():
    """Every variant ``aot_launches`` makes (see ``gates.aot_spec``)."""
    return list(module_specs(KERNEL_MODULE))
