"""AOT launches of ``fastpeft.kernels.dora``: none of its own yet (see ``gates.aot_spec``).

DoRA's launches are ``fastpeft.kernels.lora``'s, whose variants ``gates.aot.lora`` reports.
"""
from __future__ import annotations

from ..aot_spec import module_specs

KERNEL_MODULE = "fastpeft.kernels.dora"


def aot_launches() -> None:
    """No kernel of DoRA's own: nothing to record."""


def aot_specs():
    return list(module_specs(KERNEL_MODULE))
