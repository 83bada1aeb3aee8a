"""The ahead-of-time gate for the NF4 decode GEMV (fastpeft.kernels.nf4_gemv), sm_80 and sm_90, no GPU needed.

Uses the session's one kernel report (tests/tools/conftest.py); the gate
itself (no spills, registers, shared memory, headline grids) is
tests/tools/test_kernel_report.py. Here: every dtype x token-row config x
flag x blocksize is compiled for both arches, the weight bytes arrive in
128-bit loads, and registers allow at least 4 CTAs per SM (the decode grid
is N / 4 programs, 1024 at N = 4096: 4 waves' worth of CTAs on 132 SMs only
help if 4 fit at once). No variant is a GEMM: the products run on FMA units.
"""
import pytest

pytestmark = pytest.mark.slow

ARCHES = (80, 90)


@pytest.fixture(scope="module")
def gemv_rows(report_rows):
    return [r for r in report_rows if r.module == "fastpeft.kernels.nf4_gemv"]


def test_every_gemv_variant_is_compiled_for_every_arch(gemv_rows):
    names = {r.name for r in gemv_rows}
    # 3 dtypes x 2 token-row configs x (plain and bias + LoRA at blocksize 64, plain at 128 and at a ragged
    # K), less bf16's two-row config at a ragged K (one row per program there)
    assert len(names) == 23, sorted(names)
    assert sorted((r.name, r.arch) for r in gemv_rows) == sorted((n, a) for n in names for a in ARCHES)
    for dtype in ("fp32", "fp16", "bf16"):
        for m in ("m1", "m2"):
            for tail in (",n4096,k4096,b64]", ",n4096,k4096,b64,bias,lora]", ",n4096,k4096,b128]",
                         ",n4096,k4160,b64]"):
                if not (dtype == "bf16" and m == "m2" and "k4160" in tail):
                    assert f"nf4_gemv[{dtype},{m}{tail}" in names, (dtype, m, tail)


def test_gemv_loads_weight_bytes_128_bits_wide_and_fits_4_ctas_per_sm(gemv_rows):
    for r in gemv_rows:
        assert not r.is_gemm, r.name
        assert r.load_bits == 128, (r.name, r.arch, r.load_bits)
        assert r.spills == 0, (r.name, r.arch)
        assert r.ctas_per_sm >= 4, (r.name, r.arch, r.registers, r.shared_bytes)
