"""The packed-NF4 argument check every NF4 launcher runs (``nf4``, ``nf4_gemv``, through them ``qlora``).

The op layer validates user input; this guards direct launcher calls, whose
kernels would otherwise read past the packed bytes or the absmax blocks.
Layout: ``docs/architecture.md``, "NF4".
"""
from __future__ import annotations

import torch


def check_nf4_layout(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
                     blocksize: int) -> None:
    """``packed`` (flat uint8, ``n·k/2`` bytes), fp32 ``absmax`` (one per block) and the 16-value ``code``."""
    if blocksize <= 0 or blocksize % 2 or k % blocksize:
        raise ValueError(f"in_features={k} must be a multiple of blocksize={blocksize} (an even number)")
    if packed.dtype != torch.uint8 or packed.numel() * 2 != n * k or not packed.is_contiguous():
        raise ValueError(f"packed must be contiguous uint8 with {n * k // 2} bytes for a [{n}, {k}] weight")
    if absmax.dtype != torch.float32 or absmax.numel() != n * k // blocksize or not absmax.is_contiguous():
        raise ValueError(f"absmax must be contiguous fp32 with {n * k // blocksize} blocks")
    if code.dtype != torch.float32 or code.numel() != 16 or not code.is_contiguous():
        raise ValueError("code must be a contiguous fp32 tensor of 16 values")
