"""The GPU benchmark's headline shapes as the static gates launch them, read from the benchmark itself.

One definition: ``benchmarks/ops/<op>.py``'s ``_shapes("cuda", level)`` is
what the GPU suite measures; the AOT modules (``gates/aot/<op>.py``) launch
the same shapes as headline launches, whose grids the kernel report's grid
gate checks. Neither package is in the wheel.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def gpu_shapes(op: str, level: str = "default", **where) -> list[dict]:
    """The shapes of ``benchmarks/ops/<op>.py`` on the GPU at ``level``, those whose fields equal ``where``."""
    if str(REPOSITORY) not in sys.path:
        sys.path.insert(0, str(REPOSITORY))
    shapes = importlib.import_module(f"benchmarks.ops.{op}")._shapes("cuda", level)
    return [s for s in shapes if all(s[key] == value for key, value in where.items())]


def distinct(shapes: list[dict], *fields: str) -> tuple:
    """The distinct values of ``fields`` (one field: the values; several: tuples), in first-seen order."""
    values = (s[fields[0]] if len(fields) == 1 else tuple(s[f] for f in fields) for s in shapes)
    return tuple(dict.fromkeys(values))
