"""Argument checks the LoRA optimizer helpers share (each raises before any parameter changes)."""
from __future__ import annotations

import math

from .._validation import check_scaling


def check_rate(name: str, value, *, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (>= 0 with ``allow_zero``); TypeError/ValueError naming ``name``."""
    value = check_scaling(name, value)
    if value < 0 or (value == 0 and not allow_zero) or not math.isfinite(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value
