"""The device a test lane draws on: the GPU in the GPU lane, the CPU otherwise.

The GPU lane (tests/conftest.py) makes CUDA torch's default device, so a test
that creates tensors without naming a device runs the compiled kernels. A test
must then never pin the CPU (a ``"cpu"`` mask, a CPU ``torch.Generator``):
compiled kernels would get CPU pointers, or a mask drawn on one device would be
compared with another device's. Tests draw through these helpers instead, and
``tests/scripts/test_lane_cpu_pins.py`` fails on a new CPU pin.
"""
from __future__ import annotations

import torch


def lane_device() -> torch.device:
    """torch's default device (``cuda`` in the GPU lane)."""
    return torch.get_default_device()


def lane_generator(seed: int) -> torch.Generator:
    """A generator on the lane's device, seeded with ``seed``."""
    return torch.Generator(device=lane_device()).manual_seed(seed)


def op_seed_draw() -> int:
    """The dropout seed an op's next training call draws: torch's CPU generator (``ops/_dropout_seed.py``),
    whatever the default device."""
    from fastpeft.ops._dropout_seed import SEED_LIMIT

    return int(torch.randint(0, SEED_LIMIT, (), dtype=torch.int64, device="cpu"))
