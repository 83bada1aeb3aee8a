"""TF32 variants for the kernel report: the fp32 launches of a user who allowed TF32.

fastpeft follows torch's setting for fp32 CUDA matmuls
(``torch.backends.cuda.matmul.fp32_precision = "tf32"``, or ``allow_tf32``;
HF ``TrainingArguments(tf32=True)`` sets it): fp32 operands then multiply on
tensor cores (``DOT_PRECISION="tf32"``), a different compiled variant from the
exact ``"ieee"`` one. ``tf32_specs`` records a module's ``aot_launches`` again
under that setting and keeps the variants the default recording does not have,
labelled ``tf32`` in place of ``fp32``; ``gates.aot_spec.module_specs`` adds
them, so the report compiles and gates them for sm_80 and sm_90 like every
other variant (the launches' labels mark them as GEMMs, since TF32 dots run on
tensor cores: tensor-core instructions are required).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch


@contextlib.contextmanager
def tf32_allowed():
    """torch's fp32 CUDA matmuls allowed to use TF32 inside the block (both spellings of the setting)."""
    matmul = torch.backends.cuda.matmul
    saved_precision = getattr(matmul, "fp32_precision", None)
    saved_allow = matmul.allow_tf32
    try:
        if saved_precision is not None:
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
        yield
    finally:
        if saved_precision is not None:
            matmul.fp32_precision = saved_precision
        else:
            matmul.allow_tf32 = saved_allow


def tf32_name(name: str) -> str:
    """``kernel[fp32,...]`` -> ``kernel[tf32,...]``; a label without ``fp32`` gets ``,tf32`` appended."""
    if "[fp32" in name:
        return name.replace("[fp32", "[tf32", 1)
    return name[:-1] + ",tf32]" if name.endswith("]") else name + "[tf32]"


def tf32_specs(aot_launches: Callable[[], None], known_keys: set) -> list:
    """The variants ``aot_launches()`` launches with TF32 allowed that are not in ``known_keys``."""
    from .aot_spec import record_specs

    with tf32_allowed():
        specs = record_specs(aot_launches)
    return [dataclasses.replace(s, name=tf32_name(s.name)) for s in specs if s.key() not in known_keys]
