"""The ahead-of-time gate for the NF4 Triton kernels (sm_80 and sm_90, no GPU needed).

Same rules as the LoRA gate in test_kernel_report.py: no spills, at most 255
registers, shared memory within the arch limit, and tensor-core instructions
in every GEMM-shaped NF4 kernel (the decode GEMV and dequantize kernels are
not GEMMs).
"""
import time

import pytest

from fastpeft.kernels import nf4
from fastpeft.tools.kernel_report import compile_report, format_table

pytestmark = pytest.mark.slow

ARCHES = (80, 90)


@pytest.fixture(scope="module")
def nf4_rows():
    start = time.perf_counter()
    rows = compile_report(ARCHES, modules=["fastpeft.kernels.nf4"])
    print(f"\n{format_table(rows)}\nNF4 kernel report: {len(rows)} compiles in {time.perf_counter() - start:.1f} s")
    return rows


def test_every_nf4_spec_is_compiled_for_every_arch(nf4_rows):
    names = [spec.name for spec in nf4.aot_specs()]
    assert sorted((r.name, r.arch) for r in nf4_rows) == sorted((n, a) for n in names for a in ARCHES)


def test_every_nf4_config_passes_the_gate(nf4_rows):
    bad = [f"{r.name} sm_{r.arch}: {', '.join(r.problems())}" for r in nf4_rows if r.problems()]
    assert not bad, "\n".join(bad)
    assert all(r.registers > 0 for r in nf4_rows)


def test_nf4_half_precision_gemms_use_tensor_cores(nf4_rows):
    gemms = [r for r in nf4_rows if r.is_gemm]
    assert any("fp16" in r.name for r in gemms) and any("bf16" in r.name for r in gemms)
    assert all(r.tensor_core != "none" for r in gemms)
