"""The NF4 format as the tests know it, independent of fastpeft and of bitsandbytes.

``docs/architecture.md`` ("NF4 and bitsandbytes"): element ``2j`` is the high
nibble of byte ``j``, ``2j+1`` the low one; a weight is ``fp32(code · absmax)``
of its block. ``dense_weight`` is bitsandbytes' dequantization where
bitsandbytes is installed (the oracle) and this documented format where it is
not (the GPU lane), so the kernel tests run on both.
"""
from __future__ import annotations

import torch

from optional_deps import bitsandbytes_functional as bnbF

# The 16 NF4 levels, exact fp32 values.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def codebook(device=None) -> torch.Tensor:
    """The NF4 levels as an fp32 tensor (on the default device unless ``device`` is given)."""
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


def dense_from_bytes(packed, absmax, n: int, k: int, blocksize: int) -> torch.Tensor:
    """The fp32 ``[n, k]`` weight of packed NF4 bytes and fp32 per-block absmax (the documented format)."""
    b = packed.reshape(-1).to(torch.int64)
    nibbles = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)
    return (codebook(packed.device)[nibbles].view(-1, blocksize) * absmax.reshape(-1, 1)).view(n, k)


def dense_weight(packed, absmax, n: int, k: int, blocksize: int) -> torch.Tensor:
    """The fp32 weight bitsandbytes dequantizes from these bytes; the documented format without bitsandbytes."""
    if not bnbF:
        return dense_from_bytes(packed, absmax, n, k, blocksize)
    state = bnbF.QuantState(absmax=absmax, shape=torch.Size((n, k)), code=codebook(absmax.device),
                            blocksize=blocksize, quant_type="nf4", dtype=torch.float32)
    return bnbF.dequantize_4bit(packed, state)
