"""The ahead-of-time gate for the NF4 tensor-core GEMMs (``fastpeft.kernels.nf4`` and ``.qlora``; no GPU needed).

Uses the session's one kernel report (tests/gates/conftest.py); the generic
gate (spills, registers, shared memory, tensor cores, wgmma in flight) is
``tests/gates/test_kernel_report.py``. Here, what the NF4 GEMM design promises
on top of it: every fp16/bf16 forward and dX variant, with and without the
LoRA term and dropout, keeps a wgmma group in flight on sm_90 (the dequantized
weight is the register operand) and fits at least two CTAs per SM there; each
token-count class (M < 1024, M >= 1024) has its own dX tile.
"""
import pytest

pytestmark = pytest.mark.slow

GEMMS = ("nf4_matmul", "nf4_matmul_t")
MODULES = ("fastpeft.kernels.nf4", "fastpeft.kernels.qlora")


@pytest.fixture(scope="module")
def nf4_gemm_rows(report_rows):
    return [r for r in report_rows if r.module in MODULES and r.name.split("[")[0] in GEMMS]


def test_every_half_precision_nf4_gemm_overlaps_its_wgmmas_with_two_ctas_per_sm(nf4_gemm_rows):
    sm90 = [r for r in nf4_gemm_rows if r.arch == 90 and ("fp16" in r.name or "bf16" in r.name)]
    # forward and dX, fp16 and bf16, without LoRA and with r = 8 / 16 (bias, dropout), both token classes
    assert len(sm90) >= 40
    for r in sm90:
        assert r.hgmma and r.wgmma_async, r.name
        assert r.ctas_per_sm >= 2, (r.name, r.registers, r.shared_bytes)
        assert r.spills == 0 and r.load_bits == 128 and r.async_copies > 0, r.name


def test_dx_has_a_tile_for_each_token_class(nf4_gemm_rows):
    names = {r.name for r in nf4_gemm_rows}
    for dtype in ("fp16", "bf16"):
        assert f"nf4_matmul_t[{dtype},m2048,dx]" in names
        assert f"nf4_matmul_t[{dtype},r8,m2048,bwd_dropout]" in names
    small = next(r for r in nf4_gemm_rows if r.name == "nf4_matmul_t[bf16,m1,dx]" and r.arch == 90)
    large = next(r for r in nf4_gemm_rows if r.name == "nf4_matmul_t[bf16,m2048,dx]" and r.arch == 90)
    assert (small.num_warps, large.num_warps) == (4, 8)


def test_no_nf4_gemm_main_loop_reads_single_bytes(nf4_gemm_rows):
    """The packed weight arrives in wide loads: no 8-bit global load in any NF4 GEMM's main loop (the GEMMs read
    the weight with 32 byte loads per thread per k-step before the rework)."""
    assert nf4_gemm_rows
    for r in nf4_gemm_rows:
        assert r.loop_instructions > 0 and r.loop_byte_loads == 0, (r.name, r.arch, r.loop_byte_loads)
