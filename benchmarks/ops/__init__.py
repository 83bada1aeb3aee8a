"""The ops the suite benchmarks: one module per op, each exposing ``OP`` (an ``OpBench``).

To add an op, write ``benchmarks/ops/<name>.py`` declaring its shapes,
inputs, providers and work: it is found here by its file name (every module
of this package but ``common``), so there is no list to keep.
``tests/benchmarks/test_benchmark_suite.py`` checks that every public op of
``fastpeft.ops`` has one.
"""
from __future__ import annotations

import importlib
import pkgutil

_SHARED = {"common"}
# Suite order: the existing ops first, then any other in file-name order.
_FIRST = ("lora", "nf4", "qlora")


def _discover() -> tuple[str, ...]:
    names = sorted(info.name for info in pkgutil.iter_modules(__path__)
                   if not info.name.startswith("_") and info.name not in _SHARED)
    return tuple(n for n in _FIRST if n in names) + tuple(n for n in names if n not in _FIRST)


OP_MODULES = _discover()


def load_ops(names=None) -> list:
    """The ``OpBench`` of each op in ``names`` (default: all), in suite order."""
    names = list(OP_MODULES) if not names else list(names)
    unknown = [n for n in names if n not in OP_MODULES]
    if unknown:
        raise SystemExit(f"unknown op(s) {unknown}; choose from {list(OP_MODULES)}")
    return [importlib.import_module(f"{__name__}.{n}").OP for n in names]
