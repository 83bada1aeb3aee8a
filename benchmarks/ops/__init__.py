"""The ops the suite benchmarks: one module per op, each exposing ``OP`` (an ``OpBench``).

To add an op (Adapter, prefix attention...): write ``benchmarks/ops/<name>.py``
declaring its shapes, inputs, providers and work, and add its name here.
"""
from __future__ import annotations

import importlib

OP_MODULES = ("lora", "nf4", "qlora")


def load_ops(names=None) -> list:
    """The ``OpBench`` of each op in ``names`` (default: all), in suite order."""
    names = list(OP_MODULES) if not names else list(names)
    unknown = [n for n in names if n not in OP_MODULES]
    if unknown:
        raise SystemExit(f"unknown op(s) {unknown}; choose from {list(OP_MODULES)}")
    return [importlib.import_module(f"{__name__}.{n}").OP for n in names]
