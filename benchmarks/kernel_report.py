"""The ahead-of-time kernel report (registers, spills, shared memory, tensor cores) as plain rows.

Wraps ``fastpeft.tools.kernel_report.compile_report``; it compiles every Triton
kernel config for sm_80 and sm_90 without a GPU. When it cannot be imported or
fails, the suite says so in its output instead of leaving the report out
silently.
"""
from __future__ import annotations

import dataclasses
import time

ARCHES = (80, 90)


def kernel_report() -> dict:
    """``{"rows": [...], "seconds": s}`` or ``{"unavailable": reason}``."""
    try:
        from fastpeft.tools.kernel_report import compile_report
    except Exception as exc:
        return {"unavailable": f"import fastpeft.tools.kernel_report failed: {type(exc).__name__}: {exc}"}
    started = time.perf_counter()
    try:
        report = compile_report(arches=ARCHES)
    except Exception as exc:
        return {"unavailable": f"compile_report failed: {type(exc).__name__}: {exc}"}
    rows = []
    for r in report:
        row = dataclasses.asdict(r)
        row.update(spills=r.spills, tensor_core=r.tensor_core, problems=list(r.problems()))
        rows.append(row)
    return {"rows": rows, "seconds": time.perf_counter() - started}
