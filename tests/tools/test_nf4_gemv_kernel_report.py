"""The ahead-of-time gate for the NF4 decode GEMV (``_nf4_decode_gemv_kernel``), sm_80 and sm_90, no GPU needed.

Uses the session's one kernel report (tests/tools/conftest.py); the gate
itself (no spills, registers, shared memory, headline grids) is
tests/tools/test_kernel_report.py. Rows are found by kernel name, not by
module: once ``nf4_matmul`` launches ``nf4_gemv`` for M <= 16, the variants it
shares are reported under ``fastpeft.kernels.nf4`` with its labels. Here:
every dtype and both token-row configs (one and two rows per program) are
compiled for both arches, the weight bytes arrive in 128-bit loads, and
registers allow at least 4 CTAs per SM (the decode grid is N / 4 programs,
1024 at N = 4096). No variant is a GEMM: the products run on FMA units.
"""
import pytest

pytestmark = pytest.mark.slow

ARCHES = (80, 90)
KERNEL = "nf4_decode_gemv["


@pytest.fixture(scope="module")
def gemv_rows(report_rows):
    return [r for r in report_rows if r.name.startswith(KERNEL)]


def test_every_gemv_variant_is_compiled_for_every_arch(gemv_rows):
    names = {r.name for r in gemv_rows}
    # nf4_gemv.aot_launches: 3 dtypes x 2 token-row configs x (plain and bias + LoRA at blocksize 64, plain at
    # 128 and at a ragged K), less bf16's two-row config at a ragged K (one row per program there)
    assert len(names) >= 23, sorted(names)
    assert sorted((r.name, r.arch) for r in gemv_rows) == sorted((n, a) for n in names for a in ARCHES)
    for dtype in ("fp32", "fp16", "bf16"):
        assert any(dtype in n for n in names), dtype


def test_gemv_loads_weight_bytes_128_bits_wide_and_fits_4_ctas_per_sm(gemv_rows):
    for r in gemv_rows:
        assert not r.is_gemm, r.name
        assert r.load_bits == 128, (r.name, r.arch, r.load_bits)
        assert r.spills == 0, (r.name, r.arch)
        assert r.ctas_per_sm >= 4, (r.name, r.arch, r.registers, r.shared_bytes)
