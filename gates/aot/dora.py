"""AOT launches of ``fastpeft.kernels.dora``: its own kernel, ``_dora_grad_scale_kernel`` (see ``gates.aot_spec``).

DoRA's other launches are ``fastpeft.kernels.lora``'s, whose variants ``gates.aot.lora`` reports. The
grad-scale pass runs in the backward with and without the magnitude's sums (``HAS_Z``) and with and without
``g`` (``WRITE_G``: only dm asked for), at the LoRA report's shapes; the GPU benchmark's training shapes
(512 tokens and more) are headline launches.
"""
from __future__ import annotations

import torch

from fastpeft.kernels._common import TRITON_DTYPE
from fastpeft.kernels.dora import dora_grad_scale

from ..aot_spec import launch_label, module_specs

KERNEL_MODULE = "fastpeft.kernels.dora"
AOT_TOKENS = (16, 512, 2048, 4096)
HEADLINE_TOKENS = (512, 4096, 8192)
HEADLINE_FEATURES = (4096, 8192, 14336)


def aot_launches() -> None:
    for dtype, t in TRITON_DTYPE.items():
        for m in AOT_TOKENS:
            _grad_scale(dtype, m, 4096, f"{t},m{m}")
        for n in HEADLINE_FEATURES:
            for m in HEADLINE_TOKENS:
                _grad_scale(dtype, m, n, f"{t},m{m},n{n}", headline=True, variants=False)


def _grad_scale(dtype: torch.dtype, m: int, n: int, label: str, headline: bool = False, variants: bool = True):
    dy, z = torch.empty((m, n), dtype=dtype), torch.empty((m, n), dtype=dtype)
    scale, norm = torch.empty(n), torch.empty(n)
    flags = ((True, True), (False, True), (True, False)) if variants else ((True, True),)
    for has_z, write_g in flags:
        with launch_label(f"{label},{'dm' if has_z else ''}{'g' if write_g else ''}", False, headline):
            dora_grad_scale(dy, z if has_z else None, scale, norm, write_g)


def aot_specs():
    return list(module_specs(KERNEL_MODULE))
