"""One kernel report for the whole gates test folder: every variant of every kernel module, sm_80 and sm_90.

The suite runs with TRITON_INTERPRET=1, so ``compile_report`` compiles in a
child process without it; the triton cache makes a second run cheap. The
gates live beside ``fastpeft`` in the repository root (not in the wheel),
which goes on ``sys.path`` here.
"""
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gates.kernel_report import compile_report, format_table  # noqa: E402

ARCHES = (80, 90)


@pytest.fixture(scope="session")
def report_rows():
    start = time.perf_counter()
    rows = compile_report(ARCHES)
    print(f"\n{format_table(rows)}\nkernel report: {len(rows)} compiles in {time.perf_counter() - start:.1f} s")
    return rows
