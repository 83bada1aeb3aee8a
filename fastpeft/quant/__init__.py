"""Quantized weight formats. ``NF4Weight`` is the bitsandbytes-compatible NF4 container.

The CPU kernels that read it (``fastpeft.cpu.nf4_native``) need the native
extension and are imported on demand, so importing this package never compiles.
"""
from .nf4 import NF4Weight, nf4_code, signed_dynamic_map

__all__ = ["NF4Weight", "nf4_code", "signed_dynamic_map"]
