"""The dropout seed shared by the LoRA-carrying ops (lora_linear, qlora_linear).

Each training call draws an int64 seed from torch's default CPU generator (so
``torch.manual_seed`` makes runs repeatable); it travels through the custom
ops as a 0-dim tensor, which ``torch.compile`` traces without a graph break,
and backward regenerates the same mask from it. The draw names the CPU even
under ``torch.set_default_device("cuda")``: a seed on the GPU would make the
kernel's ``.item()`` synchronise the device in every forward and backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

SEED_LIMIT = 2**62  # the kernels join two 31-bit halves into one 62-bit Philox key


def check_seed(name: str, seed) -> int:
    """An int in ``[0, 2**62)``, else a ValueError/TypeError naming ``name``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**62), got {seed}")
    return seed


def draw_seed(dropout_p: float) -> Optional[Tensor]:
    """A fresh seed tensor when dropout is active, else None."""
    return torch.randint(0, SEED_LIMIT, (), dtype=torch.int64, device="cpu") if dropout_p > 0.0 else None


def seed_value(seed: Optional[Tensor]) -> int:
    """The integer a kernel takes (0 when there is no dropout)."""
    return 0 if seed is None else int(seed.item())
